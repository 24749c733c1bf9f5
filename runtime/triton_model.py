"""Serve a bundle from Triton's Python backend: sequences keyed by correlation id.

``rmt-triton --kind python`` writes a model repository whose ``model.py`` only imports
``TritonPythonModel`` from here, so the server process runs ``RMTRuntime`` (ONNX Runtime)
and nothing else of rmt-edge. The sequence batcher routes every request of a sequence to
the same model instance and adds the control inputs START, END, READY and CORRID.

Why the model keeps the memory itself: Triton's implicit state needs the backend to call
TRITONBACKEND_StateNew/StateUpdate, which the Python backend (Triton 2.51, nvidia-pytriton
0.7.0) never does. It accepts a ``sequence_batching.state`` section and passes the initial
state in, but an output state returned by ``model.py`` is dropped, so every request would
see the initial memory again (measured; docs/SCALING.md). So each instance holds one
``SequenceState`` per live correlation id (``SequenceTable``): memory plus the tokens of
the partial segment, created at START, dropped at END or after
``max_sequence_idle_microseconds`` without a request, as Triton drops the sequence.

A request carries a chunk of token ids of any length (>= 1). Full segments run into memory;
a partial one waits for more tokens (``RMTRuntime.feed``). Each response holds
``last_logits`` (the logits at the chunk's last token, as if the input ended there) and, when
the client asks for them, ``memory`` (the memory as if the input ended there: at END the
final memory) and ``resume_memory`` + ``tokens_seen`` (the memory after the last full
segment and the token count: with the partial segment's tokens, which the client sent,
that resumes the sequence exactly; ``rmt_runtime.triton_client`` writes it as a state file).
A START request may carry ``start_memory`` to continue a saved sequence.

The state itself may be any named state pairs of the bundle (``Bundle.state_pairs``): the RMT's
``memory``, or an ARMT's ``W_mem.{l}``/``z.{l}`` per layer. Sequences, batching and END work the
same for every one; the tensors ``start_memory``, ``memory`` and ``resume_memory`` are the RMT's
memory and exist only for a bundle that has one (an ARMT's state, 2 x L tensors, stays in the
server: ``rmt-triton`` leaves them out of its config and the client refuses to save or resume it).

Requests of different sequences in one ``execute`` run as rows of one batch (their states
stacked); a row's result is bit-identical to running that sequence alone (tests/triton).
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import RuntimeInputError
from .runtime import MEMORY, RMTRuntime
from .schema import DocumentError, check_triton_parameters
from .segments import rows_of
from .state import SequenceState

# Tensor names of the served model (rmt_export.triton writes them into config.pbtxt).
INPUT_IDS = "input_ids"
START_MEMORY = "start_memory"
LAST_LOGITS = "last_logits"
MEMORY_OUT = "memory"
RESUME_MEMORY = "resume_memory"
TOKENS_SEEN = "tokens_seen"
CONTROLS = ("START", "END", "READY", "CORRID")
BUNDLE_FOLDER = "bundle"          # <model>/<version>/bundle: the copied bundle
LIVE_METRIC = "rmt_live_sequences"


class SequenceRequestError(ValueError):
    """A request the model refuses; the message goes to the client."""


@dataclass(frozen=True)
class ChunkRequest:
    """One checked request: a chunk of one sequence."""

    sequence_id: int
    start: bool
    end: bool
    ids: np.ndarray                       # [n] int64, n >= 1, inside the vocabulary
    outputs: frozenset[str]               # the outputs the client asked for
    start_memory: np.ndarray | None = None  # [M, D] float32, START only


@dataclass(frozen=True)
class ChunkResult:
    last_logits: np.ndarray               # [V] float32
    memory: np.ndarray | None             # [M, D]: as if the input ended at this chunk
    resume_memory: np.ndarray | None      # [M, D]: after the last full segment
    tokens_seen: int


class SequenceTable:
    """The live sequences of one model instance: correlation id -> ``SequenceState`` (batch 1).

    Not tied to Triton (tests drive it directly). ``execute`` runs the chunks of different
    sequences together; a failure leaves every stored state as it was (rows are stacked
    into copies, stored back only on success). ``idle_seconds``: a sequence without a
    request for longer is dropped by ``drop_idle`` (Triton's max_sequence_idle_microseconds).
    """

    def __init__(self, runtime: RMTRuntime, idle_seconds: float, clock: Callable[[], float] = time.monotonic):
        if runtime.kind != "decoder":
            raise RuntimeInputError(f"the Triton Python model serves decoder bundles; this bundle is a {runtime.kind} "
                                    f"with state {sorted(runtime.state_pairs)}")
        self.runtime = runtime
        self.idle_seconds = float(idle_seconds)
        self.clock = clock
        self._states: dict[int, SequenceState] = {}
        self._last_used: dict[int, float] = {}
        self._lock = threading.Lock()
        # The RMT's memory travels in START_MEMORY/MEMORY_OUT/RESUME_MEMORY; a model without one (an
        # ARMT: 2 x L per-layer state tensors) keeps its state server-side only (None here).
        self.memory_shape = runtime.state_shapes.get(MEMORY)
        self.outputs = frozenset({LAST_LOGITS, TOKENS_SEEN} | (
            {MEMORY_OUT, RESUME_MEMORY} if self.memory_shape is not None else set()))

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, sequence_id: int) -> bool:
        return sequence_id in self._states

    # ---- checks of one request (before any work) -------------------------------------------
    def check(self, sequence_id: int, start: bool, end: bool, ids, outputs, start_memory=None) -> ChunkRequest:
        """A ``ChunkRequest`` or ``SequenceRequestError`` saying what was wrong and what is expected."""
        where = f"sequence {sequence_id}"
        ids = np.asarray(ids)
        if ids.dtype != np.int64:
            raise SequenceRequestError(f"{where}: {INPUT_IDS} must be INT64 token ids, got {ids.dtype}")
        if ids.ndim == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.ndim != 1:
            raise SequenceRequestError(f"{where}: {INPUT_IDS} must be [1, n] (one chunk per request), got "
                                       f"{list(ids.shape)}")
        if ids.size == 0:
            raise SequenceRequestError(f"{where}: {INPUT_IDS} is empty; every request carries at least one token "
                                       "(send END with the last chunk)")
        try:
            (ids,) = rows_of(ids, 1, self.runtime.bundle.vocab_size, "chunk")
        except RuntimeInputError as exc:
            raise SequenceRequestError(f"{where}: {exc}") from None
        if start_memory is not None and self.memory_shape is None:
            raise SequenceRequestError(f"{where}: {START_MEMORY} is the RMT's memory; this model's state is "
                                       f"{self._state_names()}, which it keeps server-side only")
        if start_memory is not None:
            if not start:
                raise SequenceRequestError(f"{where}: {START_MEMORY} seeds a new sequence; send it only with START")
            start_memory = np.asarray(start_memory)
            if start_memory.ndim == 3 and start_memory.shape[0] == 1:
                start_memory = start_memory[0]
            if start_memory.dtype != np.float32 or start_memory.shape != self.memory_shape:
                raise SequenceRequestError(f"{where}: {START_MEMORY} must be FP32 {list(self.memory_shape)}, got "
                                           f"{start_memory.dtype} {list(start_memory.shape)}")
            if not np.isfinite(start_memory).all():
                raise SequenceRequestError(f"{where}: {START_MEMORY} holds NaN or Inf")
        unknown = sorted(set(outputs) - self.outputs)
        if unknown:
            raise SequenceRequestError(f"{where}: unknown outputs {unknown} (this model has {sorted(self.outputs)})")
        return ChunkRequest(int(sequence_id), bool(start), bool(end), ids, frozenset(outputs), start_memory)

    def _state_names(self) -> str:
        names = sorted(self.runtime.state_pairs)
        return f"{names}" if len(names) <= 4 else f"{len(names)} tensors ({names[0]}, {names[1]}, ...)"

    # ---- running -----------------------------------------------------------------------------
    def execute(self, requests: list[ChunkRequest]) -> list[ChunkResult | Exception]:
        """Run checked requests; one result or exception per request, in order. Chunks of the
        same sequence (never batched together by Triton) run one after the other."""
        results: list[ChunkResult | Exception | None] = [None] * len(requests)
        with self._lock:
            pending = list(range(len(requests)))
            while pending:  # rounds of distinct sequences, in arrival order
                seen, this_round, later = set(), [], []
                for index in pending:
                    sequence_id = requests[index].sequence_id
                    (later if sequence_id in seen else this_round).append(index)
                    seen.add(sequence_id)
                self._run_round([requests[i] for i in this_round], this_round, results)
                pending = later
        return results  # type: ignore[return-value]

    def _run_round(self, requests: list[ChunkRequest], indices: list[int], results: list) -> None:
        rows, states = [], []
        for index, request in zip(indices, requests):
            if request.start:
                memory = None if request.start_memory is None else request.start_memory[None]
                states.append(self.runtime.new_state(1, memory=memory))
            elif request.sequence_id in self._states:
                states.append(self._states[request.sequence_id])
            else:
                results[index] = SequenceRequestError(
                    f"sequence {request.sequence_id} has no state in this model instance: it was not started "
                    f"(sequence_start=True), it ended, or it was idle longer than max_sequence_idle_microseconds "
                    f"({self.idle_seconds:g} s) and was dropped; start it again, from a saved state if you have one")
                continue
            rows.append((index, request))
        if rows:
            try:
                outcomes = self._run_rows([r for _, r in rows], states)
            except Exception as exc:  # noqa: BLE001 - every row gets the error; stored states are untouched
                outcomes = [exc] * len(rows)
            now = self.clock()
            for (index, request), outcome in zip(rows, outcomes):
                results[index] = outcome if isinstance(outcome, Exception) else outcome[0]
                if not isinstance(outcome, Exception) and not request.end:
                    self._states[request.sequence_id] = outcome[1]
                    self._last_used[request.sequence_id] = now
        for index, request in zip(indices, requests):
            if isinstance(results[index], Exception):
                self._refused(request.sequence_id, request.start, request.end)
            elif request.end:  # Triton forgets the sequence, so does the model
                self.forget(request.sequence_id)

    def refused(self, sequence_id: int, start: bool, end: bool) -> None:
        """What a request refused before it reached ``execute`` (its input failed ``check``) does
        to the table: the same as any refused request (``_refused``)."""
        with self._lock:
            self._refused(sequence_id, start, end)

    def _refused(self, sequence_id: int, start: bool, end: bool) -> None:
        """The one place a refused request changes the table. Triton acts on its controls whether or
        not the model refused it: END ends the sequence (its state is freed); START began a new
        sequence of that id, which has no state yet (an earlier one's state must not be continued).
        Any other refused request leaves its sequence as it was, as if it was never sent."""
        if start or end:
            self.forget(sequence_id)

    def _run_rows(self, requests: list[ChunkRequest], states: list[SequenceState]
                  ) -> list[tuple[ChunkResult, SequenceState]]:
        """Full segments of all rows as one batch; then each row's partial segment (the logits at
        its last token, the memory as if its input ended there) in batches of rows with partial
        segments of the same length, so every row's numbers are bit-identical to running it
        alone (a wider padded batch changes the matmuls' shapes and so their rounding)."""
        rt = self.runtime
        batch = rt.stack(states)  # copies: the stored states change only when everything ran
        rt.feed(batch, [r.ids for r in requests])
        parts = rt.unstack(batch)
        by_width: dict[int, list[int]] = {}
        for row, part in enumerate(parts):
            by_width.setdefault(len(part.pending[0]), []).append(row)
        ended: list[Any] = [None] * len(parts)
        for rows in by_width.values():
            group = parts[rows[0]] if len(rows) == 1 else rt.stack([parts[r] for r in rows])
            output = rt.peek(group)  # as if each row's input ended at its chunk; the state is unchanged
            for position, row in enumerate(rows):
                ended[row] = (output.last_logits[position],
                              None if output.memory is None else output.memory[position])
        out = []
        for row, request in enumerate(requests):
            part = parts[row]
            result = ChunkResult(
                last_logits=ended[row][0],
                memory=ended[row][1] if MEMORY_OUT in request.outputs else None,
                resume_memory=rt.memory(part)[0] if RESUME_MEMORY in request.outputs else None,
                tokens_seen=int(part.tokens_seen[0]))
            out.append((result, part))
        return out

    # ---- lifetime ------------------------------------------------------------------------------
    def forget(self, sequence_id: int) -> bool:
        self._last_used.pop(sequence_id, None)
        return self._states.pop(sequence_id, None) is not None

    def drop_idle(self) -> list[int]:
        """Drop the sequences without a request for longer than ``idle_seconds``; their ids."""
        with self._lock:
            now = self.clock()
            idle = [sid for sid, used in self._last_used.items() if now - used > self.idle_seconds]
            for sequence_id in idle:
                self.forget(sequence_id)
            return idle

    def seconds_to_next_expiry(self) -> float:
        """How long until the next sequence can become idle (``idle_seconds`` when none is live)."""
        with self._lock:
            if not self._last_used:
                return self.idle_seconds
            return max(0.0, min(self._last_used.values()) + self.idle_seconds - self.clock())


def check_numpy_for_python_backend(version: str, allowed: bool) -> None:
    """Triton 2.51's Python backend stub (nvidia-pytriton 0.7.0) is built against numpy 1: under
    numpy 2 the output tensors it sends are empty (measured), so refuse to load instead."""
    if int(version.split(".")[0]) >= 2 and not allowed:
        raise RuntimeError(f"numpy {version} in the server's Python environment: the Python backend of Triton 2.51 "
                           "(nvidia-pytriton 0.7.0) sends empty output tensors under numpy 2; install numpy<2 "
                           "there (nvidia-pytriton requires it), or, for a Python backend built for numpy 2, set the "
                           "model parameter rmt.allow_numpy2 to \"true\"")


# The longest idle time a sequence may be kept (Triton's max_sequence_idle_microseconds): a day.
MAX_IDLE_MICROSECONDS = 86_400_000_000


@dataclass(frozen=True)
class ModelSettings:
    """What the Python model reads from its config.pbtxt, checked: the ``rmt.*`` parameters
    (rmt_runtime.schema.TritonParametersDoc) and the sequence batcher's settings."""

    threads: int
    provider: str
    allow_numpy2: bool
    idle_seconds: float
    segment_size: int | None
    bundle_identity: str | None


def model_settings(config: Any) -> ModelSettings:
    """The model config's settings, checked before anything loads; RuntimeError naming what is wrong."""
    try:
        parameters = check_triton_parameters(config)
    except DocumentError as exc:
        raise RuntimeError(str(exc)) from None
    batching = config.get("sequence_batching")
    if not isinstance(batching, dict):
        raise RuntimeError("this model needs sequence_batching in its config.pbtxt (rmt-triton --kind python "
                           "writes it): sequences are routed by correlation id")
    controls = batching.get("control_input", [])
    declared = {c.get("name") for c in controls if isinstance(c, dict)} if isinstance(controls, list) else set()
    missing = [name for name in CONTROLS if name not in declared]
    if missing:
        raise RuntimeError(f"sequence_batching must declare the control inputs {list(CONTROLS)}; missing {missing}")
    idle = batching.get("max_sequence_idle_microseconds") or 1_000_000
    try:
        idle_us = int(idle)
    except (TypeError, ValueError):
        idle_us = -1
    if isinstance(idle, bool) or not 1 <= idle_us <= MAX_IDLE_MICROSECONDS or str(idle_us) != str(idle).strip():
        raise RuntimeError(f"sequence_batching.max_sequence_idle_microseconds is {idle!r}; expected an integer from "
                           f"1 to {MAX_IDLE_MICROSECONDS}")
    return ModelSettings(threads=int(parameters.threads), provider=parameters.provider,
                         allow_numpy2=parameters.allow_numpy2 == "true", idle_seconds=idle_us / 1e6,
                         segment_size=int(parameters.segment_size) if parameters.segment_size else None,
                         bundle_identity=parameters.bundle_identity)


def check_bundle_matches(settings: ModelSettings, runtime: RMTRuntime) -> None:
    """The bundle in the repository is the one its config was written for (rmt-triton records
    its identity and segment size): a swapped bundle is an error, not another model served."""
    if settings.bundle_identity is not None and settings.bundle_identity != runtime.identity:
        raise RuntimeError(f"the bundle in the repository has identity {runtime.identity}, its config.pbtxt was "
                           f"written for {settings.bundle_identity}: rerun rmt-triton for this bundle")
    if settings.segment_size is not None and settings.segment_size != runtime.segment_size:
        raise RuntimeError(f"config.pbtxt says rmt.segment_size {settings.segment_size}, the bundle's is "
                           f"{runtime.segment_size}")


class TritonPythonModel:
    """The Python backend's model class (``model.py`` of a ``rmt-triton --kind python`` repository)."""

    def initialize(self, args: dict[str, str]) -> None:
        import triton_python_backend_utils as pb_utils  # only inside Triton's Python backend stub

        self.pb = pb_utils
        settings = model_settings(json.loads(args["model_config"]))
        check_numpy_for_python_backend(np.__version__, settings.allow_numpy2)
        bundle_dir = Path(args["model_repository"]) / str(args["model_version"]) / BUNDLE_FOLDER
        runtime = RMTRuntime.load(bundle_dir, backend="onnxruntime", provider=settings.provider,
                                  threads=settings.threads)
        check_bundle_matches(settings, runtime)
        self.name = args["model_name"]
        self.instance = args.get("model_instance_name", self.name)
        self.table = SequenceTable(runtime, settings.idle_seconds)
        # The family must outlive its metric (the backend refuses a metric of a deleted family).
        self.live_family = pb_utils.MetricFamily(name=LIVE_METRIC, description="sequences whose memory this "
                                                 "instance holds", kind=pb_utils.MetricFamily.GAUGE)
        self.live = self.live_family.Metric(labels={"model": self.name, "instance": self.instance})
        self.live.set(0)
        pb_utils.Logger.log_info(f"{self.instance}: {runtime.picked}; bundle {runtime.identity}; sequences idle "
                                 f"for {settings.idle_seconds:g} s are dropped")
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name="rmt-idle-reaper", daemon=True)
        self._reaper.start()

    def _reap(self) -> None:
        """Drop idle sequences as Triton's own reaper does, so abandoned memory is freed."""
        while not self._stop.wait(min(1.0, max(0.05, self.table.seconds_to_next_expiry() + 0.01))):
            dropped = self.table.drop_idle()
            if dropped:
                self.live.set(len(self.table))
                self.pb.Logger.log_info(f"{self.instance}: dropped idle sequences {dropped}")

    def _control(self, request, name: str) -> int:
        tensor = self.pb.get_input_tensor_by_name(request, name)
        if tensor is None:
            raise SequenceRequestError(f"control input {name} is missing: send requests through the sequence "
                                       "batcher with a sequence id")
        return int(tensor.as_numpy().reshape(-1)[0])

    def _refused(self, request) -> None:
        """A request refused by its checks still carries its controls (SequenceTable.refused); one
        without a CORRID names no sequence and changes nothing."""
        controls = {}
        for name in ("CORRID", "START", "END"):
            try:
                controls[name] = self._control(request, name)
            except (SequenceRequestError, ValueError, TypeError, IndexError):
                controls[name] = None
        if controls["CORRID"] is not None:
            self.table.refused(controls["CORRID"], bool(controls["START"]), bool(controls["END"]))

    def _parse(self, request) -> ChunkRequest | None:
        """The checked request; None for a not-ready slot (READY=0: nothing to run)."""
        if not self._control(request, "READY"):
            return None
        sequence_id = self._control(request, "CORRID")
        ids = self.pb.get_input_tensor_by_name(request, INPUT_IDS)
        if ids is None:
            raise SequenceRequestError(f"sequence {sequence_id}: input {INPUT_IDS} is missing")
        seed = self.pb.get_input_tensor_by_name(request, START_MEMORY)
        return self.table.check(sequence_id, bool(self._control(request, "START")),
                                bool(self._control(request, "END")), ids.as_numpy(),
                                request.requested_output_names() or {LAST_LOGITS},
                                None if seed is None else seed.as_numpy())

    def execute(self, requests):
        pb = self.pb
        responses: list[Any] = [None] * len(requests)
        checked, where = [], []
        for index, request in enumerate(requests):
            try:
                parsed = self._parse(request)
            except SequenceRequestError as exc:
                responses[index] = pb.InferenceResponse(error=pb.TritonError(str(exc), pb.TritonError.INVALID_ARG))
                self._refused(request)
                continue
            if parsed is None:
                responses[index] = pb.InferenceResponse(error=pb.TritonError("not ready (READY=0): nothing was run"))
                continue
            checked.append(parsed)
            where.append(index)
        for index, request, result in zip(where, checked, self.table.execute(checked)):
            if isinstance(result, Exception):
                code = pb.TritonError.INVALID_ARG if isinstance(result, SequenceRequestError) else pb.TritonError.INTERNAL
                responses[index] = pb.InferenceResponse(error=pb.TritonError(str(result), code))
                continue
            tensors = [pb.Tensor(LAST_LOGITS, result.last_logits[None].astype(np.float32))]
            if MEMORY_OUT in request.outputs:
                tensors.append(pb.Tensor(MEMORY_OUT, result.memory[None].astype(np.float32)))
            if RESUME_MEMORY in request.outputs:
                tensors.append(pb.Tensor(RESUME_MEMORY, result.resume_memory[None].astype(np.float32)))
            if TOKENS_SEEN in request.outputs:
                tensors.append(pb.Tensor(TOKENS_SEEN, np.array([[result.tokens_seen]], np.int64)))
            responses[index] = pb.InferenceResponse(output_tensors=tensors)
        self.live.set(len(self.table))
        return responses

    def finalize(self) -> None:
        self._stop.set()
        self._reaper.join(timeout=5)
