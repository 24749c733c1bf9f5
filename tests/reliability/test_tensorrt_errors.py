"""TensorRT errors name the cause (issue 29, class 8).

TensorRT reports a failed call by returning None, False or -1 and says why only to its
logger. The process's logger (``rmt_runtime.engines.stderr_logger``) keeps the last error
messages of each thread (``RecentErrors``), and every error raised after such a call carries
what TensorRT said meanwhile, on one line:

- ``RecentErrors``: per thread, bounded, what was said since a mark (hypothesis; threads);
- every failing call of the build path, the runner's load and its run, against the FAKE
  tensorrt of tests/fakes, whose calls give the logger an error before failing;
- TensorRT-RTX's real builder (no GPU needed): a graph it cannot parse, a profile it refuses,
  a build it cannot do: each error says TensorRT's own reason.
"""
from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from rmt_runtime import Bundle, RMTRuntime
from rmt_runtime.engines import (BuildOptions, BuildSettings, EngineError, RecentErrors, build_bundle_engines,
                                 build_engine, parse_and_build, profile_shapes, stderr_logger)
from rmt_runtime.errors import BackendError, one_line
from tests import fakes


# ---- RecentErrors: per thread, bounded, since a mark ------------------------------------------
OPERATIONS = st.lists(st.one_of(st.tuples(st.just("add"), st.text(min_size=1, max_size=6)),
                                st.tuples(st.just("mark"), st.none())), max_size=60)


@settings(max_examples=200, deadline=None)
@given(operations=OPERATIONS, limit=st.integers(1, 8))
def test_since_a_mark_gives_the_messages_added_after_it_within_the_limit(operations, limit):
    recent = RecentErrors(limit)
    added: list[str] = []
    marks: list[tuple[int, int]] = []  # (the mark, how many had been added then)
    for operation, message in operations:
        if operation == "add":
            recent.add(message)
            added.append(message)
        else:
            marks.append((recent.mark(), len(added)))
    marks.append((recent.mark(), len(added)))
    for mark, count in marks:
        still_kept = added[max(count, len(added) - limit):]
        assert recent.since(mark) == list(dict.fromkeys(still_kept))
    assert recent.since(recent.mark()) == []
    assert recent.reason_since(recent.mark()) == "TensorRT logged no reason"


def test_each_thread_takes_only_what_it_was_told():
    recent, threads, rounds = RecentErrors(4), 4, 50
    barrier = threading.Barrier(threads)
    wrong: list[str] = []

    def work(index: int) -> None:
        for round_ in range(rounds):
            mark = recent.mark()
            barrier.wait()  # every thread adds between the others' mark and take
            recent.add(f"thread {index} round {round_}")
            barrier.wait()
            if recent.since(mark) != [f"thread {index} round {round_}"]:
                wrong.append(f"thread {index} round {round_}: {recent.since(mark)}")

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert wrong == []


def test_the_logger_keeps_errors_and_prints_warnings_and_errors(monkeypatch, capfd):
    trt, _ = fakes.install(monkeypatch)
    logger = stderr_logger(trt)
    mark = logger.recent.mark()
    severity = trt.ILogger.Severity
    for level in (severity.VERBOSE, severity.INFO, severity.WARNING, severity.ERROR, severity.INTERNAL_ERROR):
        logger.log(level, f"{level.name} message")
    assert logger.recent.since(mark) == ["ERROR message", "INTERNAL_ERROR message"]
    printed = capfd.readouterr()
    assert printed.out == ""
    assert printed.err.splitlines() == ["[TRT] [W] WARNING message", "[TRT] [E] ERROR message",
                                        "[TRT] [F] INTERNAL_ERROR message"]


REASON = st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=40).filter(
    lambda s: s.strip() == s and "In " not in s and not s.startswith("[") and not s.endswith((":", ",")))


@settings(max_examples=200, deadline=None)
@given(reason=REASON, function=st.from_regex(r"[A-Za-z_][A-Za-z0-9_:]{0,20}", fullmatch=True),
       source=st.from_regex(r"/_src/[a-z/]{1,20}\.cpp", fullmatch=True), line=st.integers(1, 99999),
       prefixed=st.booleans())
