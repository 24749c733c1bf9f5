"""Errors name the cause (issue 29, class 8): a third-party library's exception becomes a user error
that says what went wrong, never only the library's first line (OpenVINO's is a C++ source
location), and names the file or argument; an anticipated error is never labelled 'unexpected'.

Every error here is raised for real by OpenVINO, ONNX Runtime or the CLI, on tiny bundles.
"""
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from rmt_runtime import BackendError, Bundle, RMTRuntime
from rmt_runtime.backends.onnxruntime import OnnxRuntimeRunner
from rmt_runtime.cli import main as rmt_run
from rmt_runtime.errors import library_message
from tests.cli.support import one_line_error

openvino = pytest.importorskip("openvino")
onnxruntime = pytest.importorskip("onnxruntime")

from rmt_runtime.backends.openvino import OpenVinoRunner, compile_graph  # noqa: E402

LOCATION = "Exception from src/"  # what OpenVINO's first line says: a location, not a reason


@pytest.fixture(scope="module")
def gpt2(bundle_factory):
    return Bundle.load(bundle_factory("gpt2", "fp32")[1].path)


def _raised(call) -> BaseException:
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - the library's own type, whatever it is
        return exc
    raise AssertionError("no error raised")


def _copy(bundle: Bundle, tmp_path) -> Bundle:
    shutil.copytree(bundle.path, tmp_path / "b")
    return Bundle.load(tmp_path / "b", verify_hashes=False)


# ---- the helper, on the libraries' real exceptions ------------------------------------------------
def test_openvino_reasons_are_kept_and_its_source_locations_dropped(gpt2, tmp_path):
    core = openvino.Core()
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not an onnx graph")
    graph = str(gpt2.graph_path("ingest"))
    cases = {  # each: OpenVINO's real exception, and words of its reason (lines below the first)
        "a corrupt model": (lambda: core.compile_model(str(corrupt), "CPU"), ["Unable to read the model", "corrupt.onnx"]),
        "a bad property value": (lambda: core.compile_model(graph, "CPU", {"INFERENCE_PRECISION_HINT": "f7"}),
                                 ["Wrong value f7 for property key INFERENCE_PRECISION_HINT", "f32"]),
        "an unknown property": (lambda: core.compile_model(graph, "CPU", {"NO_SUCH_PROPERTY": "1"}),
                                ["Unsupported property NO_SUCH_PROPERTY"]),
    }
    request = core.compile_model(graph, "CPU").create_infer_request()
    cases["a wrong input shape"] = (lambda: request.set_tensor("input_ids", openvino.Tensor(np.ones((1, 2, 3),
                                                                                                    np.int64))),
                                    ["Can't set the input tensor", "incompatible"])
    for case, (call, reasons) in cases.items():
        exc = _raised(call)
        assert str(exc).startswith(LOCATION), (case, str(exc))  # the form the helper exists for
        message = library_message(exc)
        assert all(reason in message for reason in reasons), (case, message)
        assert "src/" not in message and "\n" not in message, (case, message)


def test_onnxruntime_reasons_are_kept_and_its_status_prefix_dropped(gpt2, tmp_path):
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not an onnx graph")
    session = onnxruntime.InferenceSession(str(gpt2.graph_path("step")))
    feeds = {i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape],
                              np.float32 if i.type == "tensor(float)" else np.int64) for i in session.get_inputs()}
    feeds["input_ids"] = feeds["input_ids"].astype(np.float32)
    cases = {
        "a corrupt model": (lambda: onnxruntime.InferenceSession(str(corrupt)), ["Protobuf parsing failed",
                                                                                 "corrupt.onnx"]),
        "a missing model": (lambda: onnxruntime.InferenceSession(str(tmp_path / "none.onnx")),
                            ["File doesn't exist", "none.onnx"]),
        "a wrong dtype": (lambda: session.run(None, feeds),
                          ["Unexpected input data type", "tensor(float)", "tensor(int64)"]),
    }
    for case, (call, reasons) in cases.items():
        exc = _raised(call)
        assert str(exc).startswith("[ONNXRuntimeError]"), (case, str(exc))
        message = library_message(exc)
        assert all(reason in message for reason in reasons), (case, message)
        assert "[ONNXRuntimeError]" not in message and "\n" not in message, (case, message)


REASON = st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=40).filter(
    lambda s: s.strip() and not s.strip().startswith(("Exception from ", "Check '", "[ONNXRuntimeError]")))
SOURCE = st.from_regex(r"\Asrc/[a-z_/]{1,30}\.cpp:[0-9]{1,4}\Z", fullmatch=True)


@given(frames=st.lists(st.one_of(SOURCE.map(lambda s: f"Exception from {s}:"),
                                 SOURCE.map(lambda s: f"Check 'x == y' failed at {s}:")), max_size=5),
       reasons=st.lists(REASON, min_size=1, max_size=3))
@settings(max_examples=200, deadline=None)
def test_any_stack_of_locations_leaves_every_reason_line_and_no_location(frames, reasons):
    exc = RuntimeError("\n".join(frames + reasons) + "\n\n")
    message = library_message(exc)
    for reason in reasons:
        assert reason.strip() in message
    for frame in frames:
        assert frame not in message
    assert "\n" not in message


# ---- the backends use it -----------------------------------------------------------------------
def test_openvino_compile_errors_name_the_file_and_the_reason(gpt2, tmp_path):
    bundle = _copy(gpt2, tmp_path)
    bundle.graph_path("ingest").write_bytes(b"not an onnx graph")
    with pytest.raises(BackendError) as info:
        compile_graph(openvino.Core(), bundle.graph_path("ingest"), "fp32")
    message = str(info.value)
    assert message.startswith(f"{bundle.graph_path('ingest')}: OpenVINO cannot compile it: Unable to read the model")
    assert LOCATION not in message


