"""Typed errors of rmt_runtime: each says what was wrong and what was expected."""
import re


class BundleError(Exception):
    """A bundle that cannot be used: missing, malformed, from a newer schema, or altered."""


class RuntimeInputError(ValueError):
    """Input that the bundle cannot take: wrong dtype, shape, id range, mask, or non-finite memory."""


class BackendError(RuntimeError):
    """A backend or provider that cannot run, or that is not what was asked for."""


class EngineError(BackendError):
    """A TensorRT engine that cannot be built, or a cached one that does not fit this machine."""


class StateError(Exception):
    """A state file that cannot be restored: corrupt, of another version, or of another bundle."""


class StateInUseError(RuntimeError):
    """A SequenceState used from a second thread while one operation holds it."""


# OpenVINO stacks one line per C++ frame above the reason: "Exception from src/inference/src/cpp/core.cpp:132:",
# and "Check 'shape.compatible(...)' failed at src/plugins/intel_cpu/src/infer_request.cpp:385:".
_SOURCE_LOCATION = re.compile(r"^(Exception from \S+:\d+:|Check '.*' failed at \S+:\d+:)\s*")
# ONNX Runtime: "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions for input: ...".
_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : (\w+) : ")
MESSAGE_LIMIT = 1000


# TensorRT puts the C++ function and source file inside its messages: "(... In validate at
# /_src/optimizer/api/network.cpp:4023)", and "[checkMacros.cpp::catchCudaError::250] " ahead of some.
_INLINE_LOCATION = re.compile(r"(\(|\s*)\bIn [\w:~<>]+ at /\S+:\d+\s*")
_TRT_PREFIX = re.compile(r"^\[[\w.]+::\w+::\d+\] ")


def one_line(text: str) -> str:
    """A library's message on one line: OpenVINO's and TensorRT's source locations and ONNX
    Runtime's status-code prefix dropped, the lines of the reason joined, at most
    MESSAGE_LIMIT characters ("" when nothing is left)."""
    lines = []
    for line in str(text).splitlines():
        line = _TRT_PREFIX.sub("", _INLINE_LOCATION.sub(lambda m: m.group(1).strip(), line.strip())).strip()
        while True:  # a line can hold a location and the reason after it
            location = _SOURCE_LOCATION.match(line)
            if not location:
                break
            line = line[location.end():]
        if line:
            lines.append(_ORT_PREFIX.sub("", line))
    message = ""
    for line in lines:  # a line ending in ':' introduces the next; others are separate statements
        message += (" " if message.endswith((":", ",")) else "; " if message else "") + line
    return message if len(message) <= MESSAGE_LIMIT else message[:MESSAGE_LIMIT] + "..."


def library_message(exc: BaseException) -> str:
    """What a third-party library's exception says went wrong, on one line (``one_line``; the
    exception's type when it says nothing). The first line alone is often only a location,
    which never says what went wrong."""
    return one_line(str(exc)) or type(exc).__name__


__all__ = ["BundleError", "RuntimeInputError", "BackendError", "EngineError", "StateError", "StateInUseError",
           "library_message", "one_line"]
