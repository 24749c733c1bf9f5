"""The Associative Recurrent Memory Transformer (ARMT): per-layer associative memory around a
Hugging Face causal LM.

Rodkin et al., "Associative Recurrent Memory Transformer" (arXiv 2407.04841); the authors'
code is RodkinIvan/associative-recurrent-memory-transformer, ``modeling_amt/language_modeling.py``
(AssociativeLayerWrapper, AssociativeMemoryCell, AssociativeRecurrentWrapper). docs/ARMT.md
says which revision each ``version`` reproduces and every choice made where it is silent.

One segment is ``[sink?, tokens, mem]`` (M learned memory embeddings, the same every
segment). Every block l of the backbone is wrapped: before it, each position reads
``phi(q) W_mem / (z . phi(q) + 1e-5)`` (q = W_mq h, per head) into the residual stream; after
it, the block's outputs at the M memory positions write ``k^T (v - v_prev)`` into W_mem and
``gamma k`` into z. The state that carries over is only ``W_mem.{l}`` [B, H, F, D/H] and
``z.{l}`` [B, H, F] per layer (F = 6 d_mem / H), float32, zero at the start. ``step`` runs one
segment from explicit state to explicit state; nothing is kept between calls.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import DynamicCache

from .backbone import backbone_config
from .config import ARMTSettings, RMTConfig
from .errors import ConfigError
from .model import is_right_padded, next_token_loss, run_segments

# Where each supported family keeps its list of blocks (the reference's ``layers_attr``).
LAYER_PATHS = {"gpt2": "transformer.h", "llama": "model.layers"}
DPFP_NU = 3
EPS = 1e-5  # the reference's constant in every denominator


@dataclass
class ARMTOutput:
    """What the segment loop returns: logits [B, T, V], the state after the last segment, the loss."""

    logits: torch.Tensor
    state: dict[str, torch.Tensor]
    loss: torch.Tensor | None = None


def dpfp(x: torch.Tensor, nu: int = DPFP_NU) -> torch.Tensor:
    """Deterministic parameter-free projection over the last dim: [.., d] -> [.., 2 nu d].

    r = [relu(x), relu(-x)]; the features are r * roll(r, j) for j = 1..nu, concatenated.
    """
    r = torch.cat([F.relu(x), F.relu(-x)], dim=-1)
    return torch.cat([r * r.roll(shifts=j, dims=-1) for j in range(1, nu + 1)], dim=-1)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, T, H*d] -> [B, H, T, d]."""
    batch, length, width = x.shape
    return x.reshape(batch, length, heads, width // heads).transpose(1, 2)


def _wide(x: torch.Tensor) -> torch.Tensor:
    """x in float32, or float64 if it already is: the memory never computes below float32."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Causal + padding mask over [B, P] as the additive [B, 1, P, P] the backbone adds to scores."""
    positions = mask.shape[1]
    causal = torch.ones(positions, positions, dtype=torch.bool, device=mask.device).tril()
    allowed = causal.unsqueeze(0) & (mask > 0).unsqueeze(1)
    return torch.zeros(allowed.shape, dtype=dtype, device=mask.device).masked_fill(
        ~allowed, torch.finfo(dtype).min).unsqueeze(1)


def armt_positions(attention_mask: torch.Tensor, sink: int, num_mem_tokens: int) -> torch.Tensor:
    """Position ids [B, P] over ``[sink?, tokens, mem?]`` (P = sink + L + num_mem_tokens).

    Unpadded: 0 .. P-1 (the backbone's default, as the reference). A right-padded row gets the
    positions it would have alone: the memory tokens follow its last real token. Any other mask
    (eagerly only) gets cumsum positions.
    """
    ones = attention_mask.new_ones(attention_mask.shape[0], 1)
    full = torch.cat([ones.expand(-1, sink), attention_mask, ones.expand(-1, num_mem_tokens)], dim=1)
    if not torch.compiler.is_compiling() and not bool(is_right_padded(attention_mask)):
        return (full.cumsum(dim=1) - 1).clamp(min=0)
    length = attention_mask.shape[1]
    real = sink + attention_mask.sum(dim=1, keepdim=True).long()                # [B, 1]
    index = torch.arange(full.shape[1], device=attention_mask.device).unsqueeze(0)
    positions = torch.where(index < real, index, real - 1)
    return torch.where(index >= sink + length, index - (sink + length) + real, positions)


class _Pass:
    """What one backbone call's wrapped layers read and write: the state in, the state out,
    whether the memory tokens write, which rows have tokens. Set by ``ARMTDecoder`` around each
    call to the backbone, cleared after; one call at a time per model."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.state_in: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.state_out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.write = False
        self.has_tokens: torch.Tensor | None = None


class AssociativeLayer(nn.Module):
    """One backbone block with its associative memory (the reference's AssociativeLayerWrapper;
    same parameter names, the block under ``layer``)."""

    def __init__(self, layer: nn.Module, index: int, hidden_size: int, num_mem_tokens: int,
                 settings: ARMTSettings, io: _Pass) -> None:
        super().__init__()
        self.layer = layer
        self.index = index
        self.num_mem_tokens = num_mem_tokens
        self.settings = settings
        self.io = io
        self.W_mq = nn.Linear(hidden_size, settings.d_mem, bias=False)
        self.W_mk = nn.Linear(hidden_size, settings.d_mem, bias=False)
        self.W_mv = nn.Linear(hidden_size, hidden_size, bias=False)
        nn.init.zeros_(self.W_mv.weight)  # as the reference: memory starts as a no-op
        self.W_mb = nn.Linear(hidden_size, settings.heads)

    def features(self, x: torch.Tensor, projection: nn.Linear) -> torch.Tensor:
        """[B, T, D] -> phi of the projection per head, at least float32: [B, H, T, F]."""
        phi = dpfp(_heads(_wide(projection(x)), self.settings.heads))
        if self.settings.version == "normalized":
            phi = F.normalize(phi, p=2.0, dim=-1)
        return phi

    def read(self, hidden: torch.Tensor, w_mem: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """phi(q) W_mem / (z . phi(q) + eps) at every position: [B, T, D] (exactly 0 from zero state)."""
        phi = self.features(hidden, self.W_mq)                                 # [B, H, T, F]
        num = torch.einsum("bhtf,bhfd->bhtd", phi, w_mem)                      # [B, H, T, D/H]
        den = torch.einsum("bhf,bhtf->bht", z, phi).unsqueeze(-1) + EPS
        out = (num / den).transpose(1, 2)                                      # [B, T, H, D/H]
        return out.reshape(hidden.shape).to(hidden.dtype)

    def write(self, mem: torch.Tensor, w_mem: torch.Tensor, z: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """The memory tokens' block outputs [B, M, D] -> the new (W_mem, z)."""
        heads = self.settings.heads
        k = self.features(mem, self.W_mk)                                      # [B, H, M, F]
        v = _heads(_wide(self.W_mv(mem)), heads)                              # [B, H, M, D/H]
        beta = torch.sigmoid(_wide(self.W_mb(mem))).transpose(1, 2).unsqueeze(-1)  # [B, H, M, 1]
        den = torch.einsum("bhf,bhmf->bhm", z, k).unsqueeze(-1) + EPS          # [B, H, M, 1]
        v_prev = torch.einsum("bhmf,bhfd->bhmd", k, w_mem) / den
        if self.settings.correction:
            norm2 = torch.linalg.norm(k, dim=-1, keepdim=True) ** 2
            if self.settings.version == "unnormalized":
                norm2 = norm2 + EPS
            gamma = torch.clip(1 - den / norm2, 0, 1).detach()  # as the reference: no gradient
        else:
            gamma = torch.ones_like(den)
        # A layer that has never written (z all zero) writes as the reference's first segment:
        # v_prev = 0, gamma = 1.
        written = (z != 0).flatten(1).any(dim=1).view(-1, 1, 1, 1)
        v_prev = torch.where(written, v_prev, torch.zeros_like(v_prev))
        gamma = torch.where(written, gamma, torch.ones_like(gamma))
        new_w = w_mem + torch.einsum("bhmf,bhmd->bhfd", beta * k, v - v_prev)
        new_z = z + (gamma * k).sum(dim=2)
        return new_w, new_z

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        io = self.io
        if io.state_in is None:  # the backbone called on its own: the plain block
            return self.layer(hidden_states, *args, **kwargs)
        w_mem, z = io.state_in[self.index]
        hidden_states = hidden_states + self.read(hidden_states, w_mem, z)
        out = self.layer(hidden_states, *args, **kwargs)
        if io.write:
            block_out = out[0] if isinstance(out, tuple) else out
            new_w, new_z = self.write(block_out[:, -self.num_mem_tokens:], w_mem, z)
            keep = io.has_tokens                                                # [B] bool
            io.state_out[self.index] = (torch.where(keep.view(-1, 1, 1, 1), new_w, w_mem),
                                        torch.where(keep.view(-1, 1, 1), new_z, z))
        return out


def _build_causal_lm(config: RMTConfig) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(backbone_config(config),
                                            attn_implementation=config.attn_implementation)


class ARMTDecoder(nn.Module):
    """ARMT over a causal LM. State names: ``W_mem.{l}`` [B, H, F, D/H], ``z.{l}`` [B, H, F]."""

    def __init__(self, config: RMTConfig) -> None:
        super().__init__()
        if config.kind != "armt":
            raise ConfigError(f"ARMTDecoder needs kind='armt', got {config.kind!r}")
        if config.family not in LAYER_PATHS:
            raise ConfigError(f"ARMT supports the backbone families {sorted(LAYER_PATHS)}, "
                              f"not {config.family!r}")
        self.config = config
        self.settings = settings = config.armt
        self.num_mem_tokens = config.num_mem_tokens
        self.segment_size = config.segment_size
        self.model = _build_causal_lm(config)
        self._io = _Pass()
        layers = self._layers()
        hidden = config.hidden_size
        for index in range(len(layers)):
            layers[index] = AssociativeLayer(layers[index], index, hidden, config.num_mem_tokens,
                                             settings, self._io)
        std = self.model.get_input_embeddings().weight.detach().std()
        self.memory = nn.Parameter(torch.randn(config.num_mem_tokens, hidden) * std)
        if settings.use_sink:
            self.sink = nn.Parameter(torch.randn(1, hidden))  # as the reference: unscaled randn

    def _layers(self) -> nn.ModuleList:
        layers = self.model
        for attr in LAYER_PATHS[self.config.family].split("."):
            layers = getattr(layers, attr)
        return layers

    @property
    def num_layers(self) -> int:
        return len(self._layers())

    # ---- state ----------------------------------------------------------------------------
    def state_shapes(self, batch_size: int) -> dict[str, tuple[int, ...]]:
        """Every state tensor's name and shape, in order (W_mem.0, z.0, W_mem.1, ...)."""
        s, heads = self.settings, self.settings.heads
        shapes: dict[str, tuple[int, ...]] = {}
        for layer in range(self.num_layers):
            shapes[f"W_mem.{layer}"] = (batch_size, heads, s.features, self.config.hidden_size // heads)
            shapes[f"z.{layer}"] = (batch_size, heads, s.features)
        return shapes

    def initial_state(self, batch_size: int) -> dict[str, torch.Tensor]:
        """Zeros, float32, on the model's device."""
        device = self.memory.device
        return {name: torch.zeros(shape, dtype=torch.float32, device=device)
                for name, shape in self.state_shapes(batch_size).items()}

    def _check_state(self, state: dict[str, torch.Tensor], batch_size: int) -> None:
        expected = self.state_shapes(batch_size)
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        if missing or unexpected:
            raise ValueError(f"ARMT state must hold exactly {list(expected)[:4]}...; "
                             f"missing {missing[:4]}, unexpected {unexpected[:4]}")
        for name, shape in expected.items():
            if tuple(state[name].shape) != shape:
                raise ValueError(f"ARMT state {name} has shape {tuple(state[name].shape)}, expected {shape}")

    def _state_in(self, state: dict[str, torch.Tensor], dtype: torch.dtype
                  ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (W_mem, z) in the memory's compute dtype (float32; float64 for a float64 model)."""
        wide = torch.promote_types(dtype, torch.float32)
        return [(state[f"W_mem.{layer}"].to(wide), state[f"z.{layer}"].to(wide))
                for layer in range(self.num_layers)]

    # ---- one segment ----------------------------------------------------------------------
    def _run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             state: dict[str, torch.Tensor], write: bool, **backbone_kwargs):
        """Run the backbone over [sink?, tokens, mem (write only)]; return its output and the
        new state (the old one when not writing)."""
        batch = input_ids.shape[0]
        if not torch.compiler.is_compiling():
            self._check_state(state, batch)
        m = self.num_mem_tokens if write else 0
        sink = int(self.settings.use_sink)
        embeds = self.model.get_input_embeddings()(input_ids)                   # [B, L, D]
        parts = [self.sink.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)] if sink else []
        parts.append(embeds)
        if write:
            parts.append(self.memory.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1))
        inputs_embeds = torch.cat(parts, dim=1)                                 # [B, P, D]
        ones = attention_mask.new_ones(batch, 1)
        full_mask = torch.cat([ones.expand(-1, sink), attention_mask, ones.expand(-1, m)], dim=1)
        positions = armt_positions(attention_mask, sink, m)
        io = self._io
        io.state_in = self._state_in(state, embeds.dtype)
        io.write = write
        io.has_tokens = attention_mask.sum(dim=1) > 0
        try:
            out = self.model(inputs_embeds=inputs_embeds,
                             attention_mask=_additive_mask(full_mask, inputs_embeds.dtype),
                             position_ids=positions, **backbone_kwargs)
            if write:
                new_state = {}
                for layer in range(self.num_layers):
                    new_state[f"W_mem.{layer}"], new_state[f"z.{layer}"] = io.state_out[layer]
            else:
                new_state = dict(state)
        finally:
            io.clear()
        return out, new_state

    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             state: dict[str, torch.Tensor], write: bool = True, logits: str = "all"
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One segment: ids [B, L], mask [B, L] (right-padded), state -> (logits, new state).

        logits="all": [B, L, V], every token position. logits="last": [B, V], only at each
        row's last real token (the LM head runs on one position per row: reading context).
        write=False: the reference's last segment before generating: ``[sink?, tokens]``
        without memory tokens, reads on, the state returned unchanged.
        """
        if logits not in ("all", "last"):
            raise ValueError(f"logits must be 'all' or 'last', got {logits!r}")
        sink = int(self.settings.use_sink)
        if logits == "all":
            out, new_state = self._run(input_ids, attention_mask, state, write, use_cache=False)
            return out.logits[:, sink:sink + input_ids.shape[1]], new_state
        # logits_to_keep=1: the backbone's head runs on the last position only (discarded); the
        # last real token's logits come from its final hidden state.
        out, new_state = self._run(input_ids, attention_mask, state, write, use_cache=False,
                                   output_hidden_states=True, logits_to_keep=1)
        final_hidden = out.hidden_states[-1]                                   # [B, P, D], post final norm
        last = (sink + attention_mask.sum(dim=1) - 1).clamp(min=0)             # [B]
        index = last.view(-1, 1, 1).expand(-1, 1, final_hidden.shape[-1])
        return self.model.get_output_embeddings()(final_hidden.gather(1, index).squeeze(1)), new_state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                state: dict[str, torch.Tensor] | None = None, labels: torch.Tensor | None = None,
                bptt_depth: int | None = None) -> ARMTOutput:
        """The segment loop over [B, T] right-padded input in left-aligned segments (every
        segment writes). labels as RMTDecoder.forward; bptt_depth: detach the state every k."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if state is None:
            state = self.initial_state(input_ids.shape[0])
        logits, state = run_segments(self.step, input_ids, attention_mask, state, self.segment_size, bptt_depth,
                                     lambda s: {k: v.detach() for k, v in s.items()})
        loss = None if labels is None else next_token_loss(logits, labels, attention_mask)
        return ARMTOutput(logits=logits, state=state, loss=loss)

    # ---- generation -------------------------------------------------------------------------
    def split_context(self, num_tokens: int) -> int:
        """How many leading tokens are written into the state before generating: every full
        segment but the last, so the final segment holds 1..segment_size tokens."""
        if num_tokens < 1:
            raise ValueError("generation needs at least one context token")
        return ((num_tokens - 1) // self.segment_size) * self.segment_size

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, state: dict[str, torch.Tensor]
                ) -> tuple[torch.Tensor, DynamicCache]:
        """Start generating (the reference's last segment): read ``[sink?, tokens]`` with no
        memory tokens, reads on, writes off. ids [B, L], mask [B, L] (right-padded), state ->
        (logits at each row's last real token [B, V], the key/value cache over the sink + L
        positions; a padded row's padding positions are in it, masked out by decode's mask).
        Positions: ``armt_positions(mask, sink, 0)``."""
        sink = int(self.settings.use_sink)
        # logits_to_keep=1: the backbone's head runs on the last position only (discarded); the
        # last real token's logits come from its final (post-norm) hidden state, as step's "last".
        out, _ = self._run(input_ids, attention_mask, state, write=False,
                           cache=DynamicCache(config=self.model.config), use_cache=True,
                           output_hidden_states=True, logits_to_keep=1)
        final_hidden = out.hidden_states[-1]                                   # [B, sink + L, D]
        last = (sink + attention_mask.sum(dim=1) - 1).clamp(min=0)             # [B]
        index = last.view(-1, 1, 1).expand(-1, 1, final_hidden.shape[-1])
        return self.model.get_output_embeddings()(final_hidden.gather(1, index).squeeze(1)), out.cache

    def decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
               cache: DynamicCache, state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, DynamicCache]:
        """One generated token per row: ids [B, 1], mask [B, P+1] over cache + token, positions
        [B, 1], the cache, the state (read only) -> logits [B, V] and the cache grown by one.
        Every layer reads the memory at the new token (as the reference: reads on, writes off)."""
        if not torch.compiler.is_compiling():
            self._check_state(state, input_ids.shape[0])
        io = self._io
        io.state_in = self._state_in(state, self.model.get_input_embeddings().weight.dtype)
        io.write = False
        try:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             cache=cache, use_cache=True)
        finally:
            io.clear()
        return out.logits[:, -1], out.cache

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int,
                 state: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Greedy generation for one unpadded sequence [1, T] -> [1, new tokens], as the
        reference: every segment but the last is written; the last is read as
        ``[sink?, tokens]`` with no memory tokens (``prefill``) and the backbone continues with
        a KV cache (``decode``), reads on and writes off (the state is never updated while
        generating)."""
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError("generate takes one unpadded sequence [1, T]")
        state = self.initial_state(1) if state is None else state
        commit = self.split_context(input_ids.shape[1])
        for start in range(0, commit, self.segment_size):
            ids = input_ids[:, start:start + self.segment_size]
            _, state = self.step(ids, torch.ones_like(ids), state)
        last = input_ids[:, commit:]
        logits, cache = self.prefill(last, torch.ones_like(last), state)
        position = int(self.settings.use_sink) + last.shape[1]
        device = input_ids.device
        generated = []
        for _ in range(max_new_tokens):
            token = logits.argmax(dim=-1, keepdim=True)                         # [1, 1]
            generated.append(token)
            if len(generated) == max_new_tokens:
                break
            logits, cache = self.decode(token, torch.ones(1, position + 1, dtype=torch.long, device=device),
                                        torch.tensor([[position]], device=device), cache, state)
            position += 1
        return torch.cat(generated, dim=1)


def build_armt_model(config: RMTConfig) -> ARMTDecoder:
    """A randomly initialised ARMT (reference init: W_mv zero), in eval mode."""
    return ARMTDecoder(config).eval()
