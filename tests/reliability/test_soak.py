"""Soak: one runtime, several threads, many streams; results equal sequential ones and resident
memory stays flat. RMT_SOAK_STREAMS sets how many streams the threads run together after the
warm-up (default 1200: about 10 s on 2 shared cores). A count, not a duration: what is checked
does not depend on the machine's speed."""
import os
import threading

import numpy as np
import pytest

from rmt_runtime import RMTRuntime


def resident_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


THREADS = 4


@pytest.mark.slow
def test_threads_and_streams_for_a_while(bundle_factory):
    """The one test of threads sharing a runtime: every stream, fed in 1-5 chunks from 4 threads
    at once, equals the same stream run alone, bit for bit, over many streams."""
    streams = int(os.environ.get("RMT_SOAK_STREAMS", "1200"))
    model, exported = bundle_factory("gpt2", "fp32")
    runtime = RMTRuntime.load(exported.path)
    rng = np.random.default_rng(0)
    inputs = [rng.integers(0, model.config.vocab_size, int(n)) for n in rng.integers(1, 400, 12)]
    expected = [runtime.run(ids).memory for ids in inputs]
    failures, counts = [], [0] * THREADS

    def worker(index: int, count: int) -> None:
        local = np.random.default_rng(index)
        for _ in range(count):
            pick = int(local.integers(len(inputs)))
            state = runtime.new_state()
            for chunk in np.array_split(inputs[pick], int(local.integers(1, 6))):
                runtime.feed(state, chunk)
            if not np.array_equal(runtime.flush(state).memory, expected[pick]):
                failures.append(pick)
            counts[index] += 1

    def soak(total: int) -> None:
        threads = [threading.Thread(target=worker, args=(i, total // THREADS)) for i in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    soak(max(THREADS, streams // 4))  # warm-up: allocator pools and ORT arenas reach their size
    counts[:] = [0] * THREADS
    before = resident_bytes()
    soak(streams)
    growth = resident_bytes() - before
    assert failures == []
    assert sum(counts) == streams // THREADS * THREADS  # no thread died on an exception
    # Measured: 0.01 MB over 1200 streams after the warm-up. 4 MB still catches small leaks: one
    # segment's logits (16 x 97 float32, 6 KB) kept per stream would be 7 MB.
    assert growth < 4 << 20, f"resident memory grew {growth / 2**20:.1f} MB over {streams} streams"


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
    # Measured: 0.33 MB from token 1000 to 10,000. A KV cache that kept every token (2 layers x
    # key and value x 32 float32 = 512 bytes a token) would grow 4.6 MB over those 9000 tokens.
    assert growth < 2 * 2**20, {k: v // 2**20 for k, v in samples.items()}
