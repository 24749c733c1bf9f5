"""The Recurrent Memory Transformer: a memory cell around a Hugging Face backbone.

``step`` runs ONE segment (token ids + memory in, logits + new memory out); it is the
function export/ traces, so it holds no traced Python branching on tensor values and takes
no cache objects. ``forward`` is the segment loop over a long input: the reference for every
parity test and the training loop. Semantics follow the authors' MemoryCell /
RecurrentWrapper (decoder) and RMTEncoderForSequenceClassification (encoder); see
docs/RMT_SEMANTICS.md for the two deliberate, documented refinements (explicit positions
for padded rows; rows without tokens keep their memory). The one branch on tensor values,
:func:`segment_positions`' check for masks that are not right-padded, runs only eagerly,
never while tracing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F
from transformers import DynamicCache

from .backbone import build_backbone
from .config import RMTConfig
from .errors import ConfigError


@dataclass
class RMTOutput:
    """What the segment loop returns.

    logits: decoder [B, T, vocab] (every input position); encoder [B, labels] (last segment).
    memory: the memory after the last segment, [B, M, D].
    loss: the training loss when labels were given.
    """

    logits: torch.Tensor
    memory: torch.Tensor
    loss: torch.Tensor | None = None


def _check_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        return torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} must equal "
                         f"input_ids shape {tuple(input_ids.shape)}")
    return attention_mask


def _additive_causal_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The causal + padding mask as the additive float [B, 1, P, P] the backbone adds to its
    attention scores (0 where allowed, the dtype's minimum elsewhere).

    Numerically the same as handing the backbone the 2-D mask (bit for bit in PyTorch, for
    every family tested), but the exported graph differs: from a boolean mask, the ONNX
    attention turns the mask into floats and guards softmax against fully masked rows with
    IsNaN + Where over every [B, heads, P, P] score tensor, a measured 8% of the fp32 and
    23% of the int8 segment on CPU. No row is ever fully masked here (every position sees
    the read memory), so the guard only costs time.
    """
    positions = mask.shape[1]
    causal = torch.ones(positions, positions, dtype=torch.bool, device=mask.device).tril()
    allowed = causal.unsqueeze(0) & (mask > 0).unsqueeze(1)                   # [B, P, P]
    return torch.zeros(allowed.shape, dtype=dtype, device=mask.device).masked_fill(
        ~allowed, torch.finfo(dtype).min).unsqueeze(1)


def is_right_padded(mask: torch.Tensor) -> torch.Tensor:
    """[B, L] 0/1 mask -> 0-dim bool: every row is its tokens first, then zeros."""
    columns = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)      # [1, L]
    return (mask == (columns < mask.sum(dim=1, keepdim=True)).to(mask.dtype)).all()


def cumsum_positions(attention_mask: torch.Tensor, num_mem_tokens: int, write_slots: bool = True
                     ) -> torch.Tensor:
    """``(cumsum(full_mask) - 1).clamp(min=0)`` over ``[mem, segment(, mem)]``: the position
    ids of any mask (a position counts the real slots before it)."""
    ones = torch.ones(attention_mask.shape[0], num_mem_tokens, dtype=attention_mask.dtype,
                      device=attention_mask.device)
    full_mask = torch.cat([ones, attention_mask, ones] if write_slots else [ones, attention_mask], dim=1)
    return (full_mask.cumsum(dim=1) - 1).clamp(min=0)


