"""flashtune's kernels, one public surface: `from flashtune.kernel import attention` runs the best stored config.

- `attention(q, k, v, ...)`: torch SDPA's signature, training included; the dispatcher picks the tuned winner.
- `attention_kvcache(q, k_cache, v_cache, ...)`: a few queries against a KV cache (decode, chunked prefill).
- `attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, ...)`: packed sequences (flash_attn's varlen), training included.
- `attention_fwd(q, k, v, config=...)`, `attention_bwd(...)`: the forward and backward with an explicit config.
- `explain(q, k, v, ...)`: which config a call gets, and why. `Config`: a kernel config.
- `dispatch`, `record`: the dispatcher and the key recorder.

Names are imported on first access (PEP 562): `attention`, `attention_kvcache`, `explain` and `dispatch` load
the tuned configs of the visible GPUs from the database, while the tuner's imports of the lower modules
(`flashtune.kernel.ops`, `.checks`, `.jit`) load nothing.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..db.types import Config
    from . import dispatch, record
    from .api import attention
    from .dispatch import explain
    from .kvcache import attention_kvcache
    from .varlen import attention_varlen
    from .ops.bwd import attention_bwd
    from .ops.fwd import attention_fwd

# name -> (module relative to this package, attribute; None: the module itself)
_PUBLIC: dict[str, tuple[str, str | None]] = {
    "attention": (".api", "attention"),
    "attention_kvcache": (".kvcache", "attention_kvcache"),
    "attention_varlen": (".varlen", "attention_varlen"),
    "attention_fwd": (".ops.fwd", "attention_fwd"),
    "attention_bwd": (".ops.bwd", "attention_bwd"),
    "explain": (".dispatch", "explain"),
    "Config": ("..db.types", "Config"),
    "dispatch": (".dispatch", None),
    "record": (".record", None),
}
__all__ = ["Config", "attention", "attention_bwd", "attention_fwd", "attention_kvcache", "attention_varlen", "dispatch", "explain",
           "record"]


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module_name, attribute = _PUBLIC[name]
    module = importlib.import_module(module_name, __name__)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
