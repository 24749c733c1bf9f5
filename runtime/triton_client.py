"""Stream a long input to an RMT model served by Triton, under one sequence id (gRPC).

Works with both repository kinds ``rmt-triton`` writes, and says which one it talks to
(``TritonRMTClient.kind``, ``describe()``):

- ``python`` (CPU nodes): requests are chunks of any length; the server keeps the memory and
  the partial segment (``rmt_runtime.triton_model``). Every response holds the logits at the
  chunk's last token; the memory when asked. ``sequence()`` streams chunk by chunk;
  ``keep_state=True`` keeps what is needed to continue the sequence elsewhere
  (``save_state``: an rmt-edge state file that ``RMTRuntime.restore_state`` and
  ``TritonRMTClient.resume`` both read), so a server restart loses nothing.
- ``onnxruntime`` (the GPU deployment, implicit state): one request per segment, exactly
  ``segment_size`` tokens, the last right-padded with ``attention_mask`` zeros so that every
  request has the same shape and batches with other sequences (the step graph treats padding
  exactly as a shorter segment). Only ``read`` (a whole input).

Needs ``tritonclient[grpc]`` (optional: the ``triton`` extra).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import limits
from .errors import BackendError, RuntimeInputError
from .segments import rows_of
from .schema import DocumentError, check_triton_parameters
from .state import SequenceState, StateLayout, load_state_file, save_state_file
from .triton_model import INPUT_IDS, LAST_LOGITS, MEMORY_OUT, RESUME_MEMORY, START_MEMORY, TOKENS_SEEN

KINDS = ("python", "onnxruntime", "tensorrt")
# Every request carries its sequence id in this gRPC metadata header too, so that a load
# balancer in front of several servers can pin a sequence to one server by hashing it.
SEQUENCE_HEADER = "x-rmt-sequence-id"


@dataclass(frozen=True)
class SegmentRequest:
    """One request of a sequence: ids and mask [1, segment_size], and the sequence flags."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    start: bool
    end: bool


@dataclass(frozen=True)
class SequenceOutput:
    """What a served sequence has produced so far.

    last_logits: [V] at the last token sent. memory: [M, D] as if the input ended there (the
    final memory after END), when asked for. tokens_seen: tokens of the sequence so far.
    """

    last_logits: np.ndarray
    memory: np.ndarray | None
    tokens_seen: int


def segment_requests(ids, segment_size: int, vocab_size: int | None = None) -> list[SegmentRequest]:
    """The requests that stream ``ids`` (1-D) through a served step graph (onnxruntime kind)."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise RuntimeInputError(f"ids must be a non-empty 1-D integer array, got {ids.dtype} {list(ids.shape)}")
    if vocab_size is not None and ((ids < 0) | (ids >= vocab_size)).any():
        raise RuntimeInputError(f"token ids must lie in 0..{vocab_size - 1}")
    starts = list(range(0, ids.size, segment_size))
    requests = []
    for index, start in enumerate(starts):
        chunk = ids[start:start + segment_size].astype(np.int64)
        padded = np.zeros((1, segment_size), np.int64)
        mask = np.zeros((1, segment_size), np.int64)
        padded[0, :chunk.size], mask[0, :chunk.size] = chunk, 1
        requests.append(SegmentRequest(padded, mask, start=index == 0, end=index == len(starts) - 1))
    return requests


def model_parameters(config: dict):
    """The served model's ``rmt.*`` parameters, checked by their schema (BackendError naming one
    that is wrong)."""
    try:
        return check_triton_parameters(config, f"model {config.get('name')!r}" if isinstance(config, dict) else "model")
    except DocumentError as exc:
        raise BackendError(str(exc)) from None


def repository_kind(config: dict) -> str:
    """The repository kind of a served model's config (JSON, as Triton returns it)."""
    parameters = model_parameters(config)
    if parameters.segment_size is None:
        raise BackendError(f"model {config.get('name')!r} was not written by rmt-triton (no rmt.segment_size)")
    named = parameters.repository_kind
    backend = config.get("backend") or {"onnxruntime_onnx": "onnxruntime", "tensorrt_plan": "tensorrt"}.get(
        config.get("platform", ""), "")
    kind = named or backend
    if kind not in KINDS or (named and backend and named != backend):
        raise BackendError(f"model {config.get('name')!r}: repository kind {named!r} with backend {backend!r} is not "
                           f"one this client knows ({', '.join(KINDS)})")
    return kind


