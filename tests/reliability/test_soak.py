"""Soak: one runtime, several threads, many streams for a while; results equal sequential
ones and resident memory stays flat. RMT_SOAK_SECONDS sets the duration (default 10)."""
import os
import threading
import time

import numpy as np
import pytest

from rmt_runtime import RMTRuntime


def resident_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


@pytest.mark.slow
def test_threads_and_streams_for_a_while(bundle_factory):
    seconds = float(os.environ.get("RMT_SOAK_SECONDS", "10"))
    model, exported = bundle_factory("gpt2", "fp32")
    runtime = RMTRuntime.load(exported.path)
    rng = np.random.default_rng(0)
    inputs = [rng.integers(0, model.config.vocab_size, int(n)) for n in rng.integers(1, 400, 12)]
    expected = [runtime.run(ids).memory for ids in inputs]
    failures, counts = [], [0] * 4

    def worker(index: int, until: float) -> None:
        local = np.random.default_rng(index)
        while time.monotonic() < until and not failures:
            pick = int(local.integers(len(inputs)))
            state = runtime.new_state()
            ids = inputs[pick]
            for chunk in np.array_split(ids, int(local.integers(1, 6))):
                runtime.feed(state, chunk)
            if not np.array_equal(runtime.flush(state).memory, expected[pick]):
                failures.append(pick)
            counts[index] += 1

    def soak(duration: float) -> None:
        until = time.monotonic() + duration
        threads = [threading.Thread(target=worker, args=(i, until)) for i in range(len(counts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    soak(min(3.0, seconds / 4))  # warm-up: allocator pools and ORT arenas reach their size
    before = resident_bytes()
    soak(seconds)
    growth = resident_bytes() - before
    assert failures == []
    assert sum(counts) > 100  # the soak really ran many streams
    assert growth < 30 << 20, f"resident memory grew {growth / 2**20:.1f} MB over {sum(counts)} streams"


@pytest.mark.slow
def test_generating_10k_tokens_runs_in_constant_memory(bundle_factory):
    """With rollover the cache never holds more than M + segment positions: resident memory
    sampled every 500 tokens stays flat from the first thousand tokens to the ten-thousandth."""
    _, exported = bundle_factory("gpt2", initializer_range=0.2)
    runtime = RMTRuntime.load(exported.path, backend="onnxruntime")
    from rmt_runtime import GenerationConfig

    state = runtime.new_state()
    config = GenerationConfig(max_new_tokens=10_000, temperature=1.0, seed=0)
    samples = {}
    for count, _ in enumerate(runtime.generate_stream(state, [1, 2, 3], config), start=1):
        if count % 500 == 0:
            samples[count] = resident_bytes()
    assert count == 10_000 and int(state.segments_done[0]) == (3 + 10_000 - 1) // runtime.segment_size
    growth = max(samples.values()) - samples[1000]
    assert growth < 10 * 2**20, {k: v // 2**20 for k, v in samples.items()}
