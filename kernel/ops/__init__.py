"""The ops, each in its own module (fwd, bwd, kvcache, train, varlen: its forward and backward), and the one registry that the dispatcher, the tuner
and the exchange file's fit check read: each op's default config, shared-memory model and knob check.

An op module holds everything the op needs at run time: its knobs and variants, its default config, its
shared-memory model and its launch. Its @triton.jit kernels live in kernel/jit/, and its version
(kernel/version.py) hashes them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from ...db.types import Config

from . import bwd, fwd, kvcache, train, varlen

if TYPE_CHECKING:
    from ..checks import AttnShape


@dataclass(frozen=True)
class Op:
    """One op as the dispatcher, the tuner and the exchange file see it.

    `default(arch, shape, smem_limit or None, sm_count or None)`: the config a call of `shape` gets untuned;
    `smem(config, head_dim, dtype, arch or None)`: its estimated shared memory in bytes; `knobs(config)`:
    raises ValueError/TypeError for a config the op's kernels cannot run; `overridable`: whether
    FLASHTUNE_CONFIG applies to it."""

    name: str
    default: Callable[[str, "AttnShape", "int | None", "int | None"], Config]
    smem: Callable[[Config, int, str, "str | None"], int]
    knobs: Callable[[Config], Any]
    overridable: bool = False


def _fwd_default(arch: str, shape: "AttnShape", smem_limit: int | None, sm_count: int | None) -> Config:
    return fwd.default_config(arch, shape.head_dim, shape.dtype, smem_limit)


def _bwd_default(arch: str, shape: "AttnShape", smem_limit: int | None, sm_count: int | None) -> Config:
    return bwd.default_bwd_config(arch, shape.head_dim, shape.dtype, smem_limit)


def _train_default(arch: str, shape: "AttnShape", smem_limit: int | None, sm_count: int | None) -> Config:
    return train.default_train_config(arch, shape.head_dim, shape.dtype, smem_limit)


def _kvcache_default(arch: str, shape: "AttnShape", smem_limit: int | None, sm_count: int | None) -> Config:
    # The split count depends on the call's sizes and the GPU's SM count (DEFAULT_SM_COUNT when planning).
    return kvcache.default_decode_config(shape.seq_q, shape.seq_k, shape.head_dim, shape.dtype,
                                         batch_heads=shape.batch * shape.heads_q, group=shape.group,
                                         sm_count=sm_count, arch=arch, smem_limit=smem_limit)


OPS: dict[str, Op] = {
    "fwd": Op("fwd", _fwd_default, fwd.estimate_smem, fwd.fwd_variant, overridable=True),
    "bwd": Op("bwd", _bwd_default, bwd.estimate_bwd_smem, bwd.bwd_knobs),
    "kvcache": Op("kvcache", _kvcache_default, kvcache.estimate_decode_smem, kvcache.decode_knobs),
    "train": Op("train", _train_default, train.estimate_train_smem, train.train_knobs),
    # Packed sequences run the pointer kernels' tile loops: the dense forward's and backward's configs and models.
    "varlen": Op("varlen", _fwd_default, fwd.estimate_smem, varlen.varlen_knobs),
    "varlen_bwd": Op("varlen_bwd", _bwd_default, bwd.estimate_bwd_smem, bwd.bwd_knobs),
}


def op(name: str) -> Op:
    """The registered op `name`; ValueError naming the ops there are."""
    try:
        return OPS[name]
    except KeyError:
        raise ValueError(f"unknown op {name!r}: the ops are {', '.join(OPS)}") from None


def smem_need(op_name: str, config: Config, head_dim: int, dtype: str, arch: str | None) -> int:
    """Estimated shared memory of `config` for op `op_name` (0 for a torch SDPA backend's config, which runs
    none of flashtune's kernels): the exchange file's fit check."""
    from ..providers import KERNEL, provider_of

    if provider_of(config) != KERNEL:
        return 0
    return op(op_name).smem(config, head_dim, dtype, arch)