class TritonRMTClient:
    """A gRPC client for one served RMT model (``rmt-triton`` writes its repository)."""

    def __init__(self, url: str = "127.0.0.1:8001", model: str = "rmt", timeout_s: float | None = 300.0) -> None:
        if timeout_s is not None:  # bounded before anything connects (rmt_runtime.limits)
            timeout_s = limits.TIMEOUT_S.check(timeout_s)
        try:
            import tritonclient.grpc as grpcclient
            from tritonclient.utils import InferenceServerException
        except ImportError:
            raise BackendError("the Triton client needs tritonclient: pip install 'tritonclient[grpc]'") from None
        self._grpc = grpcclient
        self._server_error = InferenceServerException
        self.url, self.model, self.timeout_s = url, model, timeout_s
        self.client = grpcclient.InferenceServerClient(url=url)
        try:
            config = self.client.get_model_config(model, as_json=True)["config"]
        except InferenceServerException as exc:
            raise BackendError(f"cannot read model {model!r} from Triton at {url}: {exc}") from None
        self.kind = repository_kind(config)
        parameters = model_parameters(config)
        self.segment_size = int(parameters.segment_size)
        self.bundle_identity = parameters.bundle_identity or ""
        outputs = {o["name"]: [int(d) for d in o.get("dims", [])] for o in config["output"]}
        self.output = config["output"][0]["name"]
        self.vocab_size = outputs[LAST_LOGITS][0] if self.kind == "python" else None
        # The RMT's memory (python kind); None for a model without one (an ARMT keeps its 2 x L
        # state tensors in the server and its config declares no memory tensors).
        self.memory_shape = tuple(outputs[MEMORY_OUT]) if self.kind == "python" and MEMORY_OUT in outputs else None

    def describe(self) -> str:
        """Which kind of repository this client talks to, in words."""
        how = ("Triton's Python backend running rmt_runtime (ONNX Runtime inside the server); the model keeps each "
               "sequence's memory and partial segment; chunks of any length" if self.kind == "python" else
               f"Triton's {self.kind} backend with implicit state; one request per segment of {self.segment_size} "
               "tokens")
        return f"model {self.model!r} at {self.url}: {self.kind} kind ({how}); bundle {self.bundle_identity}"

    # ---- requests ---------------------------------------------------------------------------------
    def _infer(self, sequence_id: int, tokens_before: int, inputs, outputs, start: bool, end: bool):
        try:
            return self.client.infer(self.model, inputs, sequence_id=sequence_id, sequence_start=start,
                                     sequence_end=end, outputs=[self._grpc.InferRequestedOutput(n) for n in outputs],
                                     client_timeout=self.timeout_s, headers={SEQUENCE_HEADER: str(sequence_id)})
        except self._server_error as exc:
            status = str(exc.status() or "")
            if "UNAVAILABLE" in status or "DEADLINE_EXCEEDED" in status:
                raise BackendError(
                    f"Triton at {self.url} did not answer for sequence {sequence_id} after {tokens_before} tokens "
                    f"({status}: {exc.message()}): the sequence's memory lived in that server and is lost if it "
                    "stopped; start the sequence again, or resume it from a state saved with keep_state=True"
                ) from None
            raise BackendError(f"model {self.model!r} at {self.url} refused a request of sequence {sequence_id} "
                               f"after {tokens_before} tokens: {exc.message()}") from None

    def _tensor(self, name: str, array: np.ndarray, datatype: str):
        tensor = self._grpc.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        return tensor

    def _require_python(self, what: str) -> None:
        if self.kind != "python":
            raise BackendError(f"{what} needs the python repository kind; model {self.model!r} at {self.url} is the "
                               f"{self.kind} kind (whole segments, implicit state): use read()")

    def _require_memory(self, what: str) -> None:
        if self.memory_shape is None:
            raise BackendError(
                f"{what} needs the RMT's memory tensors, and model {self.model!r} at {self.url} has none: its state "
                "(an ARMT's associative memory: W_mem and z of every layer, e.g. 14 MB per sequence at GPT-2 size) "
                "stays in the server and is neither returned, saved nor resumed; stream the sequence without "
                "keep_state/want_memory, or run it in process (RMTRuntime.save_state) to keep its state")

    # ---- streaming ----------------------------------------------------------------------------------
    def sequence(self, sequence_id: int, keep_state: bool = False) -> "TritonSequence":
        """A new sequence (python kind): ``send`` chunks, the first starts it, ``end=True`` ends it.
        ``keep_state`` needs a model with the RMT's memory (not an ARMT)."""
        self._require_python("sequence()")
        if keep_state:
            self._require_memory("keep_state=True")
        return TritonSequence(self, sequence_id, keep_state)

    def resume(self, path: str | os.PathLike, sequence_id: int, keep_state: bool = False) -> "TritonSequence":
        """Continue a sequence saved by ``TritonSequence.save_state`` or ``RMTRuntime.save_state``
        (batch 1) as the new sequence ``sequence_id``: its first request starts it from the saved
        memory and re-sends the saved partial segment's tokens first."""
        self._require_python("resume()")
        self._require_memory("resume()")
        layout = StateLayout({"memory": self.memory_shape}, self.vocab_size, self.vocab_size, self.segment_size)
        loaded = load_state_file(path, self.bundle_identity, f"{self.model} at {self.url}", layout)
        if len(loaded.pending) != 1:
            raise RuntimeInputError(f"{path}: holds {len(loaded.pending)} sequences; a served sequence resumes one")
        return TritonSequence(self, sequence_id, keep_state, start_memory=loaded.tensors["memory"][0],
                              prefix=loaded.pending[0], tokens_before=int(loaded.tokens_seen[0]))

    def read(self, ids, sequence_id: int, chunk_size: int | None = None, want_memory: bool = False) -> SequenceOutput:
        """Stream ``ids`` (1-D) as one whole sequence (START ... END); the last response's output.
        python kind: chunks of ``chunk_size`` (default segment_size) tokens; onnxruntime kind:
        fixed segments (``chunk_size`` must be None or the segment size)."""
        if self.kind != "python":
            if want_memory:
                raise BackendError(f"the {self.kind} kind keeps the memory as implicit state and does not return it")
            if chunk_size not in (None, self.segment_size):
                raise RuntimeInputError(f"the {self.kind} kind takes whole segments of {self.segment_size} tokens")
            return self._read_segments(ids, sequence_id)
        ids = np.asarray(ids)
        if ids.ndim != 1 or ids.size == 0:
            raise RuntimeInputError(f"ids must be one non-empty sequence of token ids (1-D), got shape "
                                    f"{list(ids.shape)}")
        if want_memory:
            self._require_memory("want_memory=True")
        size = self.segment_size if chunk_size is None else chunk_size
        if not isinstance(size, int) or size < 1:
            raise RuntimeInputError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
        limits.CHUNK_SIZE.check(size)
        sequence = self.sequence(sequence_id)
        starts = range(0, ids.size, size)
        result = None
        for start in starts:
            last = start + size >= ids.size
            result = sequence.send(ids[start:start + size], end=last, want_memory=want_memory and last)
        return result

    def _read_segments(self, ids, sequence_id: int) -> SequenceOutput:
        result = None
        requests = segment_requests(ids, self.segment_size)
        for index, request in enumerate(requests):
            inputs = [self._tensor(name, array, "INT64") for name, array in
                      (("input_ids", request.input_ids), ("attention_mask", request.attention_mask))]
            response = self._infer(sequence_id, index * self.segment_size, inputs, [self.output],
                                   request.start, request.end)
            result = response.as_numpy(self.output)
        return SequenceOutput(last_logits=result[0], memory=None, tokens_seen=int(np.asarray(ids).size))


