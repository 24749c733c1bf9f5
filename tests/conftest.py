"""Shared fixtures: tiny random-initialised models, seeded for reproducibility."""
import pytest
import torch

from rmt_model import build_model, save_checkpoint
from rmt_model.tiny import tiny_config


@pytest.fixture
def make_model():
    """Build a tiny seeded RMT of a family: make_model('llama', num_mem_tokens=2, ...)."""
    def make(family: str = "gpt2", seed: int = 0, **overrides):
        torch.manual_seed(seed)
        return build_model(tiny_config(family, **overrides))
    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A saved tiny GPT-2 RMT checkpoint and the model it holds."""
    torch.manual_seed(0)
    model = build_model(tiny_config("gpt2", num_mem_tokens=4, segment_size=16))
    path = save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "model.pt")
    return path, model
