"""Score modifiers: what changes a call's attention scores beyond the scale and the causal mask.

A call may cap its scores (`softcap`), restrict each query to a sliding window of keys (`window`), add a learnt
logit per head to every row's softmax denominator (`sinks`), add ALiBi's linear position bias (`alibi`), add or
apply an explicit mask (`mask`, SDPA's `attn_mask`) and drop probabilities at random (`dropout_p`). They are checked
once (`check_mods`), carried through the dispatcher, the launches and the backward as one `ScoreMods`, and give
the dispatcher's key its feature fields (`ScoreMods.features`).

Conventions (flash_attn's, aligned like the op's causal mask): query i's diagonal is key i + `diag`, where
`diag` is 0 for `attention()` (top-left, as SDPA's is_causal) and len − Nq for a KV cache (bottom-right).

- window (left, right): query i sees keys j with i + diag − left <= j <= i + diag + right; -1 is unbounded on
  that side. With causal, right is at most 0.
- softcap c > 0: the scaled score s becomes c·tanh(s/c), before any bias or mask.
- sinks (Hq,): row i of head h normalises by Σ_j exp(s_ij) + exp(sinks[h]); the sink adds no value. Its
  gradient is −Σ_i exp(sinks[h] − lse_i)·delta_i with delta_i = rowsum(dO ∘ O) (`sinks_grad`).
- alibi (Hq,) or (B, Hq) slopes m: the score gains −m·|j − (i + diag)| (with causal: m·(j − i − diag), the same
  softmax as BLOOM's m·j).
- mask: SDPA's attn_mask, broadcastable to (B, Hq, Nq, Nk): boolean (True: take part) or float (added to the
  scores after the scale and the cap). A row that sees no key at all gives zeros, as SDPA does.
- dropout_p: after the softmax, each probability is kept with probability 1 − p and scaled by 1/(1 − p). The
  keep decisions come from Philox (`tl.rand`) keyed by `seed` and the (batch·heads, row, column) position, so the
  backward regenerates them; `seed` is drawn from torch's default generator at the call, so torch.manual_seed
  reproduces a run.
"""
from __future__ import annotations

import reprlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..db.types import window_bucket
from .checks import AttnShape, _as_float, check_softcap

__all__ = ["NO_MODS", "NO_WINDOW", "SDPA_FEATURES", "UNBOUNDED", "Features", "ScoreMods", "capped", "check_dropout",
           "check_mods", "check_window", "draw_seed", "dropout_keep_mask", "sdpa_computes", "sdpa_mask", "sinks_grad"]

NO_WINDOW: tuple[int, int] = (-1, -1)
UNBOUNDED = 1 << 30  # what an unbounded window side becomes in the kernels: farther than any sequence


@dataclass(frozen=True, eq=False)
class ScoreMods:
    """A call's score modifiers, checked (`check_mods`); the default modifies nothing.

    Tensors are as the kernels read them: `sinks` (Hq,) float32 contiguous; `alibi` (B, Hq) float32 (a (Hq,)
    argument is a stride-0 expansion); `mask` the user's mask expanded to (B, Hq, Nq, Nk) (stride 0 where it
    broadcasts), bool or a float dtype.
    """

    softcap: float = 0.0
    window: tuple[int, int] = NO_WINDOW
    sinks: Tensor | None = None
    alibi: Tensor | None = None
    mask: Tensor | None = None
    dropout_p: float = 0.0
    seed: int = 0

    @property
    def plain(self) -> bool:
        """Nothing but (at most) a softcap: the kernels' fast relaunch path takes these calls."""
        return (self.window == NO_WINDOW and self.sinks is None and self.alibi is None and self.mask is None
                and not self.dropout_p)

    @property
    def windowed(self) -> bool:
        return self.window != NO_WINDOW

    @property
    def mask_kind(self) -> str:
        """The key's mask field: "none", "bool" or "float"."""
        if self.mask is None:
            return "none"
        return "bool" if self.mask.dtype == torch.bool else "float"

    def window_sides(self, causal: bool) -> tuple[int, int]:
        """(left, right) as the kernels take them: an unbounded side is UNBOUNDED; causal caps right at 0."""
        left, right = self.window
        left = UNBOUNDED if left < 0 else left
        right = UNBOUNDED if right < 0 else right
        return left, (min(right, 0) if causal else right)

    def features(self, seq_k: int) -> dict[str, Any]:
        """The key's feature fields (db.types.Key) of a call with `seq_k` keys; only those that are on."""
        out: dict[str, Any] = {}
        if self.windowed:
            w = window_bucket(self.window[0], self.window[1], seq_k)
            if w:
                out["window"] = w
        if self.softcap:
            out["softcap"] = True
        if self.sinks is not None:
            out["sinks"] = True
        if self.alibi is not None:
            out["alibi"] = True
        if self.dropout_p:
            out["dropout"] = True
        if self.mask is not None:
            out["mask"] = self.mask_kind
        return out

    def key_features(self, seq_k: int) -> Features:
        """`features` as the dispatcher carries them: a sorted tuple of (field, value), hashable; () for none."""
        return tuple(sorted(self.features(seq_k).items())) if self is not NO_MODS else ()


