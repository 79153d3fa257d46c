"""`MultiheadAttention`: torch.nn.MultiheadAttention with flashtune's kernels inside, and `swap_attention(model)`.

The class subclasses torch's, so the constructor, parameters, buffers and state_dict keys are torch's
(state dicts load both ways, isinstance checks pass); only `forward` differs. It projects q, k, v as torch
does, then runs flashtune:
- a boolean `key_padding_mask` (and no `attn_mask`, no dropout) runs `attention_varlen`: the real keys of
  each batch row are packed (one host read of the mask per call: the number of real keys sizes the packed
  tensors), the queries stay as they are, so every query row, padded ones included, gets exactly torch's
  output (a padded query attends to its row's real keys, as in torch);
- everything else runs `attention()` with the masks as one `attn_mask` (torch's bool masks say True = hidden,
  SDPA's and flashtune's True = visible: inverted here) and dropout `self.dropout` in training mode.
Torch's forward (`super().forward`) runs, counted in `fallback_counts()`, where the kernels cannot give the
same: `need_weights=True` (torch's default; the fused kernels never form the weights), `add_bias_kv`,
`add_zero_attn`, nested tensors, and inputs the kernels do not take (dtype, head dim, device).
"""
from __future__ import annotations

from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checks import check_inputs

__all__ = ["MultiheadAttention", "fallback_counts", "kernel_counts", "reset_counts", "swap_attention"]

_fallbacks: Counter[str] = Counter()
_kernels: Counter[str] = Counter()


def fallback_counts() -> dict[str, int]:
    """How many forward calls ran torch's MultiheadAttention.forward, per reason."""
    return dict(_fallbacks)


def kernel_counts() -> dict[str, int]:
    """How many forward calls ran a flashtune path: "varlen" (packed keys) or "attention" (masks in the kernel)."""
    return dict(_kernels)


def reset_counts() -> None:
    """Zero fallback_counts() and kernel_counts()."""
    _fallbacks.clear()
    _kernels.clear()


def _call_forward(module: nn.Module, args: Any) -> None:
    """A no-op forward pre-hook, there for its presence: nn.TransformerEncoderLayer's fused inference path
    reads self_attn's weights and never calls self_attn's forward, unless a submodule has a hook."""


