"""Every document the runtime reads is checked by its one schema (rmt_runtime.schema), and every
file it reads is covered by the bundle's hashes (issue 29, classes 3, 5, 6 and 9).

- manifests: any field of a real manifest changed to a hostile value is a BundleError, or the
  field is one the runtime does not interpret (the loaded geometry is unchanged);
- graphs' external data: a file a graph reads that the manifest does not hash is refused, and
  a hashed one is part of the bundle's identity;
- engines/: a symlinked folder, hostile metadata, a plan altered after its build: refused,
  never written through nor trusted (TensorRT-RTX's real builder, no GPU needed);
- state files: counters out of range or that do not add up are refused before any sum;
- the Triton model's parameters: typed and bounded, a swapped bundle refused.
"""
from __future__ import annotations

import copy
import json
import os
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from rmt_runtime import Bundle, BundleError, RMTRuntime, StateError
from rmt_runtime.bundle import check_manifest, sha256_file
from rmt_runtime.schema import MAX_TOKENS, DocumentError, read_document

HOSTILE = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(1 << 70), max_value=1 << 70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
    st.sampled_from(["../x", "/etc/passwd", "~root", "a/../../b", ".hidden", "x\x00y", "*", "[a]", "encoder",
                     "armt", "int4", "bf16", "step.onnx", "", " ", "9" * 400]),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=3))


def leaves(document, prefix=()):
    """Every (path, value) of a JSON document, objects and lists descended into."""
    if isinstance(document, dict):
        for key, value in document.items():
            yield prefix + (key,), value
            yield from leaves(value, prefix + (key,))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            yield prefix + (index,), value
            yield from leaves(value, prefix + (index,))


def replaced(document, path, value):
    changed = copy.deepcopy(document)
    target = changed
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return changed


def geometry(bundle: Bundle):
    """What the runtime takes from a manifest (but the identity, and whether bf16 was validated,
    which only adds a note): if a change leaves this equal, nothing read changed."""
    return (bundle.kind, bundle.architecture, bundle.num_mem_tokens, bundle.segment_size, bundle.hidden_size,
            bundle.vocab_size, bundle.precision, bundle.max_positions, bundle.tokenizer_files, bundle.id2label,
            bundle.eos_token_ids, bundle.cache_prefix,
            {g: bundle.graph_spec(g) for g in bundle.graph_names}, {g: str(bundle.graph_path(g)) for g in
                                                                      bundle.graph_names},
            bundle.state_pairs, bundle.state_shapes(), bundle.extra_positions, bundle.sink)


# Fields written for people and reports, and the model config (the parts the runtime reads: eos,
# labels, the ARMT's sink, are typed by RMTConfigDoc; the rest rebuilds the PyTorch model): changed
# at the top level only.
NOT_READ = ("created", "producer", "validation", "rmt_config")
REPORTS = ("created", "producer", "validation")


@pytest.fixture(scope="module")
def manifests(bundle_factory, armt_bundle_factory):
    rmt = bundle_factory("gpt2", "fp32")[1].path
    armt = armt_bundle_factory("fp32")[1]
    return {name: (path, json.loads((path / "manifest.json").read_text())) for name, path in
            (("rmt", rmt), ("armt", armt))}


