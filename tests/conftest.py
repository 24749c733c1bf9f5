"""Shared fixtures: tiny random-initialised models and their exported bundles, seeded."""
import pytest
import torch

from rmt_export.exporter import ExportOptions, export_model
from rmt_export.validate import ValidationPlan

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


@pytest.fixture(scope="session")
def bundle_factory(tmp_path_factory):
    """bundle_factory(family, precision, **config_overrides) -> (model, ExportResult); cached
    for the session. Overrides go to tiny_config (e.g. initializer_range=0.2)."""
    cache = {}

    def make(family: str, precision: str = "fp32", **overrides):
        key = (family, precision, tuple(sorted(overrides.items())))
        if key not in cache:
            torch.manual_seed(0)
            model = build_model(tiny_config(family, **{"num_mem_tokens": 4, "segment_size": 16, **overrides}))
            suffix = "".join(f"-{k}{v}" for k, v in sorted(overrides.items()))
            out = tmp_path_factory.mktemp("bundles") / f"{family}-{precision}{suffix}"
            result = export_model(model, out, ExportOptions(precision=precision, plan=ValidationPlan(segments=32)))
            cache[key] = (model, result)
        return cache[key]
    return make
