"""Input checks of every public entry point: q/k/v, the backward's tensors, the KV cache and its lengths,
and the scalar arguments. Each raises TypeError or ValueError with one line naming the argument."""
from __future__ import annotations

import math
import reprlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..db.types import HEAD_DIMS, HEAD_DIMS_TEXT, INT32_MAX

from . import device as _device
from .dtypes import DTYPE_NAMES, FP8_DTYPES
from .jit.common import GRID_X_MAX, one_axis_grid


_PRECISIONS = ("ieee", "tf32")


_MIN_BLOCK_M = 16  # the smallest query tile of any config (db.types.Config)


@dataclass(frozen=True)
class AttnShape:
    """The sizes one attention call works on, after validation."""

    batch: int
    heads_q: int
    heads_kv: int
    seq_q: int
    seq_k: int
    head_dim: int
    dtype: str

    @property
    def group(self) -> int:
        """Query heads per key/value head (1 for plain multi-head attention)."""
        return self.heads_q // self.heads_kv


def check_dense(name: str, t: Any, rank: str, *, fp8: bool = False) -> None:
    """`t` is a dense (strided) tensor of a supported dtype with the rank `rank` names ("4-D (batch, ...)");
    TypeError for the type, layout or dtype, ValueError for the rank, each naming `name`. fp8 dtypes
    (kernel.dtypes.FP8_DTYPES) only with `fp8`: the inference forward alone takes them."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    # is_nested first: a strided-layout nested tensor answers .layout but raises on sizes.
    if t.is_nested or t.layout is not torch.strided:
        raise TypeError(f"{name} has layout {'nested' if t.is_nested else t.layout}: the kernel needs "
                        "dense (strided) tensors")
    if t.dim() != int(rank[0]):
        raise ValueError(f"{name} must be {rank}, got shape {tuple(t.shape)}")
    if t.dtype not in DTYPE_NAMES:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: {', '.join(DTYPE_NAMES.values())}")
    if not fp8 and t.dtype in FP8_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}: fp8 inputs run only in flashtune.kernel.attention's "
                        "inference forward (with q_descale, k_descale, v_descale); this entry point takes "
                        "float16, bfloat16 or float32")


def check_int32(name: str, t: Any, device: torch.device, shape: str, *, optional: bool = False) -> None:
    """`t` is a dense int32 tensor on `device` (an index argument: lengths, offsets, a page table; `shape` names
    its shape in the messages, which the caller checks); TypeError for the type, layout and dtype, ValueError
    for the device, each naming `name`."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be {'None or ' if optional else ''}an int32 torch.Tensor of shape {shape}, "
                        f"got {type(t).__name__}")
    if t.is_nested or t.layout is not torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor")
    if t.dtype != torch.int32:
        raise TypeError(f"{name} has dtype {t.dtype}; it must be torch.int32 (convert with .to(torch.int32))")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}; it must be on q's device {device}")


def check_qkv(q: Any, k: Any, v: Any, *, names: tuple[str, str, str] = ("q", "k", "v"),
              fp8: bool = False) -> AttnShape:
    """Validate q (B, Hq, Nq, D) and k, v (B, Hkv, Nk, D), any strides, named `names` in messages; their sizes.

    The checks every entry point shares (the forward, the KV-cache path): tensors, dense layouts,
    rank, dtype, non-empty, one dtype and device, matching batch/head dim/K-V shapes, a head dim in
    db.types.HEAD_DIMS (flash_attn's rule: multiples of 8 up to 256), Hq a multiple of Hkv, and
    32-bit offsets inside one (batch, head) slice. TypeError for types, layouts and dtypes,
    ValueError for the rest; the message names the argument.
    """
    for name, t in zip(names, (q, k, v)):
        check_dense(name, t, "4-D (batch, heads, seq_len, head_dim)", fp8=fp8)
        if t.numel() == 0:
            raise ValueError(f"{name} is empty (shape {tuple(t.shape)}): every dimension must be at least 1")
    listed = ", ".join(names)
    nq_, nk_, nv_ = names
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{listed} must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{listed} must be on one device, got {q.device}, {k.device}, {v.device}")
    b, hq, nq, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"{nk_} and {nv_} must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    bk, hkv, nk, dk = k.shape
    if bk != b:
        raise ValueError(f"batch size differs: {nq_} has {b}, {nk_} and {nv_} have {bk}")
    if dk != d:
        raise ValueError(f"head dim differs: {nq_} has {d}, {nk_} and {nv_} have {dk}")
    if d not in HEAD_DIMS:
        raise ValueError(f"unsupported head dim {d}: the last dim of {listed} must be {HEAD_DIMS_TEXT}")
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv}) for GQA/MQA")
    for name, t in zip(names, (q, k, v)):
        if not head_span_fits(t.shape[2], t.stride(), d):
            raise ValueError(f"{name} spans more than 2**31 elements within one head "
                             f"(shape {tuple(t.shape)}, strides {t.stride()}): split the sequence")
    return AttnShape(b, hq, hkv, nq, nk, d, DTYPE_NAMES[q.dtype])


