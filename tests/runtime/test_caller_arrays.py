"""A caller's arrays are the caller's: no backend keeps a view of one, and none writes into one.

One test over (backend x public entry point that takes or returns arrays). Each entry point is
called with fresh arrays of its own, kept as copies; then (a) the arrays the caller passed are
unchanged, (b) the caller overwrites them (and every array the call returned) with garbage, and
the state goes on exactly as a run whose arrays were never touched. The audit's bug this class
comes from: ONNX Runtime's ``OrtValue.ortvalue_from_numpy`` keeps a view of the array on the CPU,
so ``new_state(memory=a)`` then ``a[:] = 0`` changed the state, and the first segment's
ping-pong wrote the new memory into ``a``.

Backends: ONNX Runtime's CPU provider, OpenVINO where it loads, and the TensorRT runner's own
control flow on the fakes of tests/fakes (its uploads go through the fake device memory); and
an ARMT on ONNX Runtime, whose state is 2 x L named tensors rather than one memory.
"""
import shutil

import numpy as np
import pytest

from rmt_runtime import RMTRuntime
from rmt_runtime.engines import BuildOptions, build_bundle_engines
from tests import fakes

GARBAGE_TOKEN = 3      # what the caller writes over ids after the call (a valid id: nothing may read it)
GARBAGE_FLOAT = 1e3    # what the caller writes over float arrays after the call
AFTER = np.arange(5, 29, dtype=np.int64)  # what every check feeds after the entry point, then flushes


@pytest.fixture(params=["onnxruntime", "onnxruntime-armt", "openvino", "tensorrt-fakes"])
def runtime(request, bundle_factory, armt_bundle_factory, tmp_path, monkeypatch):
    """A runtime of the tiny GPT-2 RMT (state: its memory) on each backend, and of the tiny ARMT
    (state: W_mem.{l} and z.{l} per layer) on ONNX Runtime."""
    if request.param == "onnxruntime-armt":
        return RMTRuntime.load(armt_bundle_factory("fp32")[1], backend="onnxruntime", provider="cpu")
    source = bundle_factory("gpt2", "fp32")[1].path
    if request.param == "onnxruntime":
        return RMTRuntime.load(source, backend="onnxruntime", provider="cpu")
    if request.param == "openvino":
        pytest.importorskip("openvino")
        return RMTRuntime.load(source, backend="openvino")
    fakes.install(monkeypatch)
    bundle_dir = tmp_path / "bundle"
    shutil.copytree(source, bundle_dir)
    build_bundle_engines(bundle_dir, BuildOptions(max_batch=4))
    return RMTRuntime.load(bundle_dir, backend="tensorrt")


def start_state(rt, prefix=""):
    """Every state tensor as no fresh state has it (the initial one plus a small positive ramp),
    float32 [1, ...], named ``prefix + name``."""
    initial = rt.state_tensors(rt.new_state())
    return {prefix + name: (value + np.linspace(0, 0.5, value.size, dtype=np.float32).reshape(value.shape)
                            ).astype(np.float32) for name, value in initial.items()}


def state_from(rt, arrays, prefix=""):
    """``new_state(state=...)`` from the caller's arrays (``new_state_memory`` tests ``memory=``)."""
    return rt.new_state(state={name: arrays[prefix + name] for name in rt.state_pairs})


def ids(rt, shape, seed=0):
    return np.random.default_rng(seed).integers(4, rt.bundle.vocab_size, shape, dtype=np.int64)


def needs_generation(rt):
    if not rt.runner.supports_generation:
        pytest.skip(f"{rt.runner.name} does not run the generation graphs")


# Each entry point: (rt) -> (arrays the caller passes, call) where call(arrays) -> (state, returned arrays).
def new_state_memory(rt):
    if "memory" not in rt.state_pairs:
        pytest.skip(f"memory= is the RMT's memory; this bundle's state is {sorted(rt.state_pairs)}")
    return start_state(rt), lambda a: (rt.new_state(memory=a["memory"]), [])


def new_state_state(rt):
    return start_state(rt), lambda a: (state_from(rt, a), [])


def run_padded(rt):
    arrays = {"ids": ids(rt, (2, 40)), "mask": np.ones((2, 40), np.int64)}
    arrays["mask"][1, 30:] = 0

    def call(a):
        out = rt.run(a["ids"], a["mask"], return_logits=True)
        # The returned arrays are the caller's too: a state made from them, then they are overwritten.
        state = rt.new_state(state={name: value[:1].copy() for name, value in out.state.items()})
        return state, [*out.state.values(), out.last_logits, out.logits]
    return arrays, call


