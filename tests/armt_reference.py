"""An independent ARMT segment, written straight from the equations (docs/ARMT.md), for parity
tests of rmt_model.armt.

It shares nothing with rmt_model but the weights: it takes an ARMTDecoder only to read its
parameters and to call the Hugging Face backbone's own embeddings, blocks and final norm, and
it builds the segment, the positions, the causal mask, the DPFP features, the reads and the
writes itself, head by head and row by row, in whatever dtype the model's weights have (so a
float64 copy gives a float64 reference). It keeps the reference code's own "has this layer
written yet" flag instead of reading it off the state, and it handles unpadded rows only.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

EPS = 1e-5


@dataclass
class RefState:
    """Per layer: W [B, H, F, D/H], z [B, H, F], and whether the layer has written yet."""

    W: list[torch.Tensor]
    z: list[torch.Tensor]
    written: list[bool] = field(default_factory=list)

    def as_dict(self, dtype=torch.float32) -> dict[str, torch.Tensor]:
        out = {}
        for layer, (w, z) in enumerate(zip(self.W, self.z)):
            out[f"W_mem.{layer}"] = w.to(dtype)
            out[f"z.{layer}"] = z.to(dtype)
        return out


def zero_state(model, batch: int, dtype) -> RefState:
    s = model.config.armt
    d = model.config.hidden_size
    layers = _blocks(model)
    feats = 6 * s.d_mem // s.heads
    return RefState(W=[torch.zeros(batch, s.heads, feats, d // s.heads, dtype=dtype) for _ in layers],
                    z=[torch.zeros(batch, s.heads, feats, dtype=dtype) for _ in layers],
                    written=[False for _ in layers])


def _blocks(model):
    hf = model.model
    return list(hf.transformer.h) if model.config.family == "gpt2" else list(hf.model.layers)


def _linear(x, layer):
    y = x @ layer.weight.T
    return y if layer.bias is None else y + layer.bias


def _roll_right(r, j):
    """torch.roll(r, j, dims=-1) by slicing: element i moves to i + j (mod n)."""
    return torch.cat([r[..., r.shape[-1] - j:], r[..., :r.shape[-1] - j]], dim=-1)


def _phi(x, normalize):
    """DPFP with nu = 3 over the last dim, then (newer version) divided by its L2 norm."""
    r = torch.cat([torch.clamp(x, min=0), torch.clamp(-x, min=0)], dim=-1)
    out = torch.cat([r * _roll_right(r, 1), r * _roll_right(r, 2), r * _roll_right(r, 3)], dim=-1)
    if normalize:
        out = out / torch.clamp(torch.sqrt((out * out).sum(dim=-1, keepdim=True)), min=1e-12)
    return out


def _read(h, wrapper, W, z, heads, normalize):
    """h [B, P, D] -> the read [B, P, D], one row and one head at a time."""
    batch, length, width = h.shape
    dq, dv = wrapper.W_mq.weight.shape[0] // heads, width // heads
    q = _linear(h, wrapper.W_mq)
    out = torch.zeros_like(h)
    for b in range(batch):
        for head in range(heads):
            phi = _phi(q[b, :, head * dq:(head + 1) * dq], normalize)          # [P, F]
            num = phi @ W[b, head]                                             # [P, D/H]
            den = phi @ z[b, head] + EPS                                       # [P]
            out[b, :, head * dv:(head + 1) * dv] = num / den[:, None]
    return out


def _write(m, wrapper, W, z, first, heads, normalize, correction, version):
    """m [B, M, D] (block outputs at the memory tokens) -> new W, z."""
    batch, _, width = m.shape
    dq, dv = wrapper.W_mk.weight.shape[0] // heads, width // heads
    kx, vx = _linear(m, wrapper.W_mk), _linear(m, wrapper.W_mv)
    beta_all = torch.sigmoid(_linear(m, wrapper.W_mb))                         # [B, M, H]
    W, z = W.clone(), z.clone()
    for b in range(batch):
        for head in range(heads):
            k = _phi(kx[b, :, head * dq:(head + 1) * dq], normalize)           # [M, F]
            v = vx[b, :, head * dv:(head + 1) * dv]                            # [M, D/H]
            beta = beta_all[b, :, head]                                        # [M]
            if first:
                v_prev = torch.zeros_like(v)
                gamma = torch.ones(k.shape[0], dtype=k.dtype)
            else:
                den = k @ z[b, head] + EPS                                     # [M]
                v_prev = (k @ W[b, head]) / den[:, None]
                if correction:
                    norm2 = (k * k).sum(dim=-1) + (EPS if version == "unnormalized" else 0.0)
                    gamma = torch.clamp(1 - den / norm2, 0, 1)
                else:
                    gamma = torch.ones(k.shape[0], dtype=k.dtype)
            W[b, head] = W[b, head] + (beta[:, None] * k).T @ (v - v_prev)
            z[b, head] = z[b, head] + (gamma[:, None] * k).sum(dim=0)
    return W, z


@torch.no_grad()
def reference_segment(model, input_ids: torch.Tensor, state: RefState, write: bool = True
                      ) -> tuple[torch.Tensor, RefState]:
    """One ARMT segment of unpadded ids [B, L] from ``state``: (logits [B, L, V], new state)."""
    cfg, s = model.config, model.config.armt
    hf = model.model
    normalize = s.version == "normalized"
    dtype = model.memory.dtype
    batch, length = input_ids.shape
    gpt2 = cfg.family == "gpt2"
    tokens = (hf.transformer.wte if gpt2 else hf.model.embed_tokens)(input_ids)
    parts = [model.sink.expand(batch, 1, -1)] if s.use_sink else []
    parts.append(tokens)
    if write:
        parts.append(model.memory.expand(batch, -1, -1))
    h = torch.cat(parts, dim=1)
    total = h.shape[1]
    positions = torch.arange(total).unsqueeze(0)                               # restart at 0
    mask = torch.full((total, total), torch.finfo(dtype).min, dtype=dtype).triu(1)[None, None]
    if gpt2:
        h = h + hf.transformer.wpe(positions)
    else:
        rotary = hf.model.rotary_emb(h, positions)
    new_W, new_z, new_written = list(state.W), list(state.z), list(state.written)
    m = cfg.num_mem_tokens
    for layer, wrapper in enumerate(_blocks(model)):
        if state.written[layer]:  # the reference reads only once the layer has written
            h = h + _read(h, wrapper, state.W[layer], state.z[layer], s.heads, normalize)
        if gpt2:
            out = wrapper.layer(h, None, mask, position_ids=positions, use_cache=False)
        else:
            out = wrapper.layer(h, attention_mask=mask, position_embeddings=rotary, position_ids=positions)
        h = out[0] if isinstance(out, tuple) else out
        if write:
            new_W[layer], new_z[layer] = _write(h[:, total - m:], wrapper, state.W[layer], state.z[layer],
                                                not state.written[layer], s.heads, normalize,
                                                s.correction, s.version)
            new_written[layer] = True
    h = (hf.transformer.ln_f if gpt2 else hf.model.norm)(h)
    logits = h @ hf.lm_head.weight.T
    start = int(s.use_sink)
    return logits[:, start:start + length], RefState(new_W, new_z, new_written)