def head_span_fits(seq: int, strides: tuple[int, ...], head_dim: int) -> bool:
    """Whether one (batch, head) slice of `seq` rows of a (B, H, seq, head_dim) tensor with `strides`
    spans at most 2**31 elements: offsets inside a slice are 32-bit in the kernels."""
    return (seq - 1) * strides[2] + (head_dim - 1) * strides[3] <= INT32_MAX


def check_tensors(q: Any, k: Any, v: Any, *, fp8: bool = False) -> AttnShape:
    """Validate q, k, v of layout (batch, heads, seq, head_dim), any strides; return their sizes.

    What planning needs (dispatch.explain for another arch): it does not ask whether this machine
    can run them; check_inputs does. Raises TypeError for non-tensors, layouts and unsupported or
    mismatched dtypes, ValueError for devices, ranks, sizes and head dims; the message names the
    argument, the value and what is accepted.
    """
    shape = check_qkv(q, k, v, fp8=fp8)
    if one_axis_grid(shape.batch, shape.heads_q, shape.seq_q, _MIN_BLOCK_M)[0] > GRID_X_MAX:
        # Only broadcast (stride-0) inputs get here: real memory runs out long before.
        raise ValueError(f"q of shape {tuple(q.shape)} needs more than 2**31-1 programs (batch x heads x "
                         f"query blocks of {_MIN_BLOCK_M} rows), CUDA's grid limit: split the batch")
    return shape


def check_runnable(t: torch.Tensor, names: str = "q, k, v") -> None:
    """Raise unless a kernel can run here on `t`'s device and dtype (`names`: the tensors it stands
    for, in the message): CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 in fp16/fp32.
    ValueError for the device; TypeError for bf16 under the interpreter, whose bf16 dots are wrong."""
    if t.device.type == "cuda":
        return
    if not (t.device.type == "cpu" and _device.INTERPRET):
        raise ValueError(f"{names} are on {t.device}: the kernel needs CUDA tensors "
                         "(CPU tensors run only under TRITON_INTERPRET=1)")
    if t.dtype == torch.bfloat16:
        raise TypeError(f"{names} are bfloat16 on the CPU: the Triton interpreter computes bf16 dots "
                        "wrongly (numpy has no bfloat16; results are off by orders of magnitude), so "
                        "under TRITON_INTERPRET=1 use float16 or float32; bf16 runs on CUDA GPUs")


def check_inputs(q: Any, k: Any, v: Any, *, fp8: bool = False) -> AttnShape:
    """check_tensors, and check_runnable: that this machine can run the kernel on them (`fp8`: fp8 inputs
    are accepted, for the fp8 forward and its planning)."""
    shape = check_tensors(q, k, v, fp8=fp8)
    check_runnable(q)
    return shape


