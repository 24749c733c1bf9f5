"""Bundles exported once per session and shared by the export tests (exports take seconds)."""
import pytest
import torch

from rmt_export.exporter import ExportOptions, export_model
from rmt_export.validate import ValidationPlan
from rmt_model import build_model
from rmt_model.tiny import tiny_config


@pytest.fixture(scope="session")
def bundle_factory(tmp_path_factory):
    """bundle_factory(family, precision) -> (model, ExportResult); cached for the session."""
    cache = {}

    def make(family: str, precision: str = "fp32"):
        key = (family, precision)
        if key not in cache:
            torch.manual_seed(0)
            model = build_model(tiny_config(family, num_mem_tokens=4, segment_size=16))
            out = tmp_path_factory.mktemp("bundles") / f"{family}-{precision}"
            result = export_model(model, out, ExportOptions(precision=precision, plan=ValidationPlan(segments=32)))
            cache[key] = (model, result)
        return cache[key]
    return make

