"""A caller's arrays are the caller's: no backend keeps a view of one, and none writes into one.

One test over (backend x public entry point that takes or returns arrays). Each entry point is
called with fresh arrays of its own, kept as copies; then (a) the arrays the caller passed are
unchanged, (b) the caller overwrites them (and every array the call returned) with garbage, and
the state goes on exactly as a run whose arrays were never touched. The audit's bug this class
comes from: ONNX Runtime's ``OrtValue.ortvalue_from_numpy`` keeps a view of the array on the CPU,
so ``new_state(memory=a)`` then ``a[:] = 0`` changed the state, and the first segment's
ping-pong wrote the new memory into ``a``.

Backends: ONNX Runtime's CPU provider, OpenVINO where it loads, and the TensorRT runner's own
control flow on the fakes of tests/fakes (its uploads go through the fake device memory).
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


@pytest.fixture(params=["onnxruntime", "openvino", "tensorrt-fakes"])
def runtime(request, bundle_factory, tmp_path, monkeypatch):
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


def start_memory(rt, batch=1):
    """A memory no fresh state has (the initial one plus a ramp), float32 [B, M, D]."""
    initial = rt.memory(rt.new_state(batch))
    return (initial + np.linspace(-0.5, 0.5, initial.size, dtype=np.float32).reshape(initial.shape)).astype(
        np.float32)


def ids(rt, shape, seed=0):
    return np.random.default_rng(seed).integers(4, rt.bundle.vocab_size, shape, dtype=np.int64)


def needs_generation(rt):
    if not rt.runner.supports_generation:
        pytest.skip(f"{rt.runner.name} does not run the generation graphs")


# Each entry point: (rt) -> (arrays the caller passes, call) where call(arrays) -> (state, returned arrays).
def new_state_memory(rt):
    return {"memory": start_memory(rt)}, lambda a: (rt.new_state(memory=a["memory"]), [])


def new_state_state(rt):
    return {"memory": start_memory(rt)}, lambda a: (rt.new_state(state={"memory": a["memory"]}), [])


def run_padded(rt):
    arrays = {"ids": ids(rt, (2, 40)), "mask": np.ones((2, 40), np.int64)}
    arrays["mask"][1, 30:] = 0

    def call(a):
        out = rt.run(a["ids"], a["mask"], return_logits=True)
        state = rt.new_state(memory=out.memory[:1].copy())  # the returned arrays are the caller's too
        return state, [out.memory, out.last_logits, out.logits]
    return arrays, call


def run_continuing(rt):
    arrays = {"memory": start_memory(rt), "ids": ids(rt, (1, 37))}

    def call(a):
        state = rt.new_state(memory=a["memory"])
        out = rt.run(a["ids"], state=state)
        return state, [out.memory, out.last_logits]
    return arrays, call


def feed_then_peek(rt):
    arrays = {"memory": start_memory(rt), "tokens": ids(rt, 37)}

    def call(a):
        state = rt.new_state(memory=a["memory"])
        rt.feed(state, a["tokens"])
        out = rt.peek(state)
        return state, [out.memory, out.last_logits, *out.state.values()]
    return arrays, call


def feed_then_flush(rt):
    arrays = {"memory": start_memory(rt), "tokens": ids(rt, 37)}

    def call(a):
        state = rt.new_state(memory=a["memory"])
        rt.feed(state, a["tokens"])
        out = rt.flush(state)
        return state, [out.memory, out.last_logits]
    return arrays, call


def read_outs(rt):
    arrays = {"memory": start_memory(rt), "tokens": ids(rt, 20)}

    def call(a):
        state = rt.new_state(memory=a["memory"])
        rt.feed(state, a["tokens"])
        return state, [rt.memory(state), *rt.state_tensors(state).values()]
    return arrays, call


def stack_unstack(rt):
    arrays = {"first": start_memory(rt), "second": start_memory(rt)[:, ::-1].copy(), "tokens": ids(rt, (2, 21))}

    def call(a):
        stacked = rt.stack([rt.new_state(memory=a["first"]), rt.new_state(memory=a["second"])])
        rt.feed(stacked, a["tokens"])
        return rt.unstack(stacked)[1], []
    return arrays, call


def save_restore(rt, tmp_path):
    arrays = {"memory": start_memory(rt), "tokens": ids(rt, 21)}

    def call(a):
        state = rt.new_state(memory=a["memory"])
        rt.feed(state, a["tokens"])
        path = tmp_path / f"state-{len(list(tmp_path.iterdir()))}.npz"
        rt.save_state(state, path)
        return rt.restore_state(path), []
    return arrays, call


def generate(rt):
    needs_generation(rt)
    arrays = {"memory": start_memory(rt), "prompt": ids(rt, 21)}

    def call(a):
        from rmt_runtime import GenerationConfig

        result = rt.generate(a["prompt"], GenerationConfig(max_new_tokens=4), state=rt.new_state(memory=a["memory"]))
        return result.state, []
    return arrays, call


def generate_stream(rt):
    needs_generation(rt)
    arrays = {"memory": start_memory(rt), "prompt": ids(rt, 21)}

    def call(a):
        from rmt_runtime import GenerationConfig

        state = rt.new_state(memory=a["memory"])
        tokens = [t.copy() for t in rt.generate_stream(state, a["prompt"], GenerationConfig(max_new_tokens=4))]
        return state, tokens
    return arrays, call


ENTRY_POINTS = {f.__name__: f for f in (new_state_memory, new_state_state, run_padded, run_continuing,
                                        feed_then_peek, feed_then_flush, read_outs, stack_unstack, save_restore,
                                        generate, generate_stream)}


def garbage(array):
    array[...] = GARBAGE_TOKEN if np.issubdtype(array.dtype, np.integer) else GARBAGE_FLOAT


def continued(rt, state):
    rt.feed(state, AFTER)
    out = rt.flush(state)
    return out.memory, out.last_logits


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
    returned = list({id(v): v for v in returned if v is not None}.values())  # Output.memory is state["memory"]
    returned_kept = [value.copy() for value in returned]
    for value in arrays.values():  # (b) the caller's arrays are the caller's to overwrite
        garbage(value)
    for value, before in zip(returned, returned_kept):
        np.testing.assert_array_equal(value, before, err_msg=f"{entry}: a returned array is a view of an input")
        garbage(value)
    memory, logits = continued(runtime, state)
    np.testing.assert_array_equal(memory, expected[0], err_msg=f"{entry}: the state read a caller's array later")
    np.testing.assert_array_equal(logits, expected[1])
