"""Every field of the engine key, one at a time: change the one input it comes from, and the
key changes and an engine cached under the old inputs is not found (find_engines refuses it,
build_engine builds anew). The audit's bug this class comes from: a field dropped from
``engine_fields`` lets an engine built for other inputs (another TensorRT, TF32 on, other
external weights) be loaded as if it were this one.

The fields come from ``engine_fields``' own output, so a field added there without a way to
change it here fails ``test_every_field_of_the_engine_key_has_a_change_here``. Runs on the fake
TensorRT of tests/fakes (its ``__version__`` and device are set per install).
"""
import copy
import shutil
import sys
from dataclasses import dataclass, field, replace

import pytest

from rmt_runtime import Bundle
from rmt_runtime.engines import (BuildOptions, DeviceInfo, EngineError, build_engine, engine_fields, engine_key,
                                 engine_path, find_engines)
from tests import fakes
from tests.fakes import fake_tensorrt


@dataclass(frozen=True)
class Inputs:
    """Everything ``engine_fields`` is computed from: the bundle (its manifest), the builder module
    and its version, the GPU, the build options and the graph."""

    manifest: dict = field(hash=False)
    version: str = "10.3.0"
    gpu: str = "Fake Orin"
    capability: tuple[int, int] = (8, 7)
    options: BuildOptions = BuildOptions(max_batch=4)
    graph: str = "step"

    @property
    def builder(self) -> str:
        return self.options.builder


def edited(manifest, edit):
    manifest = copy.deepcopy(manifest)
    edit(manifest)
    return manifest


# field -> how to change the one input it comes from (Inputs -> Inputs).
CHANGES = {
    "builder": lambda i: replace(i, options=replace(i.options, builder="tensorrt_rtx")),
    "trt_version": lambda i: replace(i, version="10.8.0"),
    "gpu": lambda i: replace(i, gpu="Fake Thor"),
    "compute_capability": lambda i: replace(i, capability=(8, 9)),
    "precision": lambda i: replace(i, manifest=edited(i.manifest, lambda m: m.update(precision="fp16"))),
    "fp16_flag": lambda i: replace(i, options=replace(i.options, fp16_flag=True)),
    "tf32": lambda i: replace(i, options=replace(i.options, tf32=True)),
    # The ingest graph read from step's file: only the graph's name differs.
    "graph": lambda i: replace(i, graph="ingest", manifest=edited(
        i.manifest, lambda m: m["graphs"]["ingest"].update(file=m["graphs"]["step"]["file"]))),
    "max_batch": lambda i: replace(i, options=replace(i.options, max_batch=2)),
    "opt_batch": lambda i: replace(i, options=replace(i.options, opt_batch=2)),
    # An edited graph file: its hash in the manifest (Bundle.load checks the file against it).
    "graph_sha256": lambda i: replace(i, manifest=edited(
        i.manifest, lambda m: m["files"].update({m["graphs"][i.graph]["file"]: "0" * 64}))),
    "data_sha256": lambda i: replace(i, manifest=edited(
        i.manifest, lambda m: m["files"].update({m["graphs"][i.graph]["file"] + ".data": "b" * 64}))),
    # A bundle of another segment size: the optimisation profile's shapes.
    "profile": lambda i: replace(i, manifest=edited(i.manifest, lambda m: m.update(segment_size=8))),
}


@pytest.fixture
def bundle_dir(bundle_factory, tmp_path):
    target = tmp_path / "bundle"
    shutil.copytree(bundle_factory("gpt2", "fp32")[1].path, target)
    return target


def install(monkeypatch, inputs: Inputs):
    """The fake TensorRT of ``inputs.version`` on the fake GPU of ``inputs``, importable as both builders."""
    trt, _ = fakes.install(monkeypatch, version=inputs.version, name=inputs.gpu, capability=inputs.capability)
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", fake_tensorrt)
    return trt


def fields_of(bundle_dir, inputs: Inputs) -> dict:
    bundle = Bundle(path=bundle_dir, manifest=inputs.manifest)
    device = DeviceInfo(inputs.gpu, f"{inputs.capability[0]}.{inputs.capability[1]}")
    return engine_fields(bundle, inputs.graph, inputs.builder, inputs.version, device, inputs.options)


def test_every_field_of_the_engine_key_has_a_change_here(bundle_dir):
    base = Inputs(manifest=Bundle.load(bundle_dir).manifest)
    assert sorted(fields_of(bundle_dir, base)) == sorted(CHANGES)


@pytest.mark.parametrize("name", sorted(CHANGES))
def test_changing_one_input_of_the_engine_key_changes_the_key_and_misses_the_old_engine(
        monkeypatch, bundle_dir, name):
    base = Inputs(manifest=Bundle.load(bundle_dir).manifest)
    changed = CHANGES[name](base)
    old, new = fields_of(bundle_dir, base), fields_of(bundle_dir, changed)
    differ = [k for k in old if old[k] != new[k]]
    # The profile's shapes are made of max_batch and opt_batch: the one field that moves with another.
    assert name in differ and set(differ) <= {name, "profile"}, f"changing {name} changed {differ}"
    assert engine_key(new) != engine_key(old)

    install(monkeypatch, base)  # engines cached under the old inputs
    bundle = Bundle(path=bundle_dir, manifest=base.manifest)
    for graph in bundle.segment_graph_names:
        build_engine(bundle, graph, base.options)
    assert find_engines(bundle, base.builder, base.options).paths[base.graph] == engine_path(bundle, old)

    trt = install(monkeypatch, changed)  # the new inputs: the old engine is not theirs
    bundle = Bundle(path=bundle_dir, manifest=changed.manifest)
    assert engine_path(bundle, new) != engine_path(bundle, old)
    with pytest.raises(EngineError, match="no TensorRT engines for this machine"):
        find_engines(bundle, changed.builder, changed.options)
    assert trt.state.builds == []
    assert build_engine(bundle, changed.graph, changed.options) == engine_path(bundle, new)
    assert len(trt.state.builds) == 1, f"an engine built for another {name} was reused"
