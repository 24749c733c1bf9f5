"""Shared fixtures: tiny random-initialised models, seeded for reproducibility."""
import pytest
import torch

from rmt_model import build_model
from rmt_model.tiny import tiny_config


@pytest.fixture
def make_model():
    """Build a tiny seeded RMT of a family: make_model('llama', num_mem_tokens=2, ...)."""
    def make(family: str = "gpt2", seed: int = 0, **overrides):
        torch.manual_seed(seed)
        return build_model(tiny_config(family, **overrides))
    return make
