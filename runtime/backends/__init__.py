"""Backends behind one runner interface; heavy imports happen inside the backend asked for."""
from __future__ import annotations

from ..bundle import Bundle
from ..errors import BackendError
from .base import Runner

BACKENDS = ("auto", "onnxruntime", "openvino", "tensorrt")
# Best first. The native TensorRT backend is explicit only (it may build engines for minutes).
_AUTO_ORDER = ("tensorrt", "cuda", "cpu")


def open_runner(bundle: Bundle, backend: str = "auto", provider: str | None = None,
                threads: int | None = None, cuda_graphs: bool = False, engine_options=None,
                precision: str | None = None) -> tuple[Runner, str]:
    """The runner for ``backend``/``provider``, activated, and a sentence saying what was picked and why.

    An explicit backend or provider that cannot run is an error; only ``auto`` moves on
    to the next candidate, and says which ones it skipped. ``cuda_graphs``: the native
    TensorRT backend captures and replays full segments (an error for any other backend).
    ``engine_options`` (a ``BuildOptions``): the native TensorRT backend loads the engines
    built with exactly these options; by default, the newest set built for this machine.
    ``precision``: what the openvino backend computes an fp32 bundle in (``fp32``, ``bf16``);
    every other backend computes in the bundle's own precision, and asking one for another
    is an error.
    """
    if backend == "torch":
        raise BackendError("the PyTorch reference backend is part of the export stack (it needs torch and the "
                           "checkpoint): rmt_export.reference_backend.reference_runtime(bundle, checkpoint)")
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}: expected one of {BACKENDS}")
    for feature, value in (("cuda_graphs", cuda_graphs), ("engine_options", engine_options)):
        if value and backend != "tensorrt":
            raise BackendError(f"{feature} is a feature of the native tensorrt backend, not of {backend!r}")
    if backend == "openvino":
        if provider is not None:
            raise BackendError(f"provider {provider!r} is an onnxruntime provider; the openvino backend runs on the CPU")
        from .openvino import OpenVinoRunner

        runner = OpenVinoRunner(bundle, precision or "fp32", threads=threads)
        return runner.activate(), f"{runner.name} (asked for)"
    if precision is not None and precision != bundle.precision:
        raise BackendError(f"the {backend} backend computes in the bundle's own precision ({bundle.precision}), not "
                           f"{precision}: for bf16 on the CPU use backend 'openvino' with an fp32 bundle, for "
                           "another precision export it (rmt-export --fp16 / --int8)")
    if backend == "tensorrt":
        from .tensorrt import TensorRTRunner

        builder = engine_options.builder if engine_options is not None else "tensorrt"
        runner = TensorRTRunner(bundle, builder=builder, engine_options=engine_options, cuda_graphs=cuda_graphs)
        runner.activate()
        return runner, f"{runner.name} (asked for; {runner.engines.describe()})"

    from .onnxruntime import OnnxRuntimeRunner

    if backend == "onnxruntime" or provider is not None:
        runner = OnnxRuntimeRunner(bundle, provider or "cpu", threads=threads)
        return runner.activate(), f"{runner.name} (asked for)"
    skipped = []
    for candidate in _AUTO_ORDER:
        try:
            runner = OnnxRuntimeRunner(bundle, candidate, threads=threads).activate()
        except BackendError as exc:
            skipped.append(f"{candidate}: {str(exc).split(' (available')[0]}")
            continue
        reason = f"{runner.name} (auto: best available" + (f"; skipped {' | '.join(skipped)})" if skipped else ")")
        return runner, reason
    raise BackendError("no backend can run this bundle: " + " | ".join(skipped))


__all__ = ["BACKENDS", "Runner", "open_runner"]
