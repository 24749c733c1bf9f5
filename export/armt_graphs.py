"""One ARMT segment as an ONNX graph that follows the step spec (issue 18: ARMT export).

The ARMT's state is not one ``memory`` tensor but two per layer, ``W_mem.{l}`` [batch, H, F,
D/H] and ``z.{l}`` [batch, H, F] (rmt_model/armt.py), so the graphs carry 2 x L named state
pairs ``W_mem.{l} -> new_W_mem.{l}``, ``z.{l} -> new_z.{l}``. The runtime's runners bind every
pair a spec declares, so nothing in the runtime is ARMT-specific.

step:   input_ids, attention_mask [batch, seq], W_mem.0, z.0, W_mem.1, ... ->
        logits [batch, seq, vocab], new_W_mem.0, new_z.0, ...
ingest: the same inputs -> last_logits [batch, vocab] (each row's last real token, the LM
        head on that one position only, as the RMT's ingest), new_W_mem.0, new_z.0, ...

Generation (as the reference: the last segment is read as ``[sink?, tokens]`` without memory
tokens, reads on, writes off, then greedy decoding with a key/value cache):

prefill: input_ids, attention_mask [batch, seq], W_mem.0, z.0, ... -> last_logits [batch,
         vocab], present.i.key/value [batch, heads, seq (+ 1 with a sink), head_dim].
decode:  input_ids [batch, 1], attention_mask [batch, past + 1], position_ids [batch, 1],
         past.i.key/value [.., past, ..], W_mem.0, z.0, ... -> logits [batch, vocab],
         present.i.key/value [.., past + 1, ..]. The state is read only: its pairs are
         past -> present, never W_mem/z.

The state is float32 in every precision (the ARMT computes its memory in float32 even when
the backbone is fp16); tracing reuses export/graphs.py's ``trace_and_save``.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from transformers import DynamicCache

from rmt_model.armt import ARMTDecoder
from rmt_model.step import PRECISION_DTYPES
from rmt_runtime.spec import (BATCH, DECODE, INGEST, PREFILL, SEQ, STEP, CacheLayer, GraphSpec, TensorSpec,
                              cached_generation_specs)

from .errors import ExportError
from .graphs import CACHE_DTYPES, DEFAULT_OPSET, flat_cache, trace_and_save

NEW = "new_"  # a state input's output is its name with this prefix
# The associative memory's projections (rmt_model.armt.AssociativeLayer): float32 in int8
# bundles, whose dynamic quantization would feed its rounding into the recurrence.
MEMORY_PROJECTIONS = ("W_mq", "W_mk", "W_mv", "W_mb")


def state_names(model: ARMTDecoder) -> list[str]:
    """The state inputs in spec order: W_mem.0, z.0, W_mem.1, z.1, ... (the model's own order)."""
    return list(model.state_shapes(1))


def armt_specs(model: ARMTDecoder) -> dict[str, GraphSpec]:
    """The step and ingest specs of an ARMT, with one named state pair per state tensor."""
    config = model.config
    state = [TensorSpec(name, "float32", (BATCH, *shape[1:])) for name, shape in model.state_shapes(1).items()]
    new_state = tuple(TensorSpec(NEW + t.name, t.dtype, t.dims) for t in state)
    inputs = (TensorSpec("input_ids", "int64", (BATCH, SEQ)),
              TensorSpec("attention_mask", "int64", (BATCH, SEQ)), *state)
    pairs = {t.name: NEW + t.name for t in state}
    return {STEP: GraphSpec(STEP, inputs, (TensorSpec("logits", "float32", (BATCH, SEQ, config.vocab_size)),
                                           *new_state), pairs),
            INGEST: GraphSpec(INGEST, inputs, (TensorSpec("last_logits", "float32", (BATCH, config.vocab_size)),
                                               *new_state), pairs)}


class ARMTStepModule(nn.Module):
    """(input_ids, attention_mask, (W_mem.0, z.0, ...)) -> (logits, new_W_mem.0, new_z.0, ...).

    logits "all": [B, L, V] at every token; "last": [B, V] at each row's last real token, the
    LM head applied to that position's final (post-norm) hidden state only. The state enters
    and leaves as float32; the model inside may be fp16.
    """

    def __init__(self, model: ARMTDecoder, logits: str) -> None:
        super().__init__()
        if logits not in ("all", "last"):
            raise ValueError(f"logits must be 'all' or 'last', got {logits!r}")
        self.model, self.logits = model, logits
        self.names = state_names(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, state: tuple[torch.Tensor, ...]):
        model = self.model
        named = dict(zip(self.names, state))
        logits, new_state = model.step(input_ids, attention_mask, named, logits=self.logits)
        return (logits.float(), *(new_state[name].float() for name in self.names))


def _example(model: ARMTDecoder, batch: int) -> tuple:
    config = model.config
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, config.segment_size), generator=generator)
    # A non-zero state, so that no branch is traced only for an empty memory.
    state = tuple(torch.rand(shape, generator=generator) for shape in model.state_shapes(batch).values())
    return ids, torch.ones(batch, config.segment_size, dtype=torch.int64), state


