"""pytest plugin used only by scripts/mutation.sh (loaded with ``-p rmt_mutation_plugin``).

mutmut runs a fresh pytest session for every mutant, and tests/conftest.py keeps its
exported test bundles in a directory under the session's temporary directory, so every
mutant would re-export them (~10 s each). This plugin points that directory at one
persistent cache (``RMT_MUTATION_CACHE``) before tests/conftest.py's ``shared_dir`` asks
for it: the bundles are exported once, by the unmutated code of mutmut's first (stats)
run, and reused by every mutant. Nothing else about the tests changes.

It also imports, once, what the tests otherwise import lazily in every mutant's process
(each Hugging Face model family, ONNX Runtime, the exporter): mutmut forks every mutant's
pytest from a server that has loaded this plugin, so the imports are paid once, not ~5 s
per mutant.
"""
import importlib
import os
from pathlib import Path

import pytest


_warmed = False


def pytest_configure(config):
    global _warmed
    # Two mutants run at once on a small machine: one torch thread each, as under xdist.
    import torch

    torch.set_num_threads(1)
    if _warmed or not os.environ.get("RMT_MUTATION_CACHE"):
        return
    _warmed = True  # forked children inherit the flag and the imports
    for module in ("onnxruntime", "transformers.generation", "rmt_export.exporter"):
        importlib.import_module(module)
    from rmt_model import build_model
    from rmt_model.tiny import DECODER_FAMILIES, ENCODER_FAMILIES, tiny_config

    for family in DECODER_FAMILIES + ENCODER_FAMILIES:
        build_model(tiny_config(family, num_mem_tokens=4, segment_size=16))


@pytest.fixture(scope="session", autouse=True)
def _rmt_persistent_shared_dir(tmp_path_factory, worker_id):
    cache = os.environ.get("RMT_MUTATION_CACHE")
    if not cache:
        return
    Path(cache).mkdir(parents=True, exist_ok=True)
    base = tmp_path_factory.getbasetemp()
    # Same rule as tests/conftest.py's shared_dir.
    root = (base.parent if worker_id != "master" else base) / "shared"
    if not root.exists():
        root.symlink_to(cache, target_is_directory=True)
