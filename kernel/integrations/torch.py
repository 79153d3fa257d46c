"""Opt-in routing of `torch.nn.functional.scaled_dot_product_attention` to flashtune where it is tuned to win.

    from flashtune.kernel.integrations.torch import route_sdpa
    with route_sdpa():            # every SDPA call inside, from any library, is considered
        model(x)

A call goes to `flashtune.kernel.attention` only when the dispatcher's choice for its key is the
flashtune kernel *and* comes from the database (an exact or nearest stored winner): the tuner timed
the kernel against torch's own backends there and the kernel won. Everything else stays with torch,
unchanged: masks, dropout, GQA calls without enable_gqa, inputs the kernel does not take, keys where
an SDPA backend won, and keys with nothing tuned near them (the default config was never compared
with torch). `route_counts()` says how many calls went where and why.

Why a TorchFunctionMode: torch 2.11 and 2.13 have `torch.nn.attention.register_flash_attention_impl` /
`activate_flash_attention_impl`, but that hook is for replacing the kernels of SDPA's *flash backend*
(it re-registers `aten::_scaled_dot_product_flash_attention` and its backward for CUDA, as FA3/FA4
do): it takes over every call torch routes to the flash backend, must match that op's outputs (the
LSE, the RNG state) and its backward, and cannot hand a call back. Choosing per key needs to see the
call before torch picks a backend, which a TorchFunctionMode does; it runs in eager mode (and on the
CPU), costs one memoised decision per call, and is entered and left explicitly.

The decision is per input signature (shapes, strides, dtypes, device, causal) and database load,
memoised. CUDA tensors are planned for their own GPU; `arch="sm_90"` plans for a named arch instead
(what the CPU tests use: CPU tensors run the Triton interpreter's default config, whatever was tuned).
"""
from __future__ import annotations

import contextlib
import threading
from collections import Counter
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .. import dispatch
from ..api import attention
from ..providers import KERNEL

__all__ = ["SDPARouter", "disable", "enable", "route_counts", "route_sdpa", "reset_route_counts"]

_STORED = (dispatch.EXACT, dispatch.NEAREST)
_MEMO_LIMIT = 4096
_counts: Counter[str] = Counter()


def route_counts() -> dict[str, int]:
    """SDPA calls seen inside route_sdpa(), by outcome: "kernel", or why torch ran it."""
    return dict(_counts)


def reset_route_counts() -> None:
    """Zero route_counts()."""
    _counts.clear()


class SDPARouter(TorchFunctionMode):
    """The mode route_sdpa() enters: F.scaled_dot_product_attention calls whose key the kernel won go to
    flashtune.kernel.attention, every other call (and every other function) runs as it would."""

    def __init__(self, arch: str | None = None) -> None:
        super().__init__()
        self.arch = arch
        self._memo: dict[tuple[Any, ...], str] = {}

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            outcome = self._decide(*args, **kwargs)
            _counts[outcome] += 1
            if outcome == "kernel":
                return _call_kernel(*args, **kwargs)
        return func(*args, **kwargs)

    def _decide(self, query: Any, key: Any, value: Any, attn_mask: Any = None, dropout_p: float = 0.0,
                is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> str:
        """"kernel", or the reason the call stays with torch."""
        if attn_mask is not None:
            return "attn_mask"
        if dropout_p:
            return "dropout"
        if not all(isinstance(t, torch.Tensor) for t in (query, key, value)) or type(is_causal) is not bool:
            return "unsupported inputs"
        if query.dim() != 4 or key.dim() != 4 or (query.shape[1] != key.shape[1] and not enable_gqa):
            return "unsupported inputs"
        token = (query.shape, key.shape, value.shape, query.stride(), key.stride(), value.stride(), query.dtype,
                 key.dtype, value.dtype, query.device, key.device, value.device, is_causal, id(dispatch.info()))
        outcome = self._memo.get(token)
        if outcome is None:
            outcome = self._plan(query, key, value, is_causal)
            if len(self._memo) >= _MEMO_LIMIT:
                self._memo.clear()
            self._memo[token] = outcome
        return outcome

    def _plan(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, causal: bool) -> str:
        try:
            if self.arch is not None:
                choice = dispatch.explain(query, key, value, causal, arch=self.arch)
            elif query.device.type == "cuda":
                choice = dispatch.plan(query, key, value, causal).choice
            else:
                return "not planned (CPU tensors: pass arch= to plan for a GPU)"
        except (TypeError, ValueError):
            return "unsupported inputs"
        if choice.provider != KERNEL:
            return f"{choice.provider} won this key"
        if choice.source not in _STORED:
            return f"not tuned ({choice.source})"
        return "kernel"


def _call_kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Any = None,
                 dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                 enable_gqa: bool = False) -> torch.Tensor:
    return attention(query, key, value, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)


@contextlib.contextmanager
def route_sdpa(*, arch: str | None = None) -> Iterator[SDPARouter]:
    """Inside the block, SDPA calls whose key flashtune's kernel won run flashtune (see the module docstring).

    `arch` plans every call for that GPU arch (e.g. "sm_90") instead of the tensors' own device.
    """
    router = SDPARouter(arch)
    with router:
        yield router


_global: dict[str, Any] = {"router": None}
_lock = threading.Lock()


def enable(*, arch: str | None = None) -> SDPARouter:
    """route_sdpa() for the rest of the program (until disable()); returns the active router."""
    with _lock:
        if _global["router"] is not None:
            raise RuntimeError("flashtune SDPA routing is already enabled: call disable() first")
        router = SDPARouter(arch)
        router.__enter__()
        _global["router"] = router
    return router


def disable() -> None:
    """Undo enable(); a no-op when routing is not enabled."""
    with _lock:
        router = _global["router"]
        if router is not None:
            _global["router"] = None
            router.__exit__(None, None, None)
