"""Stream a long input to an RMT model served by Triton, under one sequence id.

The server keeps the memory (implicit state of the sequence batcher, see
``rmt_export.triton``); the client sends one request per segment: exactly
``segment_size`` tokens, the last segment right-padded with ``attention_mask`` zeros so
that every request has the same shape and batches with other sequences. The step graph
treats padding exactly as a shorter segment. Needs ``tritonclient[grpc]`` (optional).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import BackendError, RuntimeInputError


@dataclass(frozen=True)
class SegmentRequest:
    """One request of a sequence: ids and mask [1, segment_size], and the sequence flags."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    start: bool
    end: bool


def segment_requests(ids, segment_size: int, vocab_size: int | None = None) -> list[SegmentRequest]:
    """The requests that stream ``ids`` (1-D) through a served step graph."""
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


class TritonRMTClient:
    """A gRPC client for one served RMT model (``rmt-triton`` writes its repository)."""

    def __init__(self, url: str = "localhost:8001", model: str = "rmt") -> None:
        try:
            import tritonclient.grpc as grpcclient
        except ImportError:
            raise BackendError("the Triton client needs tritonclient: pip install 'tritonclient[grpc]'") from None
        self._grpc = grpcclient
        self.client = grpcclient.InferenceServerClient(url=url)
        self.model = model
        try:
            config = self.client.get_model_config(model, as_json=True)["config"]
        except Exception as exc:  # noqa: BLE001 - tritonclient raises its own exception types
            raise BackendError(f"cannot read model {model!r} from Triton at {url}: {exc}") from None
        parameters = config.get("parameters", {})
        if "rmt.segment_size" not in parameters:
            raise BackendError(f"model {model!r} on {url} was not written by rmt-triton (no rmt.segment_size)")
        self.segment_size = int(parameters["rmt.segment_size"]["string_value"])
        self.output = config["output"][0]["name"]

    def read(self, ids, sequence_id: int) -> np.ndarray:
        """Stream ``ids`` as one sequence; return the last request's output (e.g. last_logits [vocab])."""
        result = None
        for request in segment_requests(ids, self.segment_size):
            inputs = []
            for name, array in (("input_ids", request.input_ids), ("attention_mask", request.attention_mask)):
                tensor = self._grpc.InferInput(name, list(array.shape), "INT64")
                tensor.set_data_from_numpy(array)
                inputs.append(tensor)
            response = self.client.infer(self.model, inputs, sequence_id=sequence_id,
                                         sequence_start=request.start, sequence_end=request.end,
                                         outputs=[self._grpc.InferRequestedOutput(self.output)])
            result = response.as_numpy(self.output)
        return result[0]
