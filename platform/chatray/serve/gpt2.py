"""A compact GPT-2 forward pass over chatray's slot KV cache (nanoGPT / gpt-fast style).

transformers' forward keeps its own cache object and cannot write each row's keys at that row's own position
of a preallocated cache, so serving runs this forward instead. It reads the parameters of a loaded Hugging Face
``GPT2LMHeadModel`` in place (no copy: the same tensors, the same ``addmm`` on the transposed ``Conv1D``
weights as transformers), so a checkpoint loads exactly as before and greedy output matches ``generate``.

:meth:`GPT2Forward.hidden` handles ``R`` rows of ``Q`` tokens each (a decode step: ``Q == 1``, one row per cache
slot). Each token's key and value are written to ``(slot, write_pos)`` first; then every query attends to its
slot's positions ``[0, attn_len)`` up to its own position. Rows that must leave the cache alone write to the
cache's scratch position. :meth:`GPT2Forward.prefill_hidden` packs prompt chunks end to end, without padding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from chatray.serve.kvcache import CacheShape, KVCache

__all__ = ["GPT2Forward"]


@dataclass(frozen=True)
class _Layer:
    ln1: tuple[torch.Tensor, torch.Tensor]
    attn: tuple[torch.Tensor, torch.Tensor]  # (weight (E, 3E), bias (3E,)): transformers' Conv1D layout
    proj: tuple[torch.Tensor, torch.Tensor]
    ln2: tuple[torch.Tensor, torch.Tensor]
    fc: tuple[torch.Tensor, torch.Tensor]
    fc_proj: tuple[torch.Tensor, torch.Tensor]
    scale: float


def _pair(module: Any) -> tuple[torch.Tensor, torch.Tensor]:
    return module.weight, module.bias


class GPT2Forward:
    """The forward pass of one GPT-2-family model, over its parameters as loaded by transformers.

    Args:
        model: a ``GPT2LMHeadModel`` (``model_type == "gpt2"``), in eval mode, on its device and dtype.

    Raises:
        ValueError: another architecture, or GPT-2 options this forward does not implement (named).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        from transformers.activations import ACT2FN

        cfg = model.config
        if getattr(cfg, "model_type", None) != "gpt2":
            raise ValueError(f"chatray serves GPT-2-family models (model_type 'gpt2'), got "
                             f"{getattr(cfg, 'model_type', None)!r}")
        if getattr(cfg, "add_cross_attention", False):
            raise ValueError("GPT-2 with cross-attention (add_cross_attention) is not supported for serving")
        tr = model.transformer
        self.n_embd, self.n_head = int(cfg.n_embd), int(cfg.n_head)
        self.head_dim = self.n_embd // self.n_head
        self.eps = float(cfg.layer_norm_epsilon)
        self.act = ACT2FN[cfg.activation_function]
        self.wte, self.wpe = tr.wte.weight, tr.wpe.weight
        self.ln_f = _pair(tr.ln_f)
        self.lm_head = model.lm_head.weight  # (V, E); tied to wte in GPT-2
        self.lm_head_bias = getattr(model.lm_head, "bias", None)
        base = 1.0 / math.sqrt(self.head_dim) if cfg.scale_attn_weights else 1.0
        self.layers = [
            _Layer(_pair(b.ln_1), _pair(b.attn.c_attn), _pair(b.attn.c_proj), _pair(b.ln_2), _pair(b.mlp.c_fc),
                   _pair(b.mlp.c_proj), base / (i + 1) if cfg.scale_attn_by_inverse_layer_idx else base)
            for i, b in enumerate(tr.h)
        ]
        self.context = int(cfg.n_positions)
        self.dtype, self.device = self.wte.dtype, self.wte.device

    def cache_shape(self, positions: int) -> CacheShape:
        """The per-slot cache geometry for sequences of up to ``positions`` tokens."""
        return CacheShape(len(self.layers), self.n_head, self.head_dim, positions)

    def hidden(self, tokens: torch.Tensor, positions: torch.Tensor, write_pos: torch.Tensor, cache: KVCache,
               attn_len: int, slots: torch.Tensor | None = None) -> torch.Tensor:
        """The final hidden states (after ``ln_f``) of every input token; keys and values land in ``cache``.

        Args:
            tokens: (R, Q) token ids.
            positions: (R, Q) each token's position in its sequence.
            write_pos: (R, Q) where each token's key/value goes in its slot (``cache.scratch``: nowhere).
            cache: the replica's KV cache.
            attn_len: attend to positions ``[0, attn_len)`` of each slot (> every position in ``positions``).
            slots: (R,) the rows' cache slots; None means rows are slots ``0..R-1`` (a decode step: the cache is
                read as a view, with no gather).

        Returns:
            (R, Q, E) hidden states.
        """
        R, Q = tokens.shape
        E, H, D = self.n_embd, self.n_head, self.head_dim
        x = F.embedding(tokens, self.wte) + F.embedding(positions, self.wpe)
        # (R, 1, Q, T): a query sees its slot's keys up to its own position (its own key included).
        visible = torch.arange(attn_len, device=tokens.device)[None, None, None, :] <= positions[:, None, :, None]
        slot_rows = (torch.arange(R, device=tokens.device) if slots is None else slots)[:, None].expand(R, Q)
        for i, layer in enumerate(self.layers):
            h = F.layer_norm(x, (E,), *layer.ln1, self.eps)
            qkv = torch.addmm(layer.attn[1], h.view(-1, E), layer.attn[0]).view(R, Q, 3, H, D)
            q, k, v = qkv.unbind(2)  # (R, Q, H, D) each
            keys, values = cache.keys[i], cache.values[i]  # (slots, H, positions + 1, D)
            keys[slot_rows, :, write_pos] = k
            values[slot_rows, :, write_pos] = v
            if slots is None:
                ks, vs = keys[:R, :, :attn_len], values[:R, :, :attn_len]
            else:
                ks, vs = keys[:, :, :attn_len].index_select(0, slots), values[:, :, :attn_len].index_select(0, slots)
            a = F.scaled_dot_product_attention(q.transpose(1, 2), ks, vs, attn_mask=visible, scale=layer.scale)
            a = a.transpose(1, 2).reshape(R * Q, E)
            x = x + torch.addmm(layer.proj[1], a, layer.proj[0]).view(R, Q, E)
            h = F.layer_norm(x, (E,), *layer.ln2, self.eps).view(-1, E)
            m = self.act(torch.addmm(layer.fc[1], h, layer.fc[0]))
            x = x + torch.addmm(layer.fc_proj[1], m, layer.fc_proj[0]).view(R, Q, E)
        return F.layer_norm(x, (E,), *self.ln_f, self.eps)

    def prefill_hidden(self, tokens: torch.Tensor, positions: torch.Tensor, token_slots: torch.Tensor,
                       spans: Sequence[tuple[int, int, int]], cache: KVCache) -> torch.Tensor:
        """Prompt chunks packed end to end, with no padding: the final hidden states of all their tokens.

        The matrix products run once over every token of every chunk; attention runs per group of chunks that
        cover the same positions (a batch of fresh prompts of one length is one call), each over its own slot.

        Args:
            tokens: (N,) the chunks' token ids, one chunk after the other.
            positions: (N,) each token's position in its sequence (also where its key/value goes).
            token_slots: (N,) each token's cache slot.
            spans: per chunk, (slot, start, end): it holds positions ``[start, end)``, in the order of ``tokens``.
            cache: the replica's KV cache.

        Returns:
            (N, E) hidden states.
        """
        N, E, H, D = tokens.shape[0], self.n_embd, self.n_head, self.head_dim
        dev = tokens.device
        groups: dict[tuple[int, int], list[tuple[int, int]]] = {}  # (start, end) -> [(slot, offset in tokens)]
        offset = 0
        for slot, start, end in spans:
            groups.setdefault((start, end), []).append((slot, offset))
            offset += end - start
        plan = []
        for (start, end), members in groups.items():
            m = end - start
            idx = torch.tensor([o + i for _, o in members for i in range(m)], dtype=torch.long, device=dev)
            slots = torch.tensor([s for s, _ in members], dtype=torch.long, device=dev)
            # Chunks starting at 0 see exactly their own tokens causally; later chunks also see what came before.
            mask = None if start == 0 else (torch.arange(end, device=dev)[None, :]
                                            <= torch.arange(start, end, device=dev)[:, None])
            plan.append((len(members), m, end, idx, slots, mask))
        x = F.embedding(tokens, self.wte) + F.embedding(positions, self.wpe)
        for i, layer in enumerate(self.layers):
            h = F.layer_norm(x, (E,), *layer.ln1, self.eps)
            q, k, v = torch.addmm(layer.attn[1], h, layer.attn[0]).view(N, 3, H, D).unbind(1)  # (N, H, D) each
            keys, values = cache.keys[i], cache.values[i]
            keys[token_slots, :, positions] = k
            values[token_slots, :, positions] = v
            a = torch.empty_like(q)
            for g, m, end, idx, slots, mask in plan:
                qg = q.index_select(0, idx).view(g, m, H, D).transpose(1, 2)
                kg = keys[:, :, :end].index_select(0, slots)
                vg = values[:, :, :end].index_select(0, slots)
                out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, is_causal=mask is None,
                                                     scale=layer.scale)
                a.index_copy_(0, idx, out.transpose(1, 2).reshape(g * m, H, D))
            x = x + torch.addmm(layer.proj[1], a.view(N, E), layer.proj[0])
            h = F.layer_norm(x, (E,), *layer.ln2, self.eps)
            x = x + torch.addmm(layer.fc_proj[1], self.act(torch.addmm(layer.fc[1], h, layer.fc[0])), layer.fc_proj[0])
        return F.layer_norm(x, (E,), *self.ln_f, self.eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., E) hidden states -> (..., V) logits, in the model's dtype."""
        return F.linear(hidden, self.lm_head, self.lm_head_bias)

    def decode_logits(self, tokens: torch.Tensor, positions: torch.Tensor, write_pos: torch.Tensor, cache: KVCache,
                      attn_len: int, slots: torch.Tensor | None = None) -> torch.Tensor:
        """One decode step: (R,) tokens, positions, write positions -> (R, V) logits, over cache slots ``slots``
        (None: ``0..R-1``, see :meth:`hidden`)."""
        h = self.hidden(tokens[:, None], positions[:, None], write_pos[:, None], cache, attn_len, slots)
        return self.logits(h[:, 0])