def test_tensorrts_source_locations_are_dropped_and_its_reason_kept(reason, function, source, line, prefixed):
    """TensorRT's "(reason In f at /_src/file.cpp:N)" and "[file.cpp::f::N] " prefix say where in
    TensorRT, never why: one_line drops them and keeps every character of the reason."""
    prefix = f"[checkMacros.cpp::{function.replace(':', '')}::{line}] " if prefixed else ""
    message = f"{prefix}IBuilder::build: Error Code 4: API Usage Error ({reason} In {function} at {source}:{line})"
    assert one_line(message) == f"IBuilder::build: Error Code 4: API Usage Error ({reason})"


# ---- every failing call, against the fake ---------------------------------------------------------
@pytest.fixture
def bundle_dir(bundle_factory, tmp_path):
    target = tmp_path / "bundle"
    shutil.copytree(bundle_factory("gpt2", "fp32")[1].path, target)
    return target


def reason(call: str) -> str:
    return f"the fake's reason why {call} failed\n(second line)"


def assert_names(error: BaseException, call: str) -> None:
    message = str(error)
    assert f"TensorRT said: the fake's reason why {call} failed; (second line)" in message, message
    assert "\n" not in message and "not the reason" not in message  # one line; info lines are not kept


BUILD_CALLS = ["Builder", "create_network", "OnnxParser", "parse_from_file", "create_builder_config",
               "create_optimization_profile", "add_optimization_profile", "build_serialized_network"]


@pytest.mark.parametrize("call", BUILD_CALLS)
def test_a_failed_build_call_is_an_engine_error_saying_tensorrts_reason(monkeypatch, bundle_dir, call):
    trt, _ = fakes.install(monkeypatch)
    trt.state.fail[call] = reason(call)
    with pytest.raises(EngineError, match="TensorRT could not build the ingest engine") as info:
        build_bundle_engines(bundle_dir, BuildOptions())
    assert_names(info.value, call)


def test_a_refused_timing_cache_is_noted_with_tensorrts_reason(monkeypatch, bundle_dir):
    trt, _ = fakes.install(monkeypatch)
    build_bundle_engines(bundle_dir, BuildOptions(max_batch=2))  # leaves a timing cache
    trt.state.fail["set_timing_cache"] = reason("set_timing_cache")
    said: list[str] = []
    build_bundle_engines(bundle_dir, BuildOptions(max_batch=4), said.append)
    notes = [line for line in said if "timing cache was made for another GPU" in line]
    assert notes and "TensorRT said: the fake's reason why set_timing_cache failed; (second line)" in notes[0]


LOAD_CALLS = ["Runtime", "deserialize_cuda_engine", "create_execution_context"]
RUN_CALLS = ["set_input_shape", "set_tensor_address", "execute_async_v3"]


@pytest.mark.parametrize("call", LOAD_CALLS + RUN_CALLS)
def test_a_failed_runner_call_is_a_backend_error_saying_tensorrts_reason(monkeypatch, bundle_dir, call):
    trt, _ = fakes.install(monkeypatch)
    build_bundle_engines(bundle_dir, BuildOptions())
    trt.state.fail[call] = reason(call)
    ids = np.arange(16, dtype=np.int64)[None] % Bundle.load(bundle_dir).vocab_size
    with pytest.raises(BackendError) as info:
        RMTRuntime.load(bundle_dir, backend="tensorrt").run(ids)
    assert_names(info.value, call)
    if call == "deserialize_cuda_engine":
        assert str(info.value).endswith(f"; rebuild it with rmt-build --bundle {bundle_dir}")
    if call == "set_input_shape":
        assert "the engine's profile takes batch 1..8, length 1..16" in str(info.value)