def right_padded_positions(attention_mask: torch.Tensor, num_mem_tokens: int, write_slots: bool = True
                           ) -> torch.Tensor:
    """:func:`cumsum_positions` of a right-padded mask, without CumSum: [B, P].

    With n real tokens in the row, M memory tokens, L = the segment's length and
    i = 0 .. P-1 (P = 2M + L, or M + L without write slots): i for i < M + n (read memory
    and tokens), M + n - 1 on the padding, M + n + j on the j-th write slot.
    """
    m = num_mem_tokens
    length = attention_mask.shape[1]
    real = m + attention_mask.sum(dim=1, keepdim=True).long()                  # [B, 1]: M + n
    index = torch.arange(2 * m + length if write_slots else m + length,
                         device=attention_mask.device).unsqueeze(0)            # [1, P]
    positions = torch.where(index < real, index, real - 1)
    if write_slots:  # the j-th write slot (index M + L + j) sits at M + n + j
        positions = torch.where(index >= m + length, index - (m + length) + real, positions)
    return positions


def segment_positions(attention_mask: torch.Tensor, num_mem_tokens: int, write_slots: bool = True
                      ) -> torch.Tensor:
    """Position ids [B, P] over ``[mem, segment, mem]`` (P = 2M + L) or, without write slots,
    ``[mem, segment]`` (P = M + L; prefill): each row's positions as if it ran alone, so the
    write slots follow the row's last real token. Without padding, 0 .. P-1 (the backbone's
    default, as the reference RMT).

    Right-padded masks (what the runtime takes) get :func:`right_padded_positions`, and that
    is all an exported graph computes: ONNX CumSum becomes a loop in TensorRT before 10.8
    (JetPack 6 has 10.3), and a loop cannot be captured in a CUDA graph. Any other mask (left
    padding, gaps; the runtime refuses those) gets :func:`cumsum_positions` when run eagerly,
    the positions it always got; while tracing (torch.export, ONNX export, torch.compile)
    that check cannot run and the right-padded form applies to every mask.
    """
    if not torch.compiler.is_compiling() and not bool(is_right_padded(attention_mask)):
        return cumsum_positions(attention_mask, num_mem_tokens, write_slots)
    return right_padded_positions(attention_mask, num_mem_tokens, write_slots)


def run_segments(step: Callable, input_ids: torch.Tensor, attention_mask: torch.Tensor, state: Any,
                 segment_size: int, bptt_depth: int | None, detach: Callable[[Any], Any]) -> tuple[torch.Tensor, Any]:
    """The decoder segment loop (RMT and ARMT): left-aligned segments, each ``step(ids, mask,
    state) -> (logits, state)``; logits concatenated over the segments. Truncated backprop
    through time: ``detach(state)`` after every ``bptt_depth`` segments (None: never)."""
    all_logits = []
    for index, start in enumerate(range(0, input_ids.shape[1], segment_size)):
        end = start + segment_size
        logits, state = step(input_ids[:, start:end], attention_mask[:, start:end], state)
        all_logits.append(logits)
        if bptt_depth is not None and (index + 1) % bptt_depth == 0:
            state = detach(state)
    return torch.cat(all_logits, dim=1), state


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of next-token targets as the reference takes them (shifted inside);
    positions whose attention_mask is 0, or label -100, do not count."""
    targets = labels[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=-100)


class RMTBase(nn.Module):
    """What both kinds share: config, backbone, the segment loop's bookkeeping."""

    config: RMTConfig

    def __init__(self, config: RMTConfig) -> None:
        super().__init__()
        self.config = config
        self.num_mem_tokens = config.num_mem_tokens
        self.segment_size = config.segment_size

    def initial_memory(self, batch_size: int) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    @staticmethod
    def _keep_memory_of_empty_rows(attention_mask: torch.Tensor, memory: torch.Tensor,
                                   new_memory: torch.Tensor) -> torch.Tensor:
        """A row with no tokens in this segment (its input ended) keeps its memory."""
        has_tokens = attention_mask.sum(dim=1, keepdim=True).unsqueeze(-1) > 0  # [B, 1, 1]
        return torch.where(has_tokens, new_memory, memory)

    @staticmethod
    def _detach_every(memory: torch.Tensor, segment_index: int, bptt_depth: int | None) -> torch.Tensor:
        """Truncated backprop through time: cut the graph after every ``bptt_depth`` segments."""
        if bptt_depth is not None and (segment_index + 1) % bptt_depth == 0:
            return memory.detach()
        return memory


