"""The score modifiers a key's workload runs with: one `ScoreMods` (kernel.mods) built from the key's features.

A feature key (db.types.Key: window, softcap, sinks, alibi, dropout, mask) is timed and checked with nominal
modifiers of the kind the key names. What a config costs depends on which modifiers are on, not on their values;
the values are chosen so that each modifier changes the output far beyond the check's tolerance (a candidate that
ignored one fails):

- softcap: a cap of `NOMINAL_SOFTCAP` (1), which the scores of N(0, 1) inputs reach (tanh bends them);
- window W (a power-of-two bucket): sides whose total span left + 1 + right is W where the keys allow it
  (`nominal_window`: causal (W − 1, 0), the last W keys; otherwise split about the diagonal), so that
  `window_bucket` of the sides gives the key's W back;
- sinks: one logit per query head, log(Nk) + N(0, 1): of the order of a row's log-sum-exp, so the sink takes a
  real share of every row;
- alibi: the standard slopes of Hq heads (`alibi_slopes`: 2^(−8i/H), i = 1..H, interleaved for an H that is no
  power of two);
- mask "bool": (B, 1, Nq, Nk), per-sequence key padding (a random valid length of at least Nk/2) and random
  8×8 blocks hidden (a fifth of them); key 0 and the diagonal keys before the padding stay visible, so most rows
  see keys (a row may still see none under a window: it gives zeros, the convention);
- mask "float": a (B, 1, Nq, Nk) N(0, 1) bias in the inputs' dtype (what transformers builds: one per sequence);
- dropout: p = `NOMINAL_DROPOUT` (0.1) with a fresh seed per workload (kernel.mods.draw_seed, through check_mods),
  which the reference turns into the kernels' own keep mask (kernel.mods.dropout_keep_mask).

The tensors are drawn from the workload's seeded generator after q, k and v, so a workload is the same for a
seed except for the dropout seed. kvcache keys take a window, softcap, sinks and ALiBi (bottom-right aligned, as
the cache's causal mask), never a mask or dropout (`check_features`).
"""
from __future__ import annotations

import math
from typing import Any

import torch

from ...db.types import FEATURE_DEFAULTS, Key, window_bucket
from ...kernel.checks import AttnShape
from ...kernel.mods import NO_MODS, ScoreMods, check_mods

NOMINAL_SOFTCAP = 1.0
NOMINAL_DROPOUT = 0.1
MASK_BLOCK = 8  # the random hidden blocks of a boolean mask: smaller than any kernel tile, so tiles are partial
MASK_HIDDEN = 0.2  # the share of those blocks hidden
# The ops whose kernels take each feature: a decode call has no explicit mask and no dropout (inference), and
# a paged cache's page size is its own; a packed call takes the window, softcap and sinks, and has its tokens.
KVCACHE_FEATURES = frozenset({"window", "softcap", "sinks", "alibi", "page_size"})
VARLEN_FEATURES = frozenset({"window", "softcap", "sinks", "tokens"})
VARLEN_OPS = ("varlen", "varlen_bwd")
# The features that modify the scores (the rest say how the inputs are laid out: packed, paged).
SCORE_FEATURES = tuple(name for name in FEATURE_DEFAULTS if name not in ("tokens", "page_size"))


def has_features(key: Key) -> bool:
    """Whether any score modifier of `key` is on (a packed call's tokens and a page size are layouts, not
    modifiers)."""
    return any(getattr(key, name) != FEATURE_DEFAULTS[name] for name in SCORE_FEATURES)


def nominal_window(window: int, causal: bool, seq_k: int) -> tuple[int, int]:
    """The (left, right) sides a key with window bucket `window` is timed with, on `seq_k` keys: a span of
    `window` keys (the last `window` keys when causal, else split about the diagonal), or, where `seq_k` keys
    cannot hold that span without the window covering every key, the widest span they can (2·Nk − 1). ValueError
    when no window on `seq_k` keys has the bucket `window` (then no call records such a key)."""
    span = min(window, 2 * seq_k - 1)
    if causal:
        left = min(span - 1, seq_k)
        right = span - 1 - left  # 0 unless the span is wider than the keys: a causal call caps it at 0 anyway
    else:
        right = (span - 1) // 2
        left = span - 1 - right
        if left >= seq_k - 1 and right >= seq_k - 1:  # both sides reach every key: that is no window
            left, right = seq_k, seq_k - 2
    if span < 1 or right < 0 or window_bucket(left, right, seq_k) != window:
        raise ValueError(f"no sliding window on {seq_k} keys is of size {window}: a window that wide covers "
                         "every key (no window at all)")
    return left, right