def run_continuing(rt):
    arrays = {**start_state(rt), "ids": ids(rt, (1, 37))}

    def call(a):
        state = state_from(rt, a)
        out = rt.run(a["ids"], state=state)
        return state, [*out.state.values(), out.last_logits]
    return arrays, call


def feed_then_peek(rt):
    arrays = {**start_state(rt), "tokens": ids(rt, 37)}

    def call(a):
        state = state_from(rt, a)
        rt.feed(state, a["tokens"])
        out = rt.peek(state)
        return state, [*out.state.values(), out.last_logits]
    return arrays, call


def feed_then_flush(rt):
    arrays = {**start_state(rt), "tokens": ids(rt, 37)}

    def call(a):
        state = state_from(rt, a)
        rt.feed(state, a["tokens"])
        out = rt.flush(state)
        return state, [*out.state.values(), out.last_logits]
    return arrays, call


def read_outs(rt):
    arrays = {**start_state(rt), "tokens": ids(rt, 20)}

    def call(a):
        state = state_from(rt, a)
        rt.feed(state, a["tokens"])
        memory = [rt.memory(state)] if "memory" in rt.state_pairs else []
        return state, [*memory, *rt.state_tensors(state).values()]
    return arrays, call


def stack_unstack(rt):
    arrays = {**start_state(rt, "first:"), **{k: v[..., ::-1].copy() for k, v in start_state(rt, "second:").items()},
              "tokens": ids(rt, (2, 21))}

    def call(a):
        stacked = rt.stack([state_from(rt, a, "first:"), state_from(rt, a, "second:")])
        rt.feed(stacked, a["tokens"])
        return rt.unstack(stacked)[1], []
    return arrays, call


def save_restore(rt, tmp_path):
    arrays = {**start_state(rt), "tokens": ids(rt, 21)}

    def call(a):
        state = state_from(rt, a)
        rt.feed(state, a["tokens"])
        path = tmp_path / f"state-{len(list(tmp_path.iterdir()))}.npz"
        rt.save_state(state, path)
        return rt.restore_state(path), []
    return arrays, call


def generate(rt):
    needs_generation(rt)
    arrays = {**start_state(rt), "prompt": ids(rt, 21)}

    def call(a):
        from rmt_runtime import GenerationConfig

        result = rt.generate(a["prompt"], GenerationConfig(max_new_tokens=4), state=state_from(rt, a))
        return result.state, []
    return arrays, call


def generate_stream(rt):
    needs_generation(rt)
    arrays = {**start_state(rt), "prompt": ids(rt, 21)}

    def call(a):
        from rmt_runtime import GenerationConfig

        state = state_from(rt, a)
        tokens = [t.copy() for t in rt.generate_stream(state, a["prompt"], GenerationConfig(max_new_tokens=4))]
        return state, tokens
    return arrays, call


ENTRY_POINTS = {f.__name__: f for f in (new_state_memory, new_state_state, run_padded, run_continuing,
                                        feed_then_peek, feed_then_flush, read_outs, stack_unstack, save_restore,
                                        generate, generate_stream)}


def garbage(array):
    array[...] = GARBAGE_TOKEN if np.issubdtype(array.dtype, np.integer) else GARBAGE_FLOAT


def continued(rt, state):
    """Every state tensor and the last logits after feeding AFTER and flushing."""
    rt.feed(state, AFTER)
    out = rt.flush(state)
    return {**out.state, "last_logits": out.last_logits}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_the_runtime_never_writes_into_nor_keeps_a_view_of_a_callers_array(runtime, entry, tmp_path):
    make = ENTRY_POINTS[entry]
    args = (runtime, tmp_path) if entry == "save_restore" else (runtime,)
    # The same call with arrays nobody touches afterwards: what the state must continue as.
    untouched, call = make(*args)
    expected = continued(runtime, call(untouched)[0])

    arrays, call = make(*args)
    kept = {name: value.copy() for name, value in arrays.items()}
    state, returned = call(arrays)
    for name, value in arrays.items():  # (a) nothing written into the caller's arrays
        np.testing.assert_array_equal(value, kept[name], err_msg=f"{entry} wrote into the caller's {name}")
    returned = list({id(v): v for v in returned if v is not None}.values())
    returned_kept = [value.copy() for value in returned]
    for value in arrays.values():  # (b) the caller's arrays are the caller's to overwrite
        garbage(value)
    for value, before in zip(returned, returned_kept):
        np.testing.assert_array_equal(value, before, err_msg=f"{entry}: a returned array is a view of an input")
        garbage(value)
    for name, value in continued(runtime, state).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=f"{entry}: {name} read a caller's array later")