def test_a_launch_that_fails_while_capturing_is_noted_with_tensorrts_reason(monkeypatch, bundle_dir, capfd):
    trt, _ = fakes.install(monkeypatch)
    build_bundle_engines(bundle_dir, BuildOptions())
    trt.state.fail["execute_async_v3 while capturing"] = reason("execute_async_v3 while capturing")
    ids = np.arange(32, dtype=np.int64)[None] % Bundle.load(bundle_dir).vocab_size
    rt = RMTRuntime.load(bundle_dir, backend="tensorrt", cuda_graphs=True)
    rt.run(ids)
    assert rt.runner.uncapturable == {"ingest"}
    (note,) = rt.runner.notes
    assert ("execute_async_v3 failed while capturing: TensorRT said: the fake's reason why execute_async_v3 while "
            "capturing failed; (second line)") in note
    assert "the fake's reason why" in capfd.readouterr().err


# ---- TensorRT-RTX's real builder ---------------------------------------------------------------
@pytest.fixture
def rtx():
    return pytest.importorskip("tensorrt_rtx", reason="tensorrt_rtx is not installed (pip install tensorrt-rtx-cu12)")


def test_a_graph_tensorrt_cannot_parse_is_an_error_naming_the_parsers_reason(rtx, bundle_dir):
    import onnx

    from rmt_runtime.bundle import write_manifest

    path = bundle_dir / "step.onnx"
    model = onnx.load(str(path))
    node = next(n for n in model.graph.node if n.op_type == "MatMul")
    node.op_type, node.domain = "NoSuchOp", "rmt.test"
    model.opset_import.append(onnx.helper.make_opsetid("rmt.test", 1))
    onnx.save(model, str(path))
    write_manifest(bundle_dir, Bundle.load(bundle_dir, verify_hashes=False).manifest)
    with pytest.raises(EngineError, match="TensorRT could not build the step engine") as info:
        build_engine(Bundle.load(bundle_dir), "step", BuildOptions(builder="tensorrt_rtx"))
    message = str(info.value)
    assert f"{node.name} (NoSuchOp): " in message and "Plugin not found" in message, message
    assert "parse failed: 1 node(s) TensorRT cannot take" in message
    assert "\n" not in message and "ModelImporter" not in message, message  # the parser's log is not repeated


def test_a_build_tensorrt_cannot_do_is_an_error_saying_why(rtx, bundle_dir):
    """No workspace: buildSerializedNetwork returns None; the reason was only in the log."""
    with pytest.raises(EngineError, match=r"build_serialized_network returned no engine: TensorRT said: .*"
                                          r"requires workspace memory greater than 0") as info:
        build_engine(Bundle.load(bundle_dir), "step", BuildOptions(builder="tensorrt_rtx", workspace_mb=0))
    assert "\n" not in str(info.value) and "/_src/" not in str(info.value)


def test_a_profile_tensorrt_refuses_is_recorded_with_its_reason(rtx, bundle_dir):
    bundle = Bundle.load(bundle_dir)
    spec = bundle.graph_spec("step")
    good = profile_shapes(spec, bundle.segment_size, 4, 1, bundle.cache_prefix)
    logger = stderr_logger(rtx)
    inverted = {name: (high, opt, low) for name, (low, opt, high) in good.items()}
    outcome = parse_and_build(rtx, logger, bundle.graph_path("step"), spec, inverted)
    (error,) = outcome.errors
    assert error.startswith("optimisation profile rejected by the builder config: TensorRT said: ")
    assert "MIN<=OPT<=MAX" in error
    missing = {name: shapes for name, shapes in good.items() if name != "memory"}
    outcome = parse_and_build(rtx, logger, bundle.graph_path("step"), spec, missing)
    assert outcome.errors == ["build_serialized_network returned no engine: TensorRT said: "
                              "IBuilder::buildSerializedNetwork: Error Code 4: API Usage Error (Dynamic input tensor "
                              "memory is missing dimensions in profile 0.)"]
    turing = parse_and_build(rtx, logger, bundle.graph_path("step"), spec, good,
                             BuildSettings(compute_capabilities=["SM75"]))
    assert not turing.built and "for Turing (SM75)" in turing.errors[0], turing.errors