def alibi_slopes(heads: int) -> list[float]:
    """ALiBi's standard slopes for `heads` heads (Press et al.; BLOOM's): 2^(−8i/H) for i = 1..H when H is a
    power of two; else those of the power of two below H, then every other slope of twice that many."""
    def geometric(n: int) -> list[float]:
        return [2.0 ** (-8.0 * i / n) for i in range(1, n + 1)]

    below = 1 << (heads.bit_length() - 1)
    if below == heads:
        return geometric(heads)
    return geometric(below) + geometric(2 * below)[0::2][:heads - below]


_TAKES: dict[str, tuple[frozenset[str], str]] = {
    "kvcache": (KVCACHE_FEATURES, "attention_kvcache"),
    **{op: (VARLEN_FEATURES, "attention_varlen") for op in VARLEN_OPS}}


def op_takes(op: str) -> tuple[frozenset[str], str]:
    """(the features keys of `op` take, the API whose calls they are); the dense ops take every score modifier."""
    return _TAKES.get(op, (frozenset(SCORE_FEATURES), "attention"))


def check_features(key: Key) -> None:
    """ValueError for a key whose features its op's kernels do not take, or whose window no call can have."""
    allowed, api = op_takes(key.op)
    other = [name for name in key.features_on() if name not in allowed]
    if other:
        raise ValueError(f"{key}: a {key.op} key takes no {' or '.join(other)} ({api} has none)")
    if key.window:
        nominal_window(key.window, key.causal, key.seq_len_kv)


def _bool_mask(batch: int, seq_q: int, seq_k: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    lengths = torch.randint((seq_k + 1) // 2, seq_k + 1, (batch, 1, 1, 1), generator=gen, device=device)
    j = torch.arange(seq_k, device=device).view(1, 1, 1, -1)
    i = torch.arange(seq_q, device=device).view(1, 1, -1, 1)
    blocks = torch.rand(batch, 1, -(-seq_q // MASK_BLOCK), -(-seq_k // MASK_BLOCK), generator=gen,
                        device=device) < MASK_HIDDEN
    hidden = blocks.repeat_interleave(MASK_BLOCK, 2).repeat_interleave(MASK_BLOCK, 3)[..., :seq_q, :seq_k]
    return (j < lengths) & (~hidden | (j == 0) | (j == i))


def workload_mods(key: Key, shape: AttnShape, gen: torch.Generator, device: torch.device,
                  dtype: torch.dtype) -> ScoreMods:
    """The modifiers of `key`'s workload of `shape` (its inputs' sizes), drawn from `gen` on `device`, checked
    as the API checks a call's (kernel.mods.check_mods); NO_MODS for a key without features."""
    if not has_features(key):
        return NO_MODS
    check_features(key)
    b, hq, nq, nk = shape.batch, shape.heads_q, shape.seq_q, shape.seq_k
    args: dict[str, Any] = {}
    if key.softcap:
        args["softcap"] = NOMINAL_SOFTCAP
    if key.window:
        args["window_size"] = nominal_window(key.window, key.causal, nk)
    if key.sinks:
        args["sinks"] = math.log(nk) + torch.randn(hq, generator=gen, device=device, dtype=torch.float32)
    if key.alibi:
        args["alibi_slopes"] = torch.tensor(alibi_slopes(hq), dtype=torch.float32, device=device)
    if key.mask == "bool":
        args["attn_mask"] = _bool_mask(b, nq, nk, gen, device)
    elif key.mask == "float":
        args["attn_mask"] = torch.randn(b, 1, nq, nk, generator=gen, device=device, dtype=dtype)
    if key.dropout:
        args["dropout_p"] = NOMINAL_DROPOUT
    return check_mods(shape, device, **args)


def mods_bytes(key: Key, batch: int, heads_q: int) -> int:
    """Device bytes a workload's modifiers hold beyond q, k and v: its mask, and the attn_mask an SDPA candidate
    is given (kernel.mods.sdpa_mask: a float bias over every head with ALiBi)."""
    if not has_features(key):
        return 0
    elt = {"float16": 2, "bfloat16": 2, "float32": 4}[key.dtype]
    plane = key.seq_len * key.seq_len_kv
    held = batch * plane * (elt if key.mask == "float" else 1) if key.mask != "none" else 0
    if key.alibi:
        held += batch * heads_q * plane * elt
    elif key.window or key.mask != "none":
        held += batch * plane * elt
    return held + heads_q * 8 * (1 + batch)  # sinks and slopes