class MultiheadAttention(nn.MultiheadAttention):
    """torch.nn.MultiheadAttention (same constructor, parameters and state dict) whose forward runs flashtune."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, device: Any = None, dtype: Any = None) -> None:
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
                         add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first,
                         device=device, dtype=dtype)
        _block_fused_layer_path(self)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        """torch.nn.MultiheadAttention.forward's arguments and results; the weights are None unless
        need_weights=True, which runs torch's forward. `is_causal` is torch's hint: it needs `attn_mask` (the
        causal mask; RuntimeError otherwise, as torch), and without a key_padding_mask the kernels then run
        causal attention without reading the mask (what torch's SDPA call does)."""
        reason = self._fallback_reason(query, key, value, need_weights)
        if reason is None:
            if is_causal and attn_mask is None:
                raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                                   "module method `generate_square_subsequent_mask` to create this mask.")
            unbatched = query.dim() == 2
            q, k, v = self._project(*_seq_first(query, key, value, unbatched, self.batch_first))  # (L|S, B, H, D)
            try:
                check_inputs(q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3))
            except (TypeError, ValueError) as error:
                reason = f"kernel refuses the inputs: {error}"
            else:
                padding = key_padding_mask
                if unbatched and padding is not None:
                    padding = padding.unsqueeze(0)
                out = self._attend(q, k, v, padding, attn_mask, is_causal)  # (L, B, E)
                out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
                if unbatched:
                    return out.squeeze(1), None
                return (out.transpose(0, 1) if self.batch_first else out), None
        _fallbacks[reason] += 1
        return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                               attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)

    def _fallback_reason(self, query: Tensor, key: Tensor, value: Tensor, need_weights: bool) -> str | None:
        if need_weights:
            return "need_weights"
        if self.bias_k is not None:
            return "add_bias_kv"
        if self.add_zero_attn:
            return "add_zero_attn"
        if query.is_nested or key.is_nested or value.is_nested:
            return "nested tensor"
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            return "input shapes"  # torch's forward raises its own error for them
        return None

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q (L, B, H, D), k and v (S, B, H, D) from seq-first inputs, with torch's weights."""
        e, h = self.embed_dim, self.num_heads
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
        if self._qkv_same_embed_dim:
            if query is key and key is value:  # self-attention: one matmul
                q, k, v = F.linear(query, self.in_proj_weight, b).chunk(3, dim=-1)
            else:
                wq, wk, wv = self.in_proj_weight.chunk(3)
                q, k, v = F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)
        else:
            q = F.linear(query, self.q_proj_weight, bq)
            k = F.linear(key, self.k_proj_weight, bk)
            v = F.linear(value, self.v_proj_weight, bv)
        return (q.unflatten(-1, (h, e // h)), k.unflatten(-1, (h, e // h)), v.unflatten(-1, (h, e // h)))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
                is_causal: bool) -> Tensor:
        """The heads' outputs merged, (L, B, E)."""
        from .api import attention

        seq_q, batch, heads, _ = q.shape
        dropout = self.dropout if self.training else 0.0
        causal = is_causal and key_padding_mask is None  # torch's rule: with padding, the hint gives way to the mask
        if causal:
            attn_mask = None
        if key_padding_mask is not None and attn_mask is None and not dropout:
            key_padding_mask = _as_bool_padding(key_padding_mask)
        if (key_padding_mask is not None and key_padding_mask.dtype == torch.bool and attn_mask is None
                and not dropout):
            _kernels["varlen"] += 1
            return self._attend_varlen(q, k, v, key_padding_mask)
        _kernels["attention"] += 1
        mask = _merged_mask(attn_mask, key_padding_mask, batch, heads, seq_q, k.shape[0], q.dtype)
        out = attention(q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3), attn_mask=mask,
                        dropout_p=dropout, is_causal=causal)  # (B, H, L, D)
        return out.permute(2, 0, 1, 3).reshape(seq_q, batch, self.embed_dim)

    def _attend_varlen(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor) -> Tensor:
        """Every query row against its batch row's real keys, packed (one document per batch row)."""
        from .varlen import attention_varlen

        seq_q, batch, heads, dim = q.shape
        seq_k = k.shape[0]
        if key_padding_mask.shape != (batch, seq_k):
            raise ValueError(f"key_padding_mask must have shape (batch, source length) = {(batch, seq_k)}, "
                             f"got {tuple(key_padding_mask.shape)}")
        real = ~key_padding_mask.to(q.device)
        # The one host read: nonzero() sizes the packed keys.
        rows = real.reshape(-1).nonzero().squeeze(1)
        keys = k.transpose(0, 1).reshape(batch * seq_k, heads, dim)[rows]
        values = v.transpose(0, 1).reshape(batch * seq_k, heads, v.shape[-1])[rows]
        cu_k = F.pad(real.sum(1).cumsum(0), (1, 0)).to(torch.int32)
        cu_q = torch.arange(0, (batch + 1) * seq_q, seq_q, device=q.device, dtype=torch.int32)
        out = attention_varlen(q.transpose(0, 1).reshape(batch * seq_q, heads, dim), keys, values, cu_q, cu_k,
                               seq_q, seq_k)  # (B·L, H, D)
        return out.reshape(batch, seq_q, self.embed_dim).transpose(0, 1)


def _seq_first(query: Tensor, key: Tensor, value: Tensor, unbatched: bool, batch_first: bool
               ) -> tuple[Tensor, Tensor, Tensor]:
    """The inputs as (L, B, E) views, keeping `query is key is value` (one projection matmul for self-attention)."""
    if unbatched:
        views = {id(t): t.unsqueeze(1) for t in (query, key, value)}
    elif batch_first:
        views = {id(t): t.transpose(0, 1) for t in (query, key, value)}
    else:
        return query, key, value
    return views[id(query)], views[id(key)], views[id(value)]


def _as_bool_padding(key_padding_mask: Tensor) -> Tensor:
    """A float padding mask of only 0 and -inf (what nn.TransformerEncoder and torch's _canonical_mask make of a
    bool one) as the bool mask it stands for (True = padding); any other mask as it is. One host read."""
    if key_padding_mask.dtype == torch.bool or not key_padding_mask.is_floating_point():
        return key_padding_mask
    hidden = key_padding_mask == float("-inf")
    if bool((hidden | (key_padding_mask == 0)).all()):
        return hidden
    return key_padding_mask


def _merged_mask(attn_mask: Tensor | None, key_padding_mask: Tensor | None, batch: int, heads: int, seq_q: int,
                 seq_k: int, dtype: torch.dtype) -> Tensor | None:
    """torch's attn_mask ((L, S) or (B·H, L, S)) and key_padding_mask ((B, S)), bool True = hidden or float
    added, as one mask in attention()'s convention (bool True = visible, or float added) broadcasting to
    (B, H, L, S)."""
    masks = []
    if attn_mask is not None:
        if attn_mask.dim() == 3:
            if attn_mask.shape != (batch * heads, seq_q, seq_k):
                raise ValueError(f"a 3D attn_mask must have shape (batch·heads, target length, source length) = "
                                 f"{(batch * heads, seq_q, seq_k)}, got {tuple(attn_mask.shape)}")
            attn_mask = attn_mask.view(batch, heads, seq_q, seq_k)
        elif attn_mask.shape != (seq_q, seq_k):
            raise ValueError(f"a 2D attn_mask must have shape (target length, source length) = {(seq_q, seq_k)}, "
                             f"got {tuple(attn_mask.shape)}")
        masks.append(attn_mask)
    if key_padding_mask is not None:
        if key_padding_mask.shape != (batch, seq_k):
            raise ValueError(f"key_padding_mask must have shape (batch, source length) = {(batch, seq_k)}, "
                             f"got {tuple(key_padding_mask.shape)}")
        masks.append(key_padding_mask[:, None, None, :])
    for m in masks:
        if m.dtype != torch.bool and not m.is_floating_point():
            raise TypeError(f"attn_mask and key_padding_mask must be bool or floating point, got {m.dtype}")
    if not masks:
        return None
    if all(m.dtype == torch.bool for m in masks):
        hidden = masks[0] if len(masks) == 1 else masks[0] | masks[1]
        return ~hidden
    floats = [torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(m, float("-inf"))
              if m.dtype == torch.bool else m.to(dtype) for m in masks]
    return floats[0] if len(floats) == 1 else floats[0] + floats[1]


def _block_fused_layer_path(module: MultiheadAttention) -> None:
    if _call_forward not in module._forward_pre_hooks.values():
        module.register_forward_pre_hook(_call_forward)


def swap_attention(model: nn.Module) -> int:
    """Turn every torch.nn.MultiheadAttention inside `model` (the model itself included) into a flashtune
    MultiheadAttention, in place: the same module objects and the same Parameter objects (so an optimizer built
    before stays valid), device, dtype and mode. Returns how many were swapped.

    nn.TransformerEncoderLayer's fused inference path (eval mode without grad) reads self_attn's weights and
    never calls its forward: the swapped modules carry a no-op forward pre-hook, one of the conditions under
    which torch skips that path. nn.TransformerEncoder's nested-tensor path (eval, no grad, a
    src_key_padding_mask) would hand the layers nested tensors: it is switched off (`use_nested_tensor = False`)
    in the encoders whose layers hold a swapped module."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"swap_attention takes a torch.nn.Module, got {type(model).__name__}")
    swapped = 0
    for module in model.modules():
        if type(module) is nn.MultiheadAttention:
            module.__class__ = MultiheadAttention
            _block_fused_layer_path(module)
            swapped += 1
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder) and any(
                isinstance(m, MultiheadAttention) for m in module.modules()):
            module.use_nested_tensor = False
    return swapped
