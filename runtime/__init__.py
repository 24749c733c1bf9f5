"""rmt_runtime: runs an exported RMT bundle segment by segment.

Needs numpy and one backend (onnxruntime; tensorrt + cuda-python), never torch: heavy
imports happen inside the backend asked for. It imports nothing of rmt_model or rmt_export.

    from rmt_runtime import RMTRuntime
    rt = RMTRuntime.load("model-fp32")            # verifies the bundle; rt.picked says what runs
    out = rt.run(ids)                              # out.memory [B, M, D], out.last_logits
    state = rt.new_state(); rt.feed(state, chunk); rt.flush(state)   # streaming
    rt.generate(prompt_ids, GenerationConfig(max_new_tokens=64)).tokens  # decoder bundles
"""
from .bundle import Bundle, BundleError
from .errors import BackendError, EngineError, RuntimeInputError, StateError
from .generation import Generation, GenerationConfig
from .runtime import Output, RMTRuntime
from .state import SequenceState

__all__ = ["Bundle", "BundleError", "BackendError", "EngineError", "RuntimeInputError", "StateError", "Output",
           "Generation", "GenerationConfig", "RMTRuntime", "SequenceState"]
