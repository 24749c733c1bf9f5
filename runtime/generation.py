"""KV-cached generation with memory, in constant memory past the segment.

How a decoder bundle generates (RMT_SEMANTICS.md, docs/GENERATION.md):
1. Context: the state's pending tokens plus the prompt. Every full segment but the last
   is read into memory (the ingest graph), as the reference code does before generating.
2. Prefill: the prefill graph reads ``[mem, last segment]`` (no write slots) and returns
   the next-token logits and a key/value cache; the caches stay on the backend's device.
3. Decode: one token at a time through the decode graph and the cache.
4. Rollover (default, this project's extension): when the segment is full, it is written
   into memory (the ingest graph, rows that filled only) and generation continues in a
   fresh segment ``[new mem, token]``, so the context, the cache and the cost per token
   never grow with the length of the conversation. ``rollover=False`` is the reference's
   behaviour: memory is not written while generating and the context grows until the
   backbone's position limit.

The state follows the text: after generating, its memory and pending tokens are what
feeding prompt + generated tokens would give, so generation and reading interleave freely.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

import numpy as np

from . import limits
from .errors import BackendError, RuntimeInputError
from .segments import full_segment, pad_rows, rows_of
from .spec import DECODE, INGEST, PREFILL
from .state import SequenceState

if TYPE_CHECKING:
    from .runtime import RMTRuntime


@dataclass(frozen=True)
class GenerationConfig:
    """How to pick tokens and when to stop.

    temperature 0 is greedy (top_k, top_p and seed then do nothing). repetition_penalty
    follows the usual rule (CTRL, Hugging Face): logits of tokens already in the row's
    prompt or output are divided by it when positive, multiplied when negative.
    use_cache=False recomputes the segment with the prefill graph for every token (the
    check that the cache changes nothing, and the baseline of the decode benchmark).
    """

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop_tokens: tuple[int, ...] = ()
    seed: int | None = None
    rollover: bool = True
    use_cache: bool = True

    def __post_init__(self) -> None:
        self.check()

    def check(self, vocab_size: int | None = None) -> None:
        """Every field's type and range, all problems in one error, before any work (stop
        tokens against the vocabulary when it is given: at generation)."""
        def is_int(value) -> bool:
            return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

        def is_number(value) -> bool:
            return isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and (
                isinstance(value, (int, np.integer)) or np.isfinite(value))  # an int of any size is finite

        problems = []
        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not is_number(self.temperature) or not self.temperature >= 0:
            problems.append(f"temperature must be a finite number >= 0 (0: greedy), got {self.temperature!r}")
        if not is_int(self.top_k) or self.top_k < 0:
            problems.append(f"top_k must be an int >= 0 (0: off), got {self.top_k!r}")
        if not is_number(self.top_p) or not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not is_number(self.repetition_penalty) or not self.repetition_penalty > 0:
            problems.append(f"repetition_penalty must be a finite number > 0 (1: off), got {self.repetition_penalty!r}")
        if self.seed is not None and (not is_int(self.seed) or self.seed < 0):
            problems.append(f"seed must be None or an int >= 0, got {self.seed!r}")
        for bound in (limits.MAX_NEW_TOKENS, limits.TOP_K, limits.TEMPERATURE, limits.REPETITION_PENALTY, limits.SEED):
            value = getattr(self, bound.name)  # upper bounds (rmt_runtime.limits): the ranges above are open
            if isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and value > bound.high:
                problems.append(f"{bound.name} must be at most {bound.high} ({bound.why}), got {limits.shown(value)}")
        for name in ("rollover", "use_cache"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name} must be True or False, got {getattr(self, name)!r}")
        stops = self.stop_tokens if isinstance(self.stop_tokens, (tuple, list)) else None
        if stops is None or not all(is_int(t) for t in stops):
            problems.append(f"stop_tokens must be a tuple of int token ids, got {self.stop_tokens!r}")
            stops = ()
        bad_stops = [t for t in stops if int(t) < 0 or (vocab_size is not None and int(t) >= vocab_size)]
        if bad_stops:
            vocabulary = "0.." + str(vocab_size - 1) if vocab_size is not None else "(ids are >= 0)"
            problems.append(f"stop tokens {bad_stops} are outside the vocabulary {vocabulary}")
        if problems:
            raise RuntimeInputError("; ".join(problems))


@dataclass
class Generation:
    """Generated token ids per row (stop tokens included) and the state after them."""

    tokens: list[list[int]]
    state: SequenceState = field(repr=False)


def penalized(logits: np.ndarray, histories: list[np.ndarray], penalty: float) -> np.ndarray:
    """Next-token logits [B, V] as float64 with the repetition penalty applied to each row's
    history (ids seen in its prompt or output)."""
    logits = np.array(logits, dtype=np.float64)
    if penalty != 1.0:
        for row, seen in enumerate(histories):
            if len(seen):
                ids = np.unique(seen)
                values = logits[row, ids]
                logits[row, ids] = np.where(values > 0, values / penalty, values * penalty)
    return logits


def sampling_distribution(values: np.ndarray, config: GenerationConfig) -> tuple[np.ndarray, np.ndarray]:
    """For one row's (penalized) logits [V], the tokens that may be sampled, most likely first,
    and their probabilities: temperature, then top_k, then top_p (Hugging Face's order)."""
    order = np.argsort(-values, kind="stable")
    if config.top_k:
        order = order[:config.top_k]
    kept = values[order]
    # Shift before scaling: with a tiny temperature (1e-310) the scaled logits overflow to
    # inf and inf - inf is NaN; shifted, they only go to -inf and the top token keeps 1.
    with np.errstate(over="ignore"):  # overflow to -inf is the intended limit: probability 0
        probs = np.exp((kept - kept.max()) / config.temperature)
    probs /= probs.sum()
    if config.top_p < 1.0:
        # The smallest prefix whose probability reaches top_p (the top token always stays).
        cutoff = int(np.searchsorted(np.cumsum(probs), config.top_p)) + 1
        order, probs = order[:cutoff], probs[:cutoff] / probs[:cutoff].sum()
    return order, probs


def choose_tokens(logits: np.ndarray, histories: list[np.ndarray], config: GenerationConfig,
                  rng: np.random.Generator) -> np.ndarray:
    """The next token of every row, [B] int64, from next-token logits [B, V]."""
    logits = penalized(logits, histories, config.repetition_penalty)
    if config.temperature == 0:
        return logits.argmax(axis=-1).astype(np.int64)
    chosen = np.empty(len(logits), np.int64)
    for row, values in enumerate(logits):
        order, probs = sampling_distribution(values, config)
        chosen[row] = order[min(int(np.searchsorted(np.cumsum(probs), rng.random())), len(order) - 1)]
    return chosen


class _Cache:
    """The decode graph's inputs between tokens: caches (backend handles), mask, row lengths."""

    def __init__(self, runtime: "RMTRuntime", state: SequenceState) -> None:
        self.runtime = runtime
        self.state = state
        self.m = runtime.bundle.cache_prefix
        self.handles: dict[str, object] = {}
        self.mask = np.zeros((state.batch, 0), np.int64)
        # present.i.* outputs become the next call's past.i.* inputs: the decode spec's state pairs.
        self._past_of = {present: past for past, present in runtime.bundle.graph_spec(DECODE).state.items()}
        # The state tensors each graph reads where they are (the RMT's prefill reads its memory;
        # an ARMT's prefill and decode read every layer's W_mem and z); never written here.
        self._reads = {graph: [name for name in runtime.runner.spec(graph).input_names if name in state.handles]
                       for graph in (PREFILL, DECODE)}

    def _state_inputs(self, graph: str) -> dict[str, object]:
        return {name: self.state.handles[name] for name in self._reads[graph]}

    def _keep(self, handles: dict[str, object]) -> None:
        self.handles = {self._past_of[name]: value for name, value in handles.items() if name in self._past_of}

    def prefill(self) -> np.ndarray:
        """Read every row's pending context afresh; returns the next-token logits [B, V]."""
        state, batch = self.state, self.state.batch
        # Rows still generating hold at most a segment here; a stopped row may hold one token
        # more (its stop token filled the segment) and only needs some valid input.
        ids, mask = pad_rows([p[-self.runtime.segment_size:] for p in state.pending])
        result = self.runtime.runner.run(PREFILL, {"input_ids": ids, "attention_mask": mask,
                                                   **self._state_inputs(PREFILL)}, ("last_logits",))
        self._keep(result.device)
        self.mask = np.concatenate([np.ones((batch, self.m), np.int64), mask], axis=1)
        return result.host["last_logits"]

    def decode(self, tokens: np.ndarray, active: np.ndarray) -> np.ndarray:
        """Append one token per row (inactive rows: masked out) and return the next logits."""
        state = self.state
        self.mask = np.concatenate([self.mask, active.astype(np.int64)[:, None]], axis=1)
        positions = np.array([[self.m + len(p) - 1] for p in state.pending], np.int64)
        result = self.runtime.runner.run(
            DECODE, {"input_ids": np.where(active, tokens, 0)[:, None].astype(np.int64),
                     "attention_mask": self.mask, "position_ids": positions, **self.handles,
                     **self._state_inputs(DECODE)}, ("logits",))
        self._keep(result.device)
        return result.host["logits"]


def _check_can_generate(runtime: "RMTRuntime") -> None:
    bundle = runtime.bundle
    if bundle.kind != "decoder":
        raise RuntimeInputError(f"bundle {bundle.path} is an encoder (classification); only decoders generate")
    if not bundle.has_generation:
        raise RuntimeInputError(f"bundle {bundle.path} has no prefill/decode graphs (exported with "
                                "--no-generation or by an older rmt-export); re-export it to generate")
    if not runtime.runner.supports_generation:
        raise BackendError(f"{runtime.runner.name} does not run the generation graphs; generate with the "
                           "onnxruntime backend")


def generate_tokens(runtime: "RMTRuntime", state: SequenceState, prompts,
                    config: GenerationConfig) -> Iterator[np.ndarray]:
    """The generator behind ``RMTRuntime.generate_stream``; checks everything before any work.
    The caller holds ``state`` from this call until the generator is done (the runtime's
    ``_holding_states`` does)."""
    if not state.in_use:
        raise RuntimeInputError("generate_tokens reads and writes a state its caller holds for the whole "
                                "generation: call RMTRuntime.generate_stream or RMTRuntime.generate")
    _check_can_generate(runtime)
    bundle, size = runtime.bundle, runtime.segment_size
    config.check(bundle.vocab_size)
    rows = rows_of(prompts, state.batch, bundle.vocab_size, "prompt")
    contexts = [np.concatenate([pending, row]) for pending, row in zip(state.pending, rows)]
    empty = [row for row, context in enumerate(contexts) if len(context) == 0]
    if empty:
        raise RuntimeInputError(f"rows {empty} have no context to generate from: give each row a prompt of at "
                                "least one token (or pending tokens in its state)")
    commits = [((len(c) - 1) // size) * size for c in contexts]
    longest = max(len(c) - k for c, k in zip(contexts, commits))
    limit = bundle.max_positions
    prefix = bundle.cache_prefix
    if not config.rollover and limit and prefix + longest + config.max_new_tokens > limit:
        raise RuntimeInputError(
            f"without rollover the context grows to {prefix} {'sink' if bundle.architecture == 'armt' else 'memory'} + "
            f"{longest} context + "
            f"{config.max_new_tokens} new tokens, past the backbone's {limit} positions: lower max_new_tokens "
            "or keep rollover on")
    if not config.use_cache and not config.rollover:
        raise RuntimeInputError("use_cache=False recomputes the segment with the prefill graph, which takes at "
                                "most segment_size tokens: it needs rollover")
    return _generate(runtime, state, rows, contexts, commits, config)


def _generate(runtime: "RMTRuntime", state: SequenceState, rows: list[np.ndarray], contexts: list[np.ndarray],
              commits: list[int], config: GenerationConfig) -> Iterator[np.ndarray]:
    size, batch = runtime.segment_size, state.batch
    # 1. Every full segment but the last into memory (the ingest graph, as feed does). A failure
    #    there leaves the prompt fed: what did not go into memory stays pending.
    state.pending = [context[:commit] for context, commit in zip(contexts, commits)]
    state.tokens_seen += np.array([len(row) for row in rows], np.int64)
    try:
        runtime._commit_full_segments(state)
    finally:
        state.pending = [np.concatenate([left, context[commit:]])
                         for left, context, commit in zip(state.pending, contexts, commits)]
    # 2. Prefill the last segment.
    cache = _Cache(runtime, state)
    logits = cache.prefill()
    rng = np.random.default_rng(config.seed)
    histories = [row.copy() for row in rows]
    active = np.ones(batch, bool)
    stops = np.array(sorted(set(int(t) for t in config.stop_tokens)), np.int64)
    for step in range(config.max_new_tokens):
        tokens = choose_tokens(logits, histories, config, rng)
        tokens = np.where(active, tokens, -1)
        for row in np.nonzero(active)[0]:
            state.pending[row] = np.append(state.pending[row], tokens[row])
            histories[row] = np.append(histories[row], tokens[row])
        state.tokens_seen += active
        emitted = active.copy()
        active &= ~np.isin(tokens, stops)
        yield tokens
        if not active.any() or step == config.max_new_tokens - 1:
            return
        # 3./4. The next logits: roll filled segments into memory, or decode one token.
        full = np.array([len(p) > size for p in state.pending]) & active
        if config.rollover and full.any():
            ids, mask = full_segment([p if f else p[:0] for p, f in zip(state.pending, full)], size)
            runtime._run_segment(state, ids, mask, INGEST, ())
            state.pending = [p[size:] if f else p for p, f in zip(state.pending, full)]
            logits = cache.prefill()
        elif not config.use_cache:
            logits = cache.prefill()
        else:
            logits = cache.decode(tokens, emitted & active)
