"""Typed errors of rmt_export."""


class ExportError(Exception):
    """An export that cannot start or cannot finish; the message says what and why."""


class ValidationError(ExportError):
    """The exported graphs do not match PyTorch; ``misses`` lists every miss with its numbers."""

    def __init__(self, misses: list[str], report: dict | None = None) -> None:
        self.misses = misses
        self.report = report or {}
        shown = "\n  ".join(misses[:40])
        more = f"\n  ... and {len(misses) - 40} more" if len(misses) > 40 else ""
        super().__init__(f"validation failed: {len(misses)} miss(es)\n  {shown}{more}")