Features = tuple[tuple[str, Any], ...]  # a key's feature fields that are on, sorted: (("softcap", True), ...)

# The features SDPA can compute given an attn_mask (the window as a boolean mask, ALiBi as a float bias, the
# mask itself); softcap, sinks and dropout it cannot reproduce (dropout: not the same draws).
SDPA_FEATURES = frozenset({"window", "alibi", "mask"})


def sdpa_computes(features: Features) -> bool:
    """Whether an SDPA backend that takes an attn_mask computes a call with these key features."""
    return all(name in SDPA_FEATURES for name, _ in features)


NO_MODS = ScoreMods()
CAPPED: dict[float, ScoreMods] = {}  # softcap-only modifiers by cap: the common modified call allocates nothing


def capped(softcap: float) -> ScoreMods:
    """The modifiers of a call with only a softcap (NO_MODS for 0), shared per cap value."""
    if not softcap:
        return NO_MODS
    mods = CAPPED.get(softcap)
    if mods is None:
        if len(CAPPED) > 64:
            CAPPED.clear()
        mods = CAPPED[softcap] = ScoreMods(softcap=softcap)
    return mods


def check_window(window_size: Any) -> tuple[int, int]:
    """`window_size` as (left, right) ints, each -1 (unbounded) or >= 0; TypeError / ValueError naming it otherwise."""
    if window_size is None:
        return NO_WINDOW
    try:
        left, right = window_size
    except (TypeError, ValueError):
        raise TypeError(f"window_size must be a pair (left, right) of ints, -1 for unbounded, "
                        f"got {reprlib.repr(window_size)}") from None
    sides = []
    for name, side in (("left", left), ("right", right)):
        if isinstance(side, (bool, np.bool_)) or not isinstance(side, (int, np.integer)):
            raise TypeError(f"window_size {name} must be an int (-1 for unbounded), got {reprlib.repr(side)}")
        side = int(side)
        if side < -1 or side >= UNBOUNDED:
            raise ValueError(f"window_size {name} must be -1 (unbounded) or an int from 0 to {UNBOUNDED - 1}, "
                             f"got {side}")
        sides.append(side)
    return sides[0], sides[1]


def _check_vector(name: str, t: Any, shape: AttnShape, device: torch.device, allow_batch: bool) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but query is on {device}")
    shapes = [(shape.heads_q,)] + ([(shape.batch, shape.heads_q)] if allow_batch else [])
    if tuple(t.shape) not in shapes:
        wanted = " or ".join(str(s) for s in shapes)
        raise ValueError(f"{name} must have shape {wanted} (one per query head), got {tuple(t.shape)}")
    return t


def _check_mask(mask: Any, shape: AttnShape, device: torch.device) -> Tensor:
    if not isinstance(mask, Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        raise TypeError(f"attn_mask must be bool or floating point, got {mask.dtype}")
    if mask.device != device:
        raise ValueError(f"attn_mask is on {mask.device} but query is on {device}")
    full = (shape.batch, shape.heads_q, shape.seq_q, shape.seq_k)
    if mask.dim() > 4:
        raise ValueError(f"attn_mask must broadcast to {full}, got {tuple(mask.shape)}")
    try:
        return mask.expand(full)  # a view: stride 0 where the mask broadcasts
    except RuntimeError:
        raise ValueError(f"attn_mask of shape {tuple(mask.shape)} does not broadcast to "
                         f"(batch, query heads, Nq, Nk) = {full}") from None


def check_dropout(dropout_p: Any) -> float:
    """`dropout_p` as a float in [0, 1); ValueError naming it otherwise."""
    value = _as_float(dropout_p)
    if not 0.0 <= value < 1.0:  # NaN fails too
        raise ValueError(f"dropout_p must be a number in [0, 1), got {reprlib.repr(dropout_p)}")
    return value


def draw_seed() -> int:
    """A Philox seed from torch's default CPU generator (no device sync; torch.manual_seed reproduces it)."""
    return int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())


def check_mods(shape: AttnShape, device: torch.device, *, softcap: Any = 0.0, window_size: Any = None,
               sinks: Any = None, alibi_slopes: Any = None, attn_mask: Any = None, dropout_p: Any = 0.0,
               seed: int | None = None) -> ScoreMods:
    """The checked modifiers of one call with inputs of `shape` on `device` (TypeError / ValueError naming the
    problem). Dropout applies whenever dropout_p > 0, as in SDPA (modules pass 0 in eval mode); a call with
    dropout draws its seed here unless `seed` is given (the backward of the same call)."""
    cap = check_softcap(softcap) if softcap else 0.0
    window = check_window(window_size)
    sinks_t = None
    if sinks is not None:
        sinks_t = _check_vector("sinks", sinks, shape, device, allow_batch=False).float().contiguous()
    alibi_t = None
    if alibi_slopes is not None:
        a = _check_vector("alibi_slopes", alibi_slopes, shape, device, allow_batch=True).float()
        alibi_t = a.expand(shape.batch, shape.heads_q) if a.dim() == 1 else a
    mask_t = None if attn_mask is None else _check_mask(attn_mask, shape, device)
    p = check_dropout(dropout_p) if dropout_p else 0.0
    if p and seed is None:
        seed = draw_seed()
    return ScoreMods(softcap=cap, window=window, sinks=sinks_t, alibi=alibi_t, mask=mask_t, dropout_p=p,
                     seed=seed if p else 0)