class RMTDecoder(RMTBase):
    """Decoder RMT over any causal LM that accepts ``inputs_embeds``.

    Each segment's input is ``[mem, embed(tokens), mem]``; new memory is the final
    (post final norm) hidden state at the M write slots; logits are sliced to the tokens.
    """

    def __init__(self, config: RMTConfig) -> None:
        if config.kind != "decoder":
            raise ConfigError(f"RMTDecoder needs kind='decoder', got {config.kind!r}")
        super().__init__(config)
        self.model = build_backbone(config)
        embeddings = self.model.get_input_embeddings()
        std = embeddings.weight.detach().std()
        # As the reference: randn * std(word embeddings).
        self.memory = nn.Parameter(torch.randn(config.num_mem_tokens, config.hidden_size) * std)

    def initial_memory(self, batch_size: int) -> torch.Tensor:
        """The learned initial memory repeated over the batch: [B, M, D]."""
        return self.memory.unsqueeze(0).expand(batch_size, -1, -1)

    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, memory: torch.Tensor,
             logits: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
        """One segment: ids [B, L], mask [B, L], memory [B, M, D] -> (logits, new memory [B, M, D]).

        logits="all": [B, L, V], every segment position (the reference's ``logits[:, M:-M]``).
        logits="last": [B, V], only at each row's last real token; the LM head runs on one
        position per row instead of all (what reading long context needs).
        """
        if logits not in ("all", "last"):
            raise ValueError(f"logits must be 'all' or 'last', got {logits!r}")
        m = self.num_mem_tokens
        token_embeds = self.model.get_input_embeddings()(input_ids)           # [B, L, D]
        memory = memory.to(token_embeds.dtype)
        inputs_embeds = torch.cat([memory, token_embeds, memory], dim=1)      # [B, 2M+L, D]
        ones = torch.ones(input_ids.shape[0], m, dtype=attention_mask.dtype, device=input_ids.device)
        full_mask = torch.cat([ones, attention_mask, ones], dim=1)            # [B, 2M+L]
        # Positions as the row would get alone: write slots right after its last real
        # token. Without padding this is 0..2M+L-1, the backbone's own default. No CumSum
        # in the exported graph (segment_positions).
        position_ids = segment_positions(attention_mask, m)
        extra = {"logits_to_keep": 1} if logits == "last" else {}
        out = self.model(inputs_embeds=inputs_embeds, attention_mask=_additive_causal_mask(full_mask, inputs_embeds.dtype),
                         position_ids=position_ids, output_hidden_states=True, use_cache=False, **extra)
        final_hidden = out.hidden_states[-1]                                  # [B, 2M+L, D], post final norm
        new_memory = self._keep_memory_of_empty_rows(attention_mask, memory, final_hidden[:, -m:])
        if logits == "all":
            return out.logits[:, m:-m], new_memory                           # [B, L, V]
        last = (m + attention_mask.sum(dim=1) - 1).clamp(min=0)               # [B]
        index = last.view(-1, 1, 1).expand(-1, 1, final_hidden.shape[-1])
        last_hidden = final_hidden.gather(1, index).squeeze(1)                # [B, D]
        return self.model.get_output_embeddings()(last_hidden), new_memory   # [B, V]

    # ---- generation: the reference reads [mem, segment tokens] with no write slots ----------
    def _last_position_logits(self, final_hidden: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        index = last.view(-1, 1, 1).expand(-1, 1, final_hidden.shape[-1])
        return self.model.get_output_embeddings()(final_hidden.gather(1, index).squeeze(1))  # [B, V]

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, memory: torch.Tensor
                ) -> tuple[torch.Tensor, DynamicCache]:
        """Start generating: read ``[mem, tokens]`` (no write slots, as the reference's
        generation) and return the logits at each row's last real token [B, V] and the
        key/value cache over the M + L positions (padding positions masked out later)."""
        m = self.num_mem_tokens
        token_embeds = self.model.get_input_embeddings()(input_ids)
        inputs_embeds = torch.cat([memory.to(token_embeds.dtype), token_embeds], dim=1)  # [B, M+L, D]
        ones = torch.ones(input_ids.shape[0], m, dtype=attention_mask.dtype, device=input_ids.device)
        full_mask = torch.cat([ones, attention_mask], dim=1)
        position_ids = segment_positions(attention_mask, m, write_slots=False)
        out = self.model(inputs_embeds=inputs_embeds, attention_mask=full_mask, position_ids=position_ids,
                         cache=DynamicCache(config=self.model.config), use_cache=True,
                         output_hidden_states=True, logits_to_keep=1)
        last = (m + attention_mask.sum(dim=1) - 1).clamp(min=0)
        return self._last_position_logits(out.hidden_states[-1], last), out.cache

    def decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
               cache: DynamicCache) -> tuple[torch.Tensor, DynamicCache]:
        """One generated token per row: ids [B, 1], mask [B, P+1] over cache + token, positions
        [B, 1] -> logits [B, V] and the cache grown by one position."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, use_cache=True)
        return out.logits[:, -1], out.cache

    def segment_logits(self, input_ids: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """Next-token logits [B, V] after ``[mem, tokens]``, recomputed without a cache (the
        reference that cached decoding must equal). Unpadded rows only."""
        token_embeds = self.model.get_input_embeddings()(input_ids)
        inputs_embeds = torch.cat([memory.to(token_embeds.dtype), token_embeds], dim=1)
        return self.model(inputs_embeds=inputs_embeds, use_cache=False, logits_to_keep=1).logits[:, -1]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                memory: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                bptt_depth: int | None = None) -> RMTOutput:
        """The segment loop over [B, T] right-padded input, in left-aligned segments.

        labels: [B, T] next-token targets as the reference takes them (shifted inside);
        positions whose attention_mask is 0, or label -100, do not count.
        bptt_depth: detach memory every k segments (None: backprop through all).
        """
        attention_mask = _check_ids(input_ids, attention_mask)
        if memory is None:
            memory = self.initial_memory(input_ids.shape[0])
        logits, memory = run_segments(self.step, input_ids, attention_mask, memory, self.segment_size, bptt_depth,
                                      torch.Tensor.detach)
        loss = None if labels is None else next_token_loss(logits, labels, attention_mask)
        return RMTOutput(logits=logits, memory=memory, loss=loss)


class RMTEncoder(RMTBase):
    """Encoder RMT for sequence classification over BERT-style backbones.

    Each segment is ``[CLS] mem_1..mem_M [SEP] tokens [SEP] pad..``; memory token ids
    are ``vocab .. vocab+M-1`` and from the second segment on their embeddings are
    replaced by the previous segment's last hidden states at positions 1..M. The
    classifier reads the last segment's [CLS]. Samples of a batch end together.
    """

    def __init__(self, config: RMTConfig) -> None:
        if config.kind != "encoder":
            raise ConfigError(f"RMTEncoder needs kind='encoder', got {config.kind!r}")
        super().__init__(config)
        self.model = build_backbone(config, vocab_size=config.vocab_size + config.num_mem_tokens)
        self.register_buffer(
            "mem_token_ids",
            torch.arange(config.vocab_size, config.vocab_size + config.num_mem_tokens),
            persistent=False)

    def initial_memory(self, batch_size: int) -> torch.Tensor:
        """The memory tokens' word embeddings repeated over the batch: [B, M, D]."""
        memory = self.model.get_input_embeddings()(self.mem_token_ids)
        return memory.unsqueeze(0).expand(batch_size, -1, -1)

    def _frame(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids and mask of ``[CLS] mem [SEP] tokens [SEP] pad..`` per row: [B, M+3+L]."""
        cfg, m = self.config, self.num_mem_tokens
        batch, length = input_ids.shape
        column = torch.ones(batch, 1, dtype=input_ids.dtype, device=input_ids.device)
        mem_ids = self.mem_token_ids.to(input_ids.dtype).unsqueeze(0).expand(batch, -1)
        tokens = torch.where(attention_mask > 0, input_ids, torch.full_like(input_ids, cfg.pad_token_id))
        ids = torch.cat([column * cfg.cls_token_id, mem_ids, column * cfg.sep_token_id, tokens,
                         column * cfg.pad_token_id], dim=1)
        positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)     # [1, M+3+L]
        closing_sep = (m + 2 + attention_mask.sum(dim=1, keepdim=True)).to(positions.dtype)
        ids = torch.where(positions == closing_sep, torch.full_like(ids, cfg.sep_token_id), ids)
        mask = (positions <= closing_sep).to(attention_mask.dtype)
        return ids, mask

    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One segment: ids [B, L], mask [B, L], memory [B, M, D] -> logits [B, labels], memory."""
        m = self.num_mem_tokens
        ids, mask = self._frame(input_ids, attention_mask)
        embeds = self.model.get_input_embeddings()(ids)                            # [B, M+3+L, D]
        memory = memory.to(embeds.dtype)
        inputs_embeds = torch.cat([embeds[:, :1], memory, embeds[:, m + 1:]], dim=1)
        out = self.model(inputs_embeds=inputs_embeds, attention_mask=mask,
                         token_type_ids=torch.zeros_like(ids), output_hidden_states=True)
        new_memory = out.hidden_states[-1][:, 1:m + 1]                             # [B, M, D]
        new_memory = self._keep_memory_of_empty_rows(attention_mask, memory, new_memory)
        return out.logits, new_memory

    def segments(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Right-aligned segments of each row (the first may be short), rows ending together."""
        lengths = attention_mask.sum(dim=1).tolist()
        if min(lengths) < 1:
            raise ValueError("every row of an encoder input needs at least one token")
        size = self.segment_size
        counts = [-(-n // size) for n in lengths]
        total = max(counts)
        out = []
        for index in range(total):
            ids = torch.zeros(len(lengths), size, dtype=input_ids.dtype)
            mask = torch.zeros(len(lengths), size, dtype=attention_mask.dtype)
            for row, (n, count) in enumerate(zip(lengths, counts)):
                own = index - (total - count)         # this row's own segment number
                if own < 0:
                    continue
                tokens = input_ids[row, attention_mask[row] > 0]
                end = n - (count - 1 - own) * size
                start = max(0, end - size)
                ids[row, :end - start] = tokens[start:end]
                mask[row, :end - start] = 1
            width = int(mask.sum(dim=1).max())
            out.append((ids[:, :width].to(input_ids.device), mask[:, :width].to(input_ids.device)))
        return out

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                memory: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                bptt_depth: int | None = None) -> RMTOutput:
        """The segment loop: classify [B, T] right-padded token ids (no special tokens)."""
        attention_mask = _check_ids(input_ids, attention_mask)
        if memory is None:
            memory = self.initial_memory(input_ids.shape[0])
        logits = None
        for index, (ids, mask) in enumerate(self.segments(input_ids, attention_mask)):
            logits, memory = self.step(ids, mask, memory)
            memory = self._detach_every(memory, index, bptt_depth)
        loss = None if labels is None else F.cross_entropy(logits.float(), labels)
        return RMTOutput(logits=logits, memory=memory, loss=loss)


def build_model(config: RMTConfig) -> RMTBase:
    """A randomly initialised RMT of ``config.kind``, in eval mode."""
    model_class = RMTDecoder if config.kind == "decoder" else RMTEncoder
    return model_class(config).eval()
