"""Typed errors of rmt_model: each names what was wrong and what was expected."""


class RMTError(Exception):
    """Base class for every error rmt_model raises on purpose."""


class ConfigError(RMTError, ValueError):
    """An RMT configuration that cannot build a model (bad geometry, unknown backbone)."""


class CheckpointError(RMTError):
    """A file that is not a loadable rmt-edge or reference RMT checkpoint."""