@pytest.mark.parametrize("family", ["rmt", "armt"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_manifest_field_changed_is_refused_or_not_read(manifests, family, data):
    path, manifest = manifests[family]
    original = Bundle(path=path, manifest=manifest)
    fields = [p for p, _ in leaves(manifest) if not (p[0] in NOT_READ and len(p) > 1)]
    where = data.draw(st.sampled_from(fields))
    value = data.draw(HOSTILE)
    changed = replaced(manifest, where, value)
    try:
        doc = check_manifest(changed, "m")
    except BundleError:
        return
    # accepted: the runtime reads what it read before, or the bundle is another one (its identity
    # differs, so no state or Triton config of the original continues on it); a report changes neither
    edited = Bundle(path=path, manifest=changed, doc=doc)
    if where[0] in REPORTS:
        assert geometry(edited) == geometry(original) and edited.identity == original.identity, where
    else:
        assert geometry(edited) == geometry(original) or edited.identity != original.identity, where
        assert edited.identity != original.identity or changed == manifest, where


def test_the_identity_covers_every_field_the_runtime_reads(bundle_factory, tmp_path):
    """A manifest edited to run other segments (a dynamic 'seq' axis takes any segment_size the
    positions allow) is another bundle: a state saved on the original does not continue on it."""
    copy_ = tmp_path / "b"
    shutil.copytree(bundle_factory("gpt2", "fp32")[1].path, copy_)
    original = RMTRuntime.load(copy_)
    state = original.new_state()
    original.feed(state, np.arange(40) % 97)
    original.save_state(state, tmp_path / "s.npz")
    manifest = json.loads((copy_ / "manifest.json").read_text())
    (copy_ / "manifest.json").write_text(json.dumps({**manifest, "segment_size": 8}))
    edited = RMTRuntime.load(copy_)
    assert edited.segment_size == 8 and edited.identity != original.identity
    with pytest.raises(StateError, match="a state only continues on its own bundle"):
        edited.restore_state(tmp_path / "s.npz")
    (copy_ / "manifest.json").write_text(json.dumps({**manifest, "created": "another day", "producer": {}}))
    assert RMTRuntime.load(copy_).identity == original.identity  # reports are not the bundle


def test_a_decoder_labelled_an_encoder_is_refused_at_load(bundle_factory, tmp_path):
    """The issue's example: kind "encoder" on a decoder bundle loaded, then run failed in numpy."""
    copy_ = tmp_path / "b"
    shutil.copytree(bundle_factory("gpt2", "fp32")[1].path, copy_)
    manifest = json.loads((copy_ / "manifest.json").read_text())
    for graphs in (manifest["graphs"], {k: v for k, v in manifest["graphs"].items() if k in ("step", "ingest")}):
        (copy_ / "manifest.json").write_text(json.dumps({**manifest, "kind": "encoder", "graphs": graphs}))
        with pytest.raises(BundleError, match="encoder"):
            RMTRuntime.load(copy_)


@pytest.mark.parametrize("what, content", [("fifo", None), ("directory", None), ("huge", None), ("nan", b"NaN"),
                                           ("deep", b"[" * 100000 + b"]" * 100000), ("utf16", "{}".encode("utf-16"))])
def test_a_manifest_that_is_not_a_small_regular_json_file_is_refused_unread(bundle_factory, tmp_path, what, content):
    copy_ = tmp_path / "b"
    shutil.copytree(bundle_factory("gpt2", "fp32")[1].path, copy_)
    target = copy_ / "manifest.json"
    target.unlink()
    if what == "fifo":
        os.mkfifo(target)  # opened non-blocking: must not hang
    elif what == "directory":
        target.mkdir()
    elif what == "huge":
        with open(target, "wb") as handle:
            handle.truncate((64 << 20) + 1)  # sparse: no disk used
    else:
        target.write_bytes(content)
    with pytest.raises(BundleError) as info:
        Bundle.load(copy_)
    assert str(target) in str(info.value) or str(copy_) in str(info.value)


def test_read_document_bounds_what_it_reads(tmp_path):
    small = tmp_path / "s"
    small.write_bytes(b"x" * 10)
    assert read_document(small, 10, "thing") == b"x" * 10
    with pytest.raises(DocumentError, match="is 11 bytes; the thing is limited to 10 bytes"):
        small.write_bytes(b"x" * 11)
        read_document(small, 10, "thing")
    with pytest.raises(DocumentError, match="is a character device, expected the thing"):
        read_document("/dev/zero", 10, "thing")
    with pytest.raises(DocumentError, match="is a directory, expected the thing"):
        read_document(tmp_path, 10, "thing")


# ---- class 3: every file a graph reads is hashed -------------------------------------------------------
@pytest.fixture
def external_bundle(bundle_factory, tmp_path):
    """A copy of a bundle whose step graph keeps its weights in step.onnx.data (as large exports do)."""
    onnx = pytest.importorskip("onnx")
    target = tmp_path / "ext"
    shutil.copytree(bundle_factory("gpt2", "fp32")[1].path, target)
    model = onnx.load(target / "step.onnx")
    onnx.save_model(model, target / "step.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="step.onnx.data", size_threshold=1024)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["files"]["step.onnx"] = sha256_file(target / "step.onnx")
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target, manifest


def test_external_data_the_manifest_does_not_hash_is_refused(external_bundle):
    target, manifest = external_bundle
    with pytest.raises(BundleError, match=r"step.onnx reads external data from 'step.onnx.data', which the manifest "
                                          "does not hash"):
        Bundle.load(target)


def test_hashed_external_data_is_part_of_the_identity(external_bundle, bundle_factory, tmp_path):
    target, manifest = external_bundle
    manifest["files"]["step.onnx.data"] = sha256_file(target / "step.onnx.data")
    (target / "manifest.json").write_text(json.dumps(manifest))
    original = RMTRuntime.load(bundle_factory("gpt2", "fp32")[1].path)
    rt = RMTRuntime.load(target)
    ids = np.arange(40) % 97
    np.testing.assert_array_equal(rt.run(ids).memory, original.run(ids).memory)
    assert rt.identity != original.identity
    state = original.new_state()
    original.feed(state, ids)
    original.save_state(state, tmp_path / "s.npz")
    with pytest.raises(StateError, match="a state only continues on its own bundle"):
        rt.restore_state(tmp_path / "s.npz")
    data = bytearray((target / "step.onnx.data").read_bytes())
    data[100] ^= 1
    (target / "step.onnx.data").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="step.onnx.data differs from the manifest's sha256"):
        Bundle.load(target)


def test_external_data_outside_the_bundle_is_refused(external_bundle):
    onnx = pytest.importorskip("onnx")
    target, manifest = external_bundle
    model = onnx.load(target / "step.onnx", load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../elsewhere.data"
    onnx.save(model, target / "step.onnx")
    manifest["files"]["step.onnx"] = sha256_file(target / "step.onnx")
    (target / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="external data '../elsewhere.data'"):
        Bundle.load(target)


# ---- class 6: state counters ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_state(bundle_factory, tmp_path_factory):
    rt = RMTRuntime.load(bundle_factory("gpt2", "fp32")[1].path)
    state = rt.new_state()
    rt.feed(state, np.arange(40) % 97)  # 2 segments of 16 run, 8 tokens pending
    path = tmp_path_factory.mktemp("state") / "s.npz"
    rt.save_state(state, path)
    with np.load(path) as archive:
        return rt, {name: archive[name] for name in archive.files}


COUNTER = st.one_of(st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1),
                    st.sampled_from([0, 1, 2, 8, 16, 32, 33, 40, 41, MAX_TOKENS, MAX_TOKENS + 1, (1 << 63) - 6]))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seen=COUNTER, done=COUNTER)
def test_state_counters_are_restored_only_when_they_add_up(saved_state, tmp_path, seen, done):
    """tokens_seen = 2**63 - 6 was accepted and the next feed overflowed; now counters are
    restored only in range and consistent (8 pending; each segment took 1..16 tokens), and a
    restored state takes a feed whose counters stay exact."""
    from tests.runtime.test_state_file_refusals_word_for_word import archive

    rt, members = saved_state
    files = {**members, "tokens_seen": np.array([seen], np.int64), "segments_done": np.array([done], np.int64)}
    path = archive(tmp_path / "c.npz", files)
    consistent = 0 <= seen <= MAX_TOKENS and 0 <= done <= seen - 8 <= 16 * done
    if not consistent:
        with pytest.raises(StateError, match="out of range|do not add up"):
            rt.restore_state(path)
        return
    state = rt.restore_state(path)
    rt.feed(state, np.arange(20) % 97)
    assert int(state.tokens_seen[0]) == seen + 20 and int(state.segments_done[0]) == done + 1


# ---- class 5: engines/ --------------------------------------------------------------------------------
@pytest.fixture
def rtx_bundle(bundle_factory, tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="tensorrt_rtx is not installed (pip install tensorrt-rtx-cu12)")
    target = tmp_path / "bundle"
    shutil.copytree(bundle_factory("gpt2", "fp32")[1].path, target)
    return Bundle.load(target)


RTX_OPTIONS = dict(builder="tensorrt_rtx", max_batch=2)


def test_a_symlinked_engines_folder_is_never_written_through(rtx_bundle, tmp_path):
    from rmt_runtime.engines import BuildOptions, EngineError, build_engine, find_engines

    outside = tmp_path / "outside"
    outside.mkdir()
    (rtx_bundle.path / "engines").symlink_to(outside, target_is_directory=True)
    with pytest.raises(EngineError, match="is a symlink; engines live in a real directory inside the bundle"):
        build_engine(rtx_bundle, "step", BuildOptions(**RTX_OPTIONS))
    with pytest.raises(EngineError, match="is a symlink"):
        find_engines(rtx_bundle, "tensorrt_rtx")
    assert list(outside.iterdir()) == []


def test_engine_metadata_and_plans_are_verified_before_use(rtx_bundle):
    from rmt_runtime.engines import BuildOptions, EngineError, build_engine, find_engines, read_plan

    options = BuildOptions(**RTX_OPTIONS)
    paths = {graph: build_engine(rtx_bundle, graph, options) for graph in ("step", "ingest")}
    assert find_engines(rtx_bundle, "tensorrt_rtx").paths == paths
    plan, meta = paths["step"], paths["step"].with_suffix(".json")
    good_plan, good_meta = plan.read_bytes(), meta.read_text()
    assert read_plan(plan) == good_plan

    # the plan altered after its build: not trusted, and rmt-build rebuilds it
    plan.write_bytes(good_plan[:-1] + bytes([good_plan[-1] ^ 1]))
    with pytest.raises(EngineError, match="no TensorRT engines for this machine"):
        find_engines(rtx_bundle, "tensorrt_rtx")
    with pytest.raises(EngineError, match="differs from the sha256 its metadata records"):
        read_plan(plan)
    said = []
    build_engine(rtx_bundle, "step", options, said.append)
    assert any("cannot be verified" in line for line in said) and read_plan(plan) != b""

    # metadata edited to claim other options, or hostile values: refused by the schema
    fields = json.loads(meta.read_text())
    for change in ({"max_batch": 10 ** 12}, {"max_batch": True}, {"opt_batch": 3}, {"gpu": ""}, {"extra": 1},
                   {"plan_bytes": 1}, {"profile": {"input_ids": [[1, 1]]}}, {"graph": "../step"},
                   {"data_sha256": {"../x": "0" * 64}}, {"max_batch": 4}):
        meta.write_text(json.dumps({**fields, **change}))
        with pytest.raises(EngineError, match="no TensorRT engines for this machine"):
            find_engines(rtx_bundle, "tensorrt_rtx")
    meta.write_text(json.dumps(fields))
    assert find_engines(rtx_bundle, "tensorrt_rtx").paths == paths

    # a metadata file that is a symlink, a FIFO or huge is not read
    meta.unlink()
    os.mkfifo(meta)
    with pytest.raises(EngineError, match="no TensorRT engines for this machine"):
        find_engines(rtx_bundle, "tensorrt_rtx")
    meta.unlink()
    meta.write_text(good_meta)


# ---- the Triton model's parameters ---------------------------------------------------------------------
def triton_config(**parameters):
    from rmt_runtime.triton_model import CONTROLS

    return {"parameters": {f"rmt.{k}": {"string_value": v} for k, v in parameters.items()},
            "sequence_batching": {"control_input": [{"name": n} for n in CONTROLS],
                                  "max_sequence_idle_microseconds": "1000000"}}


@pytest.mark.parametrize("parameters, message", [
    (dict(threads="100000"), "'rmt.threads': expected an integer from 1 to 1024"),
    (dict(threads="-1"), "'rmt.threads': expected an integer from 1 to 1024"),
    (dict(threads="1e3"), "'rmt.threads': expected an integer from 1 to 1024"),
    (dict(provider="gpu"), "unknown provider 'gpu'"),
    (dict(allow_numpy2="yes"), "unknown allow_numpy2 'yes'"),
    (dict(segment_size="0"), "'rmt.segment_size': expected an integer"),
    (dict(colour="red"), r"unknown field\(s\) \['rmt.colour'\]"),
])
def test_triton_parameters_are_typed_and_bounded(parameters, message):
    from rmt_runtime.triton_model import model_settings

    with pytest.raises(RuntimeError, match=message):
        model_settings(triton_config(**parameters))


def test_triton_settings_refuse_a_swapped_bundle_and_odd_idle_times(bundle_factory):
    from rmt_runtime.triton_model import check_bundle_matches, model_settings

    rt = RMTRuntime.load(bundle_factory("gpt2", "fp32")[1].path)
    settings_ = model_settings(triton_config(bundle_identity="0" * 16, segment_size="16"))
    with pytest.raises(RuntimeError, match="written for 0000000000000000: rerun rmt-triton"):
        check_bundle_matches(settings_, rt)
    check_bundle_matches(model_settings(triton_config(bundle_identity=rt.identity, segment_size="16")), rt)
    for idle in ("-5", "0", "1e9", True, str(10 ** 20)):
        config = triton_config()
        config["sequence_batching"]["max_sequence_idle_microseconds"] = idle
        with pytest.raises(RuntimeError, match="max_sequence_idle_microseconds"):
            model_settings(config)
    config = triton_config()
    config["parameters"]["mine"] = {"string_value": "anything"}  # the user's own parameters are theirs
    assert model_settings(config).threads == 1


def test_an_initial_state_that_is_not_a_regular_file_is_refused_without_opening_it(bundle_factory, tmp_path):
    """memory_init.npy replaced by a FIFO, read without hash checks: refused on stat, not a
    blocked open (in a subprocess with a timeout, so a regression fails instead of hanging)."""
    import subprocess
    import sys

    copy_ = tmp_path / "b"
    shutil.copytree(bundle_factory("gpt2", "fp32")[1].path, copy_)
    (copy_ / "memory_init.npy").unlink()
    os.mkfifo(copy_ / "memory_init.npy")
    code = ("from rmt_runtime import Bundle, BundleError\n"
            f"try:\n    Bundle.load({str(copy_)!r}, verify_hashes=False).initial_state()\n"
            "except BundleError as exc:\n    print(exc)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (f"{copy_ / 'memory_init.npy'}: is a FIFO (named pipe), expected the initial "
                                   "'memory' (a regular file)")