class TritonSequence:
    """One sequence on a python-kind server. Not shared between threads."""

    def __init__(self, client: TritonRMTClient, sequence_id: int, keep_state: bool,
                 start_memory: np.ndarray | None = None, prefix: np.ndarray | None = None, tokens_before: int = 0):
        if not isinstance(sequence_id, (int, np.integer)) or isinstance(sequence_id, bool) or sequence_id < 1:
            raise RuntimeInputError(f"sequence_id must be an int >= 1 (Triton's correlation id), got {sequence_id!r}")
        limits.SEQUENCE_ID.check(sequence_id)
        self.client, self.sequence_id, self.keep_state = client, int(sequence_id), keep_state
        self._start_memory = start_memory
        self._prefix = np.zeros(0, np.int64) if prefix is None else np.asarray(prefix, np.int64)
        self.tokens_seen = tokens_before
        self._base = tokens_before - len(self._prefix)   # the server counts from the re-sent prefix
        self.started = self.ended = False
        self._resume_memory: np.ndarray | None = None
        self._tail = np.zeros(0, np.int64)   # the partial segment's tokens (keep_state)
        self._last_logits: np.ndarray | None = None

    def send(self, ids, end: bool = False, want_memory: bool = False) -> SequenceOutput:
        """Send a chunk (>= 1 token). The first request starts the sequence; ``end`` ends it."""
        if self.ended:
            raise RuntimeInputError(f"sequence {self.sequence_id} has ended; start a new one")
        client = self.client
        if want_memory:
            client._require_memory("want_memory=True")
        (chunk,) = rows_of(ids, 1, client.vocab_size, "chunk", offsets=[self.tokens_seen])
        if chunk.size == 0:
            raise RuntimeInputError("a chunk needs at least one token id")
        start = not self.started
        if start:
            chunk = np.concatenate([self._prefix, chunk])
        inputs = [client._tensor(INPUT_IDS, chunk[None], "INT64")]
        if start and self._start_memory is not None:
            inputs.append(client._tensor(START_MEMORY, np.ascontiguousarray(self._start_memory[None], np.float32),
                                         "FP32"))
        outputs = [LAST_LOGITS, TOKENS_SEEN] + ([MEMORY_OUT] if want_memory else []) + (
            [RESUME_MEMORY] if self.keep_state else [])
        try:
            response = client._infer(self.sequence_id, self.tokens_seen, inputs, outputs, start, end)
        except BackendError as exc:
            if self.started and "must specify the START flag" in str(exc):
                raise BackendError(f"{exc} (the server no longer knows this sequence: it was idle longer than the "
                                   "model's max_sequence_idle_microseconds, or the server restarted; start it again, "
                                   "or resume it from a state saved with keep_state=True)") from None
            raise
        self.started, self.ended = True, end
        seen = int(response.as_numpy(TOKENS_SEEN).reshape(-1)[0])
        self.tokens_seen = self._base + seen
        self._last_logits = response.as_numpy(LAST_LOGITS)[0]
        if self.keep_state:
            self._resume_memory = response.as_numpy(RESUME_MEMORY)[0]
            pending = self.tokens_seen % client.segment_size
            self._tail = np.concatenate([self._tail, chunk])[len(self._tail) + len(chunk) - pending:]
        return SequenceOutput(last_logits=self._last_logits,
                              memory=response.as_numpy(MEMORY_OUT)[0] if want_memory else None,
                              tokens_seen=self.tokens_seen)

    def save_state(self, path: str | os.PathLike) -> Path:
        """Write the sequence's state as an rmt-edge state file (memory after the last full
        segment, the partial segment's tokens, counters, the bundle's identity)."""
        if not self.keep_state:
            raise RuntimeInputError("save_state needs the sequence made with keep_state=True (each response then "
                                    "carries the memory after the last full segment)")
        if not self.started or self.ended:
            raise RuntimeInputError(f"sequence {self.sequence_id} is {'ended' if self.ended else 'not started'}; "
                                    "save a live sequence")
        state = SequenceState(handles={}, scratch={}, pending=[self._tail.copy()],
                              tokens_seen=np.array([self.tokens_seen], np.int64),
                              segments_done=np.array([self.tokens_seen // self.client.segment_size], np.int64),
                              last_logits=self._last_logits[None].astype(np.float32),
                              has_logits=np.array([True]), bundle_identity=self.client.bundle_identity)
        return save_state_file(path, self.client.bundle_identity, f"{self.client.model} at {self.client.url}",
                               {"memory": self._resume_memory[None]}, state)
