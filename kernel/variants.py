"""Kernel-variant knobs: how `Config.extra` reaches the forward kernel.

Each knob a kernel understands is registered here with the values it accepts and the `tl.constexpr`
parameter it sets. `fwd_variant(config)` checks a config's knobs against the registry once (the
result is cached per config) and gives the kernel to launch with the constexprs to pass; a knob the
kernel does not know, or a value it does not accept, is a ValueError naming it and what is known.

The pointer kernel (kernel/fwd.py) has no knobs of its own, so `FWD_KNOBS` is empty. The knob
`loads` selects a kernel file: `loads="ptr"` (or no knob) is the pointer kernel, `loads="tma"` the
tensor-descriptor kernel (kernel/fwd_tma.py), which reads its own knobs (`ws`, `schedule`) and has
its own launch (the grid differs by schedule), so its Variant carries `launch` instead of a kernel.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Mapping

from ..db.types import Config, ExtraValue

from .fwd import attn_fwd_kernel


@dataclass(frozen=True)
class Knob:
    """One `Config.extra` knob: its name, the values it accepts and the kernel constexpr it sets."""

    name: str
    values: tuple[ExtraValue, ...]
    constexpr: str


@dataclass(frozen=True)
class Variant:
    """What launch() runs for a config: the @triton.jit kernel and the knobs' constexpr arguments."""

    kernel: Any
    constexprs: Mapping[str, ExtraValue]
    launch: Callable[..., Any] | None = None  # a variant with its own launch (kernel.launch.launch's contract)


FWD_KNOBS: Mapping[str, Knob] = {}  # the forward kernel's knobs, by name


def _same(a: ExtraValue, b: ExtraValue) -> bool:
    # True == 1 in Python, but a bool knob given 1 (or an int knob given True) is a different value.
    return type(a) is type(b) and a == b


def resolve_variant(config: Config, knobs: Mapping[str, Knob], kernel: Any) -> Variant:
    """The variant of `kernel` that `config.extra` selects under `knobs`; ValueError for a knob that is
    not in `knobs` or a value the knob does not accept."""
    constexprs: dict[str, ExtraValue] = {}
    for name, value in config.extra:
        knob = knobs.get(name)
        if knob is None:
            known = ", ".join(sorted(knobs)) or "none"
            raise ValueError(f"config {config}: the kernel does not know the knob {name!r} "
                             f"(known knobs: {known})")
        if not any(_same(value, allowed) for allowed in knob.values):
            raise ValueError(f"config {config}: knob {name}={value!r} is not one of "
                             f"{', '.join(map(repr, knob.values))}")
        constexprs[knob.constexpr] = value
    return Variant(kernel, constexprs)


LOADS_KNOB = "loads"
LOADS: tuple[str, ...] = ("ptr", "tma")


@lru_cache(maxsize=1024)
def fwd_variant(config: Config) -> Variant:
    """The forward kernel variant `config` selects (cached per config); ValueError for unknown knobs."""
    loads = config.extra_dict.get(LOADS_KNOB, "ptr")
    if loads == "tma":
        from .fwd_tma import launch_tma, tma_knobs

        tma_knobs(config.extra_dict)  # ValueError for a knob or value the TMA kernel does not take
        return Variant(None, {}, launch_tma)
    if loads != "ptr":
        raise ValueError(f"config {config}: knob loads={loads!r} is not one of {', '.join(map(repr, LOADS))}")
    plain = Config(config.block_m, config.block_n, config.num_warps, config.num_stages,
                   tuple((k, v) for k, v in config.extra if k != LOADS_KNOB))
    return resolve_variant(plain, FWD_KNOBS, attn_fwd_kernel)


PLAIN_FWD = Variant(attn_fwd_kernel, {})  # a config without knobs: the hot path skips the lookup
