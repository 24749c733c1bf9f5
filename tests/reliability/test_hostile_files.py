"""Property-based: state files and manifests with out-of-range fields are refused with a typed
error before any work (nothing runs, nothing is allocated from what they claim)."""
import json
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rmt_runtime import Bundle, BundleError, RMTRuntime, StateError

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
LOW, HIGH = -(2 ** 63), 2 ** 63 - 1
INT64 = st.integers(min_value=LOW, max_value=HIGH)


@pytest.fixture(scope="module")
def saved(bundle_factory, tmp_path_factory):
    """A runtime and the members of one of its real state files (1 row, 7 tokens pending)."""
    rt = RMTRuntime.load(bundle_factory("gpt2", "fp32")[1].path)
    state = rt.new_state()
    rt.feed(state, np.arange(39) % 97)
    path = tmp_path_factory.mktemp("state") / "s.npz"
    rt.save_state(state, path)
    with np.load(path) as archive:
        return rt, {name: archive[name] for name in archive.files}


# One field of a valid state file replaced by a value out of its range, shape or type.
hostile_members = st.one_of(
    st.tuples(st.just("pending_tokens"), st.lists(st.one_of(st.integers(LOW, -1), st.integers(97, HIGH)),
                                                  min_size=7, max_size=7).map(lambda v: np.array(v, np.int64))),
    st.tuples(st.just("tokens_seen"), st.one_of(st.integers(LOW, 6).map(lambda v: np.array([v], np.int64)),
                                                st.lists(INT64, min_size=2, max_size=3).map(np.array))),
    st.tuples(st.just("segments_done"), st.integers(LOW, -1).map(lambda v: np.array([v], np.int64))),
    st.tuples(st.just("has_logits"), st.lists(st.booleans(), min_size=2, max_size=4).map(np.array)),
    st.tuples(st.just("pending_lengths"), st.integers(min_value=-5, max_value=100).filter(lambda v: v != 7)
              .map(lambda v: np.array([v], np.int64))),
    st.tuples(st.just("state.memory"), st.sampled_from([np.zeros((1, 4, 31), np.float32), np.zeros((2, 4, 32), np.float32),
                                                       np.zeros((1, 4, 32), np.float64),
                                                       np.full((1, 4, 32), np.inf, np.float32)])),
    st.tuples(st.just("last_logits"), st.sampled_from([np.zeros((1, 96), np.float32),
                                                      np.full((1, 97), np.nan, np.float32)])),
)


@SETTINGS
@given(member=hostile_members)
def test_a_state_file_with_a_field_out_of_range_is_refused(saved, tmp_path_factory, member):
    rt, members = saved
    name, value = member
    path = tmp_path_factory.mktemp("hostile") / "s.npz"
    np.savez(path, **{**members, name: value})
    with pytest.raises(StateError):
        rt.restore_state(path)


@SETTINGS
@given(header=st.fixed_dictionaries({}, optional={
    "format": st.one_of(st.text(max_size=20), st.integers()), "version": st.one_of(st.integers(), st.none()),
    "batch": st.one_of(st.integers(), st.text(max_size=5), st.floats(allow_nan=True)),
    "bundle_identity": st.text(max_size=20)}))
def test_a_state_header_with_odd_fields_is_refused(saved, tmp_path_factory, header):
    rt, members = saved
    path = tmp_path_factory.mktemp("hostile") / "s.npz"
    np.savez(path, **{**members, "header": np.frombuffer(json.dumps(header).encode(), np.uint8)})
    with pytest.raises(StateError):
        rt.restore_state(path)


# One manifest field replaced by a value out of its range or type, or a path leaving the bundle.
hostile_fields = st.one_of(
    st.tuples(st.sampled_from(["vocab_size", "num_mem_tokens", "hidden_size", "segment_size"]),
              st.one_of(st.integers(max_value=0), st.integers(min_value=2 ** 25), st.text(max_size=3), st.none())),
    st.tuples(st.just("segment_size"), st.integers(min_value=57, max_value=2 ** 24)),  # past the 64 positions
    st.tuples(st.just("max_positions"), st.one_of(st.integers(max_value=23), st.text(max_size=3))),
    st.tuples(st.just("memory_init"), st.sampled_from(["/etc/passwd", "../x.npy", "a/../../x.npy", "", "~/x"])),
    st.tuples(st.just("files"), st.sampled_from([{"../../etc/passwd": "0" * 64}, {"/abs": "0" * 64}, [], None])),
    st.tuples(st.just("precision"), st.text(max_size=6).filter(lambda v: v not in ("fp32", "fp16", "int8"))),
    st.tuples(st.just("schema_version"), st.one_of(st.integers().filter(lambda v: v != 1), st.text(max_size=3))),
    st.tuples(st.just("state_init"), st.sampled_from([{"memory": "/etc/passwd"}, "x", [1]])),
)


@pytest.fixture(scope="module")
def bundle_dir(bundle_factory, tmp_path_factory):
    copy = tmp_path_factory.mktemp("bundle") / "b"
    shutil.copytree(bundle_factory("gpt2", "fp32")[1].path, copy)
    return copy


@SETTINGS
@given(field=hostile_fields)
def test_a_manifest_with_a_field_out_of_range_is_refused(bundle_dir, field):
    manifest_path = bundle_dir / "manifest.json"
    original = manifest_path.read_text()
    name, value = field
    try:
        manifest_path.write_text(json.dumps({**json.loads(original), name: value}))
        with pytest.raises(BundleError):
            RMTRuntime.load(bundle_dir)
    finally:
        manifest_path.write_text(original)
    Bundle.load(bundle_dir)  # restored: the next example starts from a valid bundle