def _check_model(model: ARMTDecoder, precision: str, what: str) -> None:
    if not isinstance(model, ARMTDecoder):
        raise ExportError(f"{what} needs an ARMTDecoder, got {type(model).__name__}")
    model_dtype = next(model.parameters()).dtype
    if model_dtype != PRECISION_DTYPES[precision]:
        raise ExportError(f"the model computes in {model_dtype}, precision {precision} needs "
                          f"{PRECISION_DTYPES[precision]} (use model_in_precision)")


def _geometry(model: ARMTDecoder) -> dict[str, str]:
    return {"rmt.kind": "armt", "rmt.family": model.config.family,
            "rmt.segment_size": str(model.config.segment_size),
            "rmt.num_mem_tokens": str(model.config.num_mem_tokens)}


def export_armt_graph(model: ARMTDecoder, spec: GraphSpec, precision: str, path: str | os.PathLike,
                      opset: int = DEFAULT_OPSET, metadata: dict[str, str] | None = None) -> Path:
    """Trace the ARMT's ``spec.name`` graph (step or ingest) in ``precision`` and save it at ``path``.

    ``model`` must already compute in the precision (rmt_model.step.model_in_precision).
    Batch is dynamic (1..1024) and seq 1..segment_size; the state's other dims are fixed.
    The saved graph is checked against the spec (names, dtypes, dims) before returning.
    """
    _check_model(model, precision, "export_armt_graph")
    if spec.name not in (STEP, INGEST):
        raise ExportError(f"an ARMT has the graphs {STEP!r} and {INGEST!r}, not {spec.name!r}")
    module = ARMTStepModule(model, "all" if spec.name == STEP else "last").eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=1, max=model.config.segment_size)
    example = _example(model, 2)
    dynamic_shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq},
                      "state": tuple({0: batch} for _ in example[2])}
    return trace_and_save(module, model, example, dynamic_shapes, spec, precision, opset, path,
                          {**_geometry(model), **(metadata or {})}, float_modules=MEMORY_PROJECTIONS)


# ---- generation: prefill and decode -----------------------------------------------------------
class ARMTPrefillModule(nn.Module):
    """(input_ids, attention_mask, (W_mem.0, z.0, ...)) -> (last_logits, present.0.key, present.0.value, ...).

    The state enters as float32 (the memory computes in float32 in every precision); the
    caches leave in the model's dtype."""

    def __init__(self, model: ARMTDecoder) -> None:
        super().__init__()
        self.model = model
        self.names = state_names(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, state: tuple[torch.Tensor, ...]):
        logits, cache = self.model.prefill(input_ids, attention_mask, dict(zip(self.names, state)))
        return (logits.float(), *flat_cache(cache))


class ARMTDecodeModule(nn.Module):
    """(input_ids, attention_mask, position_ids, (past.0.key, ...), (W_mem.0, z.0, ...)) ->
    (logits, present.0.key, ...). The flat caches are wrapped in a DynamicCache inside the
    traced function (transformers 5 takes no cache object as a graph input)."""

    def __init__(self, model: ARMTDecoder) -> None:
        super().__init__()
        self.model = model
        self.names = state_names(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                past: tuple[torch.Tensor, ...], state: tuple[torch.Tensor, ...]):
        pairs = [(past[i], past[i + 1]) for i in range(0, len(past), 2)]
        cache = DynamicCache(ddp_cache_data=pairs, config=self.model.model.config)
        logits, cache = self.model.decode(input_ids, attention_mask, position_ids, cache,
                                          dict(zip(self.names, state)))
        return (logits.float(), *flat_cache(cache))


