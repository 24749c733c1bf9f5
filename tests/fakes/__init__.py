"""FAKE tensorrt and cuda-python modules for CPU tests of the TensorRT path's control flow.

``install(monkeypatch)`` puts them where ``import tensorrt`` and ``from cuda.bindings import
runtime`` find them, for one test. They pin logic (which context, which engine, what happens
when a call fails); they never stand in for a GPU result: tests/gpu does that on a GPU.
"""
from __future__ import annotations

import sys
import types

from . import fake_tensorrt
from .fake_cudart import FakeCudart


def install(monkeypatch, version: str = "10.3.0", **device) -> tuple[types.ModuleType, FakeCudart]:
    """Install fresh fakes; returns (fake tensorrt module, fake cudart)."""
    cudart = FakeCudart(**device)
    fake_tensorrt.reset(cudart, version)
    cuda = types.ModuleType("cuda")
    bindings = types.ModuleType("cuda.bindings")
    cuda.bindings, bindings.runtime = bindings, cudart
    for name, module in {"tensorrt": fake_tensorrt, "cuda": cuda, "cuda.bindings": bindings,
                         "cuda.bindings.runtime": cudart}.items():
        monkeypatch.setitem(sys.modules, name, module)
    return fake_tensorrt, cudart
