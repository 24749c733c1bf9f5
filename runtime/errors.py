"""Typed errors of rmt_runtime: each says what was wrong and what was expected."""
from .bundle import BundleError


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


__all__ = ["BundleError", "RuntimeInputError", "BackendError", "EngineError", "StateError", "StateInUseError"]