def test_openvino_refusing_a_setting_says_which_and_why(gpt2):
    with pytest.raises(BackendError) as info:  # a thread count OpenVINO refuses: its property, its value
        OpenVinoRunner(gpt2, threads=-2).activate()
    message = str(info.value)
    assert f"{gpt2.graph_path('ingest')}: OpenVINO cannot compile it:" in message
    assert "INFERENCE_NUM_THREADS" in message and "-2" in message and LOCATION not in message


def test_openvino_run_errors_say_the_graph_and_the_reason(gpt2):
    runner = OpenVinoRunner(gpt2).activate()
    state = RMTRuntime.load(gpt2, backend="openvino").new_state()
    with pytest.raises(BackendError) as info:  # past the runner's own checks: OpenVINO's refusal, not a raw one
        runner.run("ingest", {"input_ids": np.ones((1, 2, 3), np.int64), "attention_mask": np.ones((1, 3), np.int64),
                              **state.handles}, ("last_logits",), checked=True)
    message = str(info.value)
    assert message.startswith(f"OpenVINO could not run the ingest graph of {gpt2.path}: ")
    assert "Can't set the input tensor" in message and LOCATION not in message


@pytest.mark.parametrize("dtype, reason", [
    (np.float32, "tensor(float)"),  # refused by the run
    (np.complex64, "can't be converted"),  # refused by the binding, before the run
])
def test_onnxruntime_binding_and_run_errors_are_backend_errors_with_the_reason(gpt2, dtype, reason):
    runner = OnnxRuntimeRunner(gpt2).activate()
    state = RMTRuntime.load(gpt2, backend="onnxruntime").new_state()
    with pytest.raises(BackendError) as info:  # past the runner's own checks: ONNX Runtime's refusal
        runner.run("ingest", {"input_ids": np.ones((1, 3), dtype), "attention_mask": np.ones((1, 3), np.int64),
                              **state.handles}, ("last_logits",), checked=True)
    message = str(info.value)
    assert message.startswith(f"onnxruntime could not run the ingest graph of {gpt2.path}: ")
    assert reason in message and "[ONNXRuntimeError]" not in message


# ---- the CLIs: anticipated errors are one line naming the file, not 'unexpected' ----------------------
def _run(*args):
    return CliRunner().invoke(rmt_run, [str(a) for a in args])


@pytest.mark.parametrize("ids", ["99999999999999999999999 1 2", "1 -99999999999999999999999"])
def test_ids_past_int64_name_the_file_and_the_token(gpt2, tmp_path, ids):
    path = tmp_path / "ids.txt"
    path.write_text(ids)
    line = one_line_error(_run("--bundle", gpt2.path, "--ids", path), f"{path}: token ", "past int64")
    assert "unexpected" not in line


def test_uint64_ids_past_int64_are_named_not_wrapped_to_negative(gpt2, tmp_path):
    path = tmp_path / "ids.npy"
    np.save(path, np.array([1, 2 ** 64 - 1], np.uint64))
    line = one_line_error(_run("--bundle", gpt2.path, "--ids", path), f"{path}: token id {2 ** 64 - 1} is past int64")
    assert "token id -1" not in line  # not wrapped (the path may hold "-1": pytest-190)


def test_out_of_memory_is_one_line_not_unexpected(gpt2, tmp_path, monkeypatch):
    path = tmp_path / "ids.txt"
    path.write_text("1 2 3")

    def no_memory(*args, **kwargs):  # what numpy raises when an allocation does not fit
        raise MemoryError

    monkeypatch.setattr(RMTRuntime, "run", no_memory)
    monkeypatch.setattr(RMTRuntime, "feed", no_memory)
    line = one_line_error(_run("--bundle", gpt2.path, "--ids", path), "out of memory", "smaller batch")
    assert "unexpected" not in line


def test_a_bug_is_still_called_unexpected_with_the_reason(gpt2, tmp_path, monkeypatch):
    path = tmp_path / "ids.txt"
    path.write_text("1 2 3")

    def bug(*args, **kwargs):
        raise RuntimeError("Exception from src/inference/src/cpp/core.cpp:132:\nthe real reason\n")

    monkeypatch.setattr(RMTRuntime, "run", bug)
    monkeypatch.setattr(RMTRuntime, "feed", bug)
    one_line_error(_run("--bundle", gpt2.path, "--ids", path), "unexpected RuntimeError: the real reason",
                   "--verbose")


def test_a_file_that_cannot_be_written_is_named(gpt2, tmp_path):
    path = tmp_path / "ids.txt"
    path.write_text("1 2 3")
    (tmp_path / "a-file").write_text("in the way")
    target = tmp_path / "a-file" / "out.npz"  # its folder is a file (root writes anywhere else)
    line = one_line_error(_run("--bundle", gpt2.path, "--ids", path, "--save-outputs", target), "a-file")
    assert "unexpected" not in line


def test_a_failed_rename_names_both_paths_not_only_the_temporary_one(tmp_path):
    import os

    import click

    from rmt_runtime.cli_support import run_guarded

    staged, target = tmp_path / ".out.npz.partial", tmp_path / "out.npz"
    staged.write_bytes(b"x")
    target.mkdir()  # what an atomic save's os.replace meets when the output path is a folder
    with pytest.raises(click.ClickException) as info:
        run_guarded(False, False, lambda: os.replace(staged, target), ())
    assert info.value.message.startswith(f"{staged} -> {target}: ")
    assert "unexpected" not in info.value.message
