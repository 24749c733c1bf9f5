"""A stand-in for the onnxruntime module that lies about its providers, for testing the
runner's guard against a silent fallback on machines without a GPU."""


class OnnxRuntimeStandIn:
    """The real onnxruntime module, except for what it claims: ``available`` providers, and
    sessions that run on the CPU whatever they were asked for. That is onnxruntime-gpu when a
    CUDA library is missing (it lists CUDA, then silently runs on the CPU). It stands in for
    the session factory only: the runner's guard against that fallback is what is tested."""

    def __init__(self, available):
        import onnxruntime
        self._real, self._available = onnxruntime, list(available)

    def __getattr__(self, name):
        return getattr(self._real, name)

    def get_available_providers(self):
        return list(self._available)

    def InferenceSession(self, path, options=None, providers=None):  # noqa: N802 - onnxruntime's name
        return self._real.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def use_onnxruntime(monkeypatch, stand_in):
    import rmt_runtime.backends.onnxruntime as backend
    monkeypatch.setattr(backend, "import_onnxruntime", lambda: stand_in)