def sinks_grad(sinks: Tensor, lse: Tensor, delta: Tensor) -> Tensor:
    """d loss / d sinks, (Hq,) float32: −Σ_{b,i} exp(sinks[h] − lse[b,h,i])·delta[b,h,i].

    `lse` (B, Hq, Nq) is the natural-log row log-sum-exp including the sink, `delta` (B, Hq, Nq) = rowsum(dO ∘ O).
    The sink's probability in row i is exp(sink − lse_i); it carries no value, so its dP is 0 and its dS is
    −P_sink·delta_i. A sink takes part in every row, so lse is finite wherever a sink is.
    """
    p_sink = torch.exp(sinks.float().view(1, -1, 1) - lse.float())
    return -(p_sink * delta.float()).sum(dim=(0, 2))


def dropout_keep_mask(seed: int, dropout_p: float, batch: int, heads: int, seq_q: int, seq_k: int,
                      device: torch.device | str) -> Tensor:
    """The keep mask (B, H, Nq, Nk) bool that the kernels draw for a call with dropout seed `seed`: what a
    reference is given to check a dropout call exactly."""
    from .jit.common import one_axis_grid
    from .jit.dropout import dropout_mask_kernel

    out = torch.empty((batch, heads, seq_q, seq_k), dtype=torch.int8, device=device)
    dropout_mask_kernel[one_axis_grid(batch, heads, seq_q, 32)](out, seed, dropout_p, seq_q, seq_k, heads,
                                                                 BLOCK_M=32, BLOCK_N=32)
    return out.bool()


def _compact(t: Tensor) -> Tensor:
    """`t` with each expanded (stride-0) dimension cut to size 1: the broadcast shape it was expanded from."""
    return t[tuple(slice(0, 1) if stride == 0 else slice(None) for stride in t.stride())]


def sdpa_mask(mods: ScoreMods, shape: AttnShape, causal: bool, device: torch.device | str,
              dtype: torch.dtype) -> Tensor | None:
    """The `attn_mask` with which torch SDPA computes a call of `shape` with `mods`, or None when SDPA needs none
    (no window, ALiBi or mask: call it with is_causal=`causal`).

    A mask returned has the causal mask folded in (SDPA refuses attn_mask with is_causal): call SDPA with it and
    is_causal=False. It is boolean (True: take part) when only the window, the causal mask and a boolean mask
    restrict the keys, else a float bias in `dtype` (the query's: SDPA takes a float mask of the query's dtype):
    −slope·|j − i| for ALiBi plus a float mask, −inf where a key is hidden. The window is top-left aligned
    (diag = 0, `attention()`'s). Its shape broadcasts to (B, Hq, Nq, Nk): a dimension is 1 where nothing varies
    along it. ValueError for modifiers SDPA does not compute (softcap, sinks, dropout).
    """
    missing = [name for name, on in (("softcap", bool(mods.softcap)), ("sinks", mods.sinks is not None),
                                     ("dropout", bool(mods.dropout_p))) if on]
    if missing:
        raise ValueError(f"torch SDPA does not compute {', '.join(missing)}: no attn_mask expresses it")
    if not mods.windowed and mods.alibi is None and mods.mask is None:
        return None
    rel = (torch.arange(shape.seq_k, device=device).view(1, -1)
           - torch.arange(shape.seq_q, device=device).view(-1, 1))  # j − i: the key's offset from the diagonal
    keep: Tensor | None = None
    if causal:
        keep = rel <= 0
    if mods.windowed:
        left, right = mods.window_sides(causal)
        seen = (rel >= -left) & (rel <= right)
        keep = seen if keep is None else keep & seen
    if keep is not None:
        keep = keep.view(1, 1, shape.seq_q, shape.seq_k)
    if mods.mask is not None and mods.mask.dtype == torch.bool:
        given = _compact(mods.mask).to(device)
        keep = given if keep is None else keep & given
    bias: Tensor | None = None
    if mods.alibi is not None:
        slopes = _compact(mods.alibi).to(device=device, dtype=torch.float32)  # (B or 1, Hq or 1)
        bias = -slopes.view(*slopes.shape, 1, 1) * rel.abs().float().view(1, 1, shape.seq_q, shape.seq_k)
    if mods.mask is not None and mods.mask.dtype != torch.bool:
        given = _compact(mods.mask).to(device=device, dtype=torch.float32)
        bias = given if bias is None else bias + given
    if bias is None:
        return keep
    if keep is not None:
        bias = torch.where(keep, bias, float("-inf"))  # broadcasts both ways (masked_fill only the mask)
    return bias.to(dtype)