def armt_cache_layout(model: ARMTDecoder) -> list[CacheLayer]:
    """Per-layer key/value geometry, read from one PyTorch prefill of one token (GQA, head dims)."""
    ids = torch.zeros(1, 1, dtype=torch.int64, device=model.memory.device)
    with torch.no_grad():
        flat = ARMTPrefillModule(model)(ids, torch.ones_like(ids), tuple(model.initial_state(1).values()))[1:]
    return [CacheLayer(heads=int(flat[i].shape[1]), head_dim=int(flat[i].shape[3])) for i in range(0, len(flat), 2)]


def armt_generation_specs(model: ARMTDecoder, precision: str) -> dict[str, GraphSpec]:
    """The ARMT's prefill and decode specs (module docstring). Caches in the precision's cache
    dtype (export/graphs.py CACHE_DTYPES, as the RMT's generation graphs); state float32."""
    state = tuple(TensorSpec(name, "float32", (BATCH, *shape[1:])) for name, shape in model.state_shapes(1).items())
    return cached_generation_specs(state, state, int(model.settings.use_sink), model.config.vocab_size,
                                   armt_cache_layout(model), CACHE_DTYPES[precision])


def export_armt_generation_graphs(model: ARMTDecoder, precision: str, opset: int, directory: Path,
                                  metadata: dict[str, str]) -> dict[str, tuple[Path, GraphSpec]]:
    """Trace the ARMT's prefill and decode graphs into ``directory`` (prefill.onnx, decode.onnx);
    returns name -> (path, spec), as export/graphs.py's export_generation_graphs.

    ``model`` must already compute in the precision (rmt_model.step.model_in_precision). Batch
    1..1024, seq 1..segment_size, past 1..the backbone's position limit - 1; the state's other
    dims are fixed. Each saved graph is checked against its spec before returning.
    """
    _check_model(model, precision, "export_armt_generation_graphs")
    config = model.config
    specs = armt_generation_specs(model, precision)
    metadata = {**_geometry(model), **(metadata or {})}
    directory = Path(directory)
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=1, max=config.segment_size)
    # Reference-mode generation may grow the cache up to the backbone's position limit.
    past = torch.export.Dim("past", min=1, max=max((config.max_positions or 8192) - 1, 2))
    ids, mask, state = _example(model, 2)
    state_shapes = tuple({0: batch} for _ in state)
    prefill = ARMTPrefillModule(model).eval()
    out: dict[str, tuple[Path, GraphSpec]] = {}
    path = trace_and_save(prefill, model, (ids, mask, state),
                          {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq},
                           "state": state_shapes},
                          specs[PREFILL], precision, opset, directory / f"{PREFILL}.onnx", metadata,
                          float_modules=MEMORY_PROJECTIONS)
    out[PREFILL] = (path, specs[PREFILL])
    with torch.no_grad():
        cache = tuple(prefill(ids, mask, state)[1:])
    positions = cache[0].shape[2]
    token = ids[:, :1]
    decode_mask = torch.ones(ids.shape[0], positions + 1, dtype=torch.int64)
    position_ids = torch.full((ids.shape[0], 1), positions, dtype=torch.int64)
    path = trace_and_save(ARMTDecodeModule(model).eval(), model, (token, decode_mask, position_ids, cache, state),
                          {"input_ids": {0: batch}, "attention_mask": {0: batch, 1: past + 1},
                           "position_ids": {0: batch}, "past": tuple({0: batch, 2: past} for _ in cache),
                           "state": state_shapes},
                          specs[DECODE], precision, opset, directory / f"{DECODE}.onnx", metadata,
                          float_modules=MEMORY_PROJECTIONS)
    out[DECODE] = (path, specs[DECODE])
    return out