def check_bool(value: Any, name: str) -> bool:
    """`value` as a bool when it is one (numpy bools included); TypeError naming `name` otherwise.

    bool() would turn "False", "no", 2.5 or [] into True: a silently wrong result (causal attention,
    GQA, skipped checks). torch SDPA raises TypeError for these too. Callers on the hot path test
    `type(value) is bool` first and call this only otherwise.
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be a bool (True or False), got {value!r} of type {type(value).__name__}")


def needs_grad(q: Any, k: Any, v: Any) -> bool:
    """Whether autograd would have to differentiate through the call (grad mode on, an input requiring grad)."""
    return torch.is_grad_enabled() and (getattr(q, "requires_grad", False) or getattr(k, "requires_grad", False)
                                        or getattr(v, "requires_grad", False))


def device_limits(t: torch.Tensor) -> tuple[str | None, int | None]:
    """(arch, per-block shared memory) of `t`'s CUDA device; (None, None) for the interpreter's CPU tensors,
    which have no limit to check against."""
    if t.device.type != "cuda":
        return None, None
    return _device.device_arch(t.device), _device.device_smem_limit(t.device)


# The scalars torch SDPA takes as a scale: Python and numpy ints and floats (np.float64 is a float
# already; np.float32, np.float16 and numpy ints are not). Bools are refused although torch takes them.
_SCALE_TYPES = (int, float, np.integer, np.floating)


def _as_float(value: Any) -> float:
    """`value` as a float if it is a Python or numpy int or float (not a bool), else NaN (an int beyond
    float's range, e.g. 10**400, too)."""
    if isinstance(value, _SCALE_TYPES) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            pass
    return math.nan


def check_softcap(softcap: Any) -> float:
    """The logit cap as a float: 0 (off) or a finite number > 0 (Python or numpy int or float); ValueError
    naming it otherwise."""
    value = _as_float(softcap)
    # Comparisons only (no math.isfinite): torch.compile traces them without a graph break; NaN fails both.
    if not (value == 0.0 or 0.0 < value < math.inf):
        raise ValueError(f"softcap must be 0 (off) or a finite number > 0, got {reprlib.repr(softcap)}")
    return value


def check_scale(scale: Any, head_dim: int) -> float:
    """The softmax scale to use: 1/sqrt(head_dim) for None, else `scale` as a float if it is a finite
    number (Python or numpy int or float); ValueError naming it otherwise."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    value = _as_float(scale)
    if not math.isfinite(value):
        raise ValueError(f"scale must be a finite number, got {reprlib.repr(scale)}")
    return value


def check_precision(fp32_precision: Any) -> str:
    """`fp32_precision` if it is one the kernels take ("ieee" or "tf32"); ValueError naming it otherwise."""
    if fp32_precision not in _PRECISIONS:
        raise ValueError(f"fp32_precision must be one of {', '.join(_PRECISIONS)}, got {fp32_precision!r}")
    return fp32_precision


def _check_like(name: str, t: Any, q: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout is not torch.strided or t.is_nested:
        raise TypeError(f"{name} has layout {'nested' if t.is_nested else t.layout}: the kernel needs "
                        "dense (strided) tensors")
    if t.shape != q.shape:
        raise ValueError(f"{name} must have q's shape {tuple(q.shape)}, got {tuple(t.shape)}")
    if t.dtype != q.dtype:
        raise TypeError(f"{name} has dtype {t.dtype}; it must match q's dtype {q.dtype}")
    if t.device != q.device:
        raise ValueError(f"{name} is on {t.device}; it must be on q's device {q.device}")
    if (t.shape[2] - 1) * t.stride(2) + (t.shape[3] - 1) * t.stride(3) > INT32_MAX:
        raise ValueError(f"{name} spans more than 2**31 elements within one head "
                         f"(shape {tuple(t.shape)}, strides {t.stride()}): split the sequence")


def check_bwd_inputs(do: Any, q: Any, k: Any, v: Any, o: Any, lse: Any) -> AttnShape:
    """Validate the backward's tensors; return the sizes. TypeError/ValueError naming the argument.

    q, k, v as the forward (kernel.checks.check_inputs); do and o with q's shape, dtype and device
    (any strides); lse the forward's fp32 (B, Hq, Nq) log-sum-exp on the same device.
    """
    shape = check_inputs(q, k, v)
    _check_like("do", do, q)
    _check_like("o", o, q)
    if not isinstance(lse, torch.Tensor):
        raise TypeError(f"lse must be a torch.Tensor, got {type(lse).__name__}")
    if lse.layout is not torch.strided or lse.is_nested:
        raise TypeError(f"lse has layout {'nested' if lse.is_nested else lse.layout}: the kernel needs a dense tensor")
    expected = (shape.batch, shape.heads_q, shape.seq_q)
    if tuple(lse.shape) != expected:
        raise ValueError(f"lse must have shape (batch, heads_q, seq_q) = {expected}, got {tuple(lse.shape)}")
    if lse.dtype != torch.float32:
        raise TypeError(f"lse has dtype {lse.dtype}; it must be float32 (attention_fwd(..., return_lse=True))")
    if lse.device != q.device:
        raise ValueError(f"lse is on {lse.device}; it must be on q's device {q.device}")
    return shape


_NAMES = ("q", "k_cache", "v_cache")


def check_kvcache_inputs(q: Any, k_cache: Any, v_cache: Any) -> AttnShape:
    """Validate q (B, Hq, Nq, D) and the caches (B, Hkv, Nmax, D), any strides; return the sizes.

    AttnShape.seq_k is Nmax. Raises TypeError for non-tensors, layouts and dtypes, ValueError for
    devices, ranks, sizes and head dims; the message names the argument, the value and what is accepted.
    """
    shape = check_qkv(q, k_cache, v_cache, names=_NAMES)
    check_runnable(q, ", ".join(_NAMES))
    b, hq, nq = shape.batch, shape.heads_q, shape.seq_q
    if b * hq * nq > INT32_MAX:
        # Only broadcast (stride-0) inputs get here: real memory runs out long before.
        raise ValueError(f"q of shape {tuple(q.shape)} has more than 2**31-1 rows (batch x heads x queries), "
                         "CUDA's grid limit for the combine pass: split the batch")
    return shape


def _lengths_checkable(t: torch.Tensor) -> bool:
    # Reading the lengths is a device-to-host copy: impossible inside CUDA-graph capture, and not
    # traceable under torch.compile. There the kernel's clamp to [0, Nmax] keeps any value in bounds.
    if torch.compiler.is_compiling():
        return False
    return not (t.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def check_cache_seqlens(cache_seqlens: Any, shape: AttnShape, device: torch.device, causal: bool, *,
                        check_values: bool = True) -> torch.Tensor | None:
    """Validate cache_seqlens: None, or an int32 (B,) tensor on q's device with values in range.

    Accepted lengths: 0 (an empty slot of a static batch: its rows are zeros) up to Nmax; with
    causal=True a non-empty sequence needs at least Nq keys (query 0 sees keys j <= len − Nq).
    Checking values reads the tensor on the host (one small copy and a sync); it is skipped during
    CUDA-graph capture and torch.compile tracing, and with check_values=False.
    """
    return check_cache_lengths(cache_seqlens, shape.batch, shape.seq_q, shape.seq_k, device, causal, check_values)


def check_cache_lengths(cache_seqlens: Any, batch: int, seq_q: int, seq_kv: int, device: torch.device, causal: bool,
                        check_values: bool) -> torch.Tensor | None:
    # check_cache_seqlens on plain sizes: the planned path has the exact cache length Nmax = seq_kv
    # per call while its plan is shared by every length of a bucket.
    if cache_seqlens is None:
        if causal and seq_q > seq_kv:
            raise ValueError(f"causal=True needs at least as many cached keys as queries: Nq={seq_q} > "
                             f"Nmax={seq_kv} (query 0 would see no key with bottom-right alignment)")
        return None
    check_int32("cache_seqlens", cache_seqlens, device, f"({batch},)", optional=True)
    if tuple(cache_seqlens.shape) != (batch,):
        raise ValueError(f"cache_seqlens must have shape ({batch},) (one length per sequence), got "
                         f"{tuple(cache_seqlens.shape)}")
    if check_values and _lengths_checkable(cache_seqlens):
        lengths = cache_seqlens.cpu()
        bad = (lengths < 0) | (lengths > seq_kv)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"cache_seqlens[{i}] = {int(lengths[i])} is out of range: lengths must be from 0 to "
                             f"the cache length Nmax={seq_kv}")
        if causal:
            short = (lengths > 0) & (lengths < seq_q)
            if bool(short.any()):
                i = int(short.nonzero()[0, 0])
                raise ValueError(f"cache_seqlens[{i}] = {int(lengths[i])} is shorter than the {seq_q} queries "
                                 "with causal=True: with bottom-right alignment query i sees keys j <= len − Nq + i, "
                                 "so the first queries would see no key (lengths must be 0 or >= Nq)")
    return cache_seqlens


MIN_PAGE_SIZE = 16  # the smallest page of a paged KV cache: one key tile of the smallest config


def _paged_cache_views(q: torch.Tensor, k_cache: Any, v_cache: Any, max_pages: int) -> tuple[Any, Any]:
    # Stride-0 views of the paged caches with the equivalent contiguous shape (B, Hkv, max_pages·page_size, D):
    # check_kvcache_inputs and the dispatcher read only their sizes, dtypes and devices, never their memory.
    _, page_size, heads_kv, head_dim = k_cache.shape
    size = (q.shape[0], heads_kv, max_pages * page_size, head_dim)
    return k_cache[0, 0, 0].expand(size), v_cache[0, 0, 0].expand(size)


def check_paged_inputs(q: Any, k_cache: Any, v_cache: Any, block_table: Any) -> tuple[AttnShape, Any, Any]:
    """Validate q (B, Hq, Nq, D), paged caches (num_pages, page_size, Hkv, D) and `block_table` (B, max_pages).

    Returns (the equivalent contiguous shape, seq_k = max_pages·page_size; the stride-0 views of that shape
    that stand in for the caches where only sizes, dtypes and devices matter, e.g. the dispatcher). The
    table must be a dense int32 2-D tensor on q's device with one row per sequence; page_size a power of two
    from MIN_PAGE_SIZE; k_cache and v_cache of one shape. The table's values are not read here (see
    check_block_table_values). TypeError for types, layouts and dtypes, ValueError for the rest.
    """
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    check_int32("block_table", block_table, q.device, "(batch, max_pages)", optional=True)
    if block_table.dim() != 2:
        raise ValueError(f"block_table must be 2-D (batch, max_pages), got shape {tuple(block_table.shape)}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_dense(name, t, "4-D (num_pages, page_size, kv_heads, head_dim) with a block_table")
        if t.numel() == 0:
            raise ValueError(f"{name} is empty (shape {tuple(t.shape)}): every dimension must be at least 1")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    page_size = k_cache.shape[1]
    if page_size < MIN_PAGE_SIZE or page_size & (page_size - 1):
        raise ValueError(f"page size (k_cache.shape[1]) must be a power of two from {MIN_PAGE_SIZE}, got {page_size}")
    if q.dim() >= 1 and block_table.shape[0] != q.shape[0]:
        raise ValueError(f"block_table has {block_table.shape[0]} rows; it needs one per sequence of q "
                         f"(batch {q.shape[0]})")
    if block_table.shape[1] == 0:
        raise ValueError("block_table has no columns: each sequence needs at least one page slot")
    if q.dim() != 4:
        raise ValueError(f"q must be 4-D (batch, heads, seq_len, head_dim), got shape {tuple(q.shape)}")
    k_view, v_view = _paged_cache_views(q, k_cache, v_cache, block_table.shape[1])
    return check_kvcache_inputs(q, k_view, v_view), k_view, v_view


def check_block_table_values(block_table: torch.Tensor, cache_seqlens: torch.Tensor, page_size: int,
                             num_pages: int) -> None:
    """Host check of a paged call's table (check_lengths=True): ValueError naming the first entry that a
    sequence uses (its first cdiv(len, page_size) entries) and that is not a page of the cache. A copy
    and a sync; skipped where reading is impossible (CUDA-graph capture, torch.compile tracing)."""
    if not (_lengths_checkable(block_table) and _lengths_checkable(cache_seqlens)):
        return
    table = block_table.cpu()
    lengths = cache_seqlens.cpu().clamp(0, table.shape[1] * page_size)
    used = torch.arange(table.shape[1])[None, :] * page_size < lengths[:, None]
    bad = used & ((table < 0) | (table >= num_pages))
    if bool(bad.any()):
        b, j = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"block_table[{b}, {j}] = {int(table[b, j])} is not a page of the cache: sequence {b} "
                         f"(length {int(lengths[b])}) uses it, and pages are 0 to {num_pages - 1}")
