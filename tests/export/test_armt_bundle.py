"""An ARMT checkpoint end to end: ``rmt-export --ckpt armt.pt`` writes a validated bundle whose
state is 2 x L named pairs; the unchanged runtime (no ARMT code in it) runs, streams, batches,
saves and resumes it bit-identically and generates, torch-free, as PyTorch does.

The model is a tiny GPT-2 ARMT of the newer reference (2 heads, a sink, L2-normalised
features; tests/rmt_model/test_armt.py) with W_mv ~ N(0, 0.05^2): the memory moves the
logits (the reference's zero W_mv would make it a no-op) without making the 32-segment
recurrence chaotic (at 0.3 a 1e-6 perturbation of the state grows to 0.2 within 32 segments,
and no fp16 or int8 graph can follow such a model, nor PyTorch's own fp16).
"""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from rmt_export.cli import main as export_main
from rmt_model import save_checkpoint
from rmt_runtime import GenerationConfig, RMTRuntime
from rmt_runtime.bundle import Bundle, BundleError
from tests.rmt_model.test_armt import NEWER, make_armt

SEGMENT = 16
W_MV_STD = 0.05


@pytest.fixture(scope="module")
def armt(tmp_path_factory):
    """(model, checkpoint path, bundle path): exported through the rmt-export CLI, fp32."""
    model = make_armt("gpt2", w_mv_std=W_MV_STD, **NEWER)
    directory = tmp_path_factory.mktemp("armt_bundle")
    checkpoint = save_checkpoint(model, directory / "armt.pt")
    out = directory / "bundle"
    result = CliRunner().invoke(export_main, ["--ckpt", str(checkpoint), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    return model, checkpoint, out, json.loads(result.stdout)


@pytest.fixture(scope="module")
def runtime(armt):
    return RMTRuntime.load(armt[2], backend="onnxruntime")


def ids_of(length, rows=1, seed=5):
    return np.random.default_rng(seed).integers(0, 97, size=(rows, length)).astype(np.int64)


def pytorch_run(model, ids):
    with torch.no_grad():
        out = model(torch.from_numpy(ids))
    return out.logits[:, -1].numpy(), {k: v.numpy() for k, v in out.state.items()}


def test_rmt_export_writes_a_validated_bundle_whose_state_is_two_named_pairs_per_layer(armt):
    model, _, out, printed = armt
    assert printed["ok"]
    bundle = Bundle.load(out)
    layers = model.num_layers
    assert (bundle.kind, bundle.architecture, bundle.sink) == ("decoder", "armt", 1)
    assert sorted(bundle.graph_names) == ["decode", "ingest", "prefill", "step"]
    assert bundle.state_pairs == {**{f"W_mem.{l}": f"new_W_mem.{l}" for l in range(layers)},
                                  **{f"z.{l}": f"new_z.{l}" for l in range(layers)}}
    features = 6 * 8 // 2  # DPFP nu=3 doubles then triples d_mem 8, split over 2 heads
    assert bundle.state_shapes() == {**{f"W_mem.{l}": (2, features, 32 // 2) for l in range(layers)},
                                     **{f"z.{l}": (2, features) for l in range(layers)}}
    assert "memory_init" not in bundle.manifest and not (out / "memory_init.npy").exists()
    assert all(not value.any() for value in bundle.initial_state().values())
    report = bundle.manifest["validation"]
    assert report["passed"] and report["segments"] == 32
    assert set(report["sensitivity"]) >= {f"new_W_mem.{l}" for l in range(layers)}
    # The sensitivity is measured from the first written state (zero state cannot be perturbed).
    assert report["sensitivity"]["new_W_mem.0"][0] == 0.0 and report["sensitivity"]["new_W_mem.0"][2] > 0
    assert report["generation"]["argmax_agreement"]["cached"] == 1.0


def test_the_runtime_reads_as_pytorch_does_over_chained_segments_with_a_padded_row(armt, runtime):
    model = armt[0]
    ids = ids_of(12 * SEGMENT, rows=2)
    mask = np.ones_like(ids)
    mask[1, 7 * SEGMENT + 5:] = 0
    out = runtime.run(ids, mask)
    logits, state = pytorch_run(model, ids[:1])
    short_logits, short_state = pytorch_run(model, ids[1:, :7 * SEGMENT + 5])
    # fp32 ONNX Runtime vs PyTorch over 12 chained segments: measured 1e-6 (validation bound 1e-4).
    assert np.abs(out.last_logits[0] - logits[0]).max() < 1e-4
    assert np.abs(out.last_logits[1] - short_logits[0]).max() < 1e-4
    for name in state:
        scale = np.abs(state[name]).max()
        assert np.abs(out.state[name][0] - state[name][0]).max() <= 1e-4 * max(1.0, scale), name
        assert np.abs(out.state[name][1] - short_state[name][0]).max() <= 1e-4 * max(1.0, scale), name
    assert out.memory is None  # no RMT memory: the state is the named tensors


def test_the_memory_matters_a_reset_state_answers_differently(armt, runtime):
    ids = ids_of(4 * SEGMENT)
    carried = runtime.run(ids).last_logits
    fresh = runtime.run(ids[:, 3 * SEGMENT:]).last_logits
    assert np.abs(carried - fresh).max() > 1e-2


def test_feeding_in_chunks_equals_one_run_and_resume_from_a_state_file_is_bit_identical(runtime, tmp_path):
    ids = ids_of(5 * SEGMENT + 9)[0]
    whole = runtime.run(ids[None])
    state = runtime.new_state()
    for chunk in np.array_split(ids[:3 * SEGMENT + 4], 5):
        runtime.feed(state, chunk)
    runtime.save_state(state, tmp_path / "armt.state")
    runtime.feed(state, ids[3 * SEGMENT + 4:])
    uninterrupted = runtime.flush(state)

    restarted = RMTRuntime.load(runtime.bundle.path, backend="onnxruntime")
    resumed_state = restarted.restore_state(tmp_path / "armt.state")
    restarted.feed(resumed_state, ids[3 * SEGMENT + 4:])
    resumed = restarted.flush(resumed_state)
    for name in uninterrupted.state:
        assert np.array_equal(resumed.state[name], uninterrupted.state[name]), name
        assert np.array_equal(whole.state[name], uninterrupted.state[name]), name
    assert np.array_equal(resumed.last_logits, uninterrupted.last_logits)
    assert np.array_equal(whole.last_logits, uninterrupted.last_logits)


def test_generation_matches_the_pytorch_armts_cached_greedy_generation(armt, runtime):
    model = armt[0]
    prompt = ids_of(2 * SEGMENT + 7, seed=9)[0]
    expected = model.generate(torch.from_numpy(prompt[None]), max_new_tokens=8)[0].tolist()
    got = runtime.generate(prompt, GenerationConfig(max_new_tokens=8, rollover=False)).tokens[0]
    assert got == expected


def test_a_batch_generates_what_each_row_generates_alone(runtime):
    prompts = [ids_of(2 * SEGMENT + 3, seed=11)[0], ids_of(SEGMENT - 4, seed=12)[0]]
    config = GenerationConfig(max_new_tokens=2 * SEGMENT)  # rollover writes the filled segment
    together = runtime.generate(prompts, config).tokens
    alone = [runtime.generate(p, config).tokens[0] for p in prompts]
    assert together == alone


RUN_WITHOUT_TORCH = """
import sys
sys.modules['torch'] = None  # any import of torch now fails
from rmt_runtime.{module} import main
sys.argv = [sys.argv[0], *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("module, args", [
    ("cli", ["--ids", "{ids}", "--json"]),
    ("generate_cli", ["--prompt-ids", "{ids}", "--max-new-tokens", "5", "--json"]),
])
def test_rmt_run_and_rmt_generate_run_the_bundle_without_torch(armt, runtime, tmp_path, module, args):
    ids = ids_of(2 * SEGMENT + 3, seed=13)[0]
    np.save(tmp_path / "ids.npy", ids)
    command = [sys.executable, "-c", RUN_WITHOUT_TORCH.format(module=module), "--bundle", str(armt[2]),
               *[a.format(ids=tmp_path / "ids.npy") for a in args]]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    if module == "cli":
        expected = runtime.run(ids[None]).last_logits[0]
        assert printed["top_k"][0]["id"] == int(np.argmax(expected))
        assert printed["state_shapes"]["W_mem.0"] == [1, 2, 24, 16] and "memory_shape" not in printed
    else:
        assert printed["tokens"] == runtime.generate(ids, GenerationConfig(max_new_tokens=5)).tokens[0]


def test_a_bundle_whose_architecture_does_not_fit_its_kind_or_state_is_refused(armt, tmp_path):
    manifest = json.loads((armt[2] / "manifest.json").read_text())
    from rmt_runtime.bundle import check_manifest

    with pytest.raises(BundleError, match="unknown architecture 'armt' for kind 'encoder'"):
        check_manifest({**manifest, "kind": "encoder"}, "x")
    with pytest.raises(BundleError, match="unknown architecture 'rwkv'"):
        check_manifest({**manifest, "architecture": "rwkv"}, "x")
    rmt_like = dict(manifest)
    rmt_like["graphs"] = {**manifest["graphs"], "step": {**manifest["graphs"]["step"], "spec": {
        **manifest["graphs"]["step"]["spec"], "state": {"memory": "new_memory"}}}}
    with pytest.raises(BundleError, match="pairs state 'memory' -> 'new_memory', which are not one of its inputs"):
        check_manifest(rmt_like, "x")
    rmt_like["architecture"] = "rmt"  # an RMT whose graphs carry no memory
    with pytest.raises(BundleError, match="an RMT carries the state 'memory'"):
        check_manifest({**manifest, "architecture": "rmt"}, "x")


def test_rmt_export_imports_the_reference_armt_layout_and_names_the_flags_it_needs(armt, tmp_path):
    from tests.rmt_model.test_armt_checkpoint import reference_layout, write_backbone

    model = armt[0]
    torch.save(reference_layout(model, duplicates=True), tmp_path / "armt_reference.bin")
    backbone = write_backbone(model, tmp_path)
    refused = CliRunner().invoke(export_main, ["--ckpt", str(tmp_path / "armt_reference.bin"), "--no-validate"])
    assert refused.exit_code == 1
    assert "state dict of the reference ARMT code" in refused.stderr and "--armt-version" in refused.stderr
    wrong = CliRunner().invoke(export_main, ["--ckpt", str(tmp_path / "armt_reference.bin"), "--armt-version",
                                             "normalized", "--backbone-config", str(backbone), "--num-mem-tokens", "4"])
    assert wrong.exit_code == 1 and "not --num-mem-tokens, which is read off" in wrong.stderr
    out = tmp_path / "imported"
    result = CliRunner().invoke(export_main, [
        "--ckpt", str(tmp_path / "armt_reference.bin"), "--backbone-config", str(backbone), "--armt-version",
        "normalized", "--segment-size", str(SEGMENT), "--out", str(out), "--no-generation", "--segments", "4"])
    assert result.exit_code == 0, result.output
    assert "dropped" in result.stderr  # the older classes' memory_cell.layers.* duplicates
    ids = ids_of(3 * SEGMENT + 2)
    imported = RMTRuntime.load(out, backend="onnxruntime").run(ids)
    original = RMTRuntime.load(armt[2], backend="onnxruntime").run(ids)
    assert np.array_equal(imported.last_logits, original.last_logits)
