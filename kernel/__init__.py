"""flashtune's kernel package: `from flashtune.kernel import attention` runs the best stored config.

`attention`, `attention_kvcache`, `dispatch` and `record` are imported on first access (PEP 562):
`from flashtune.kernel import attention` loads the tuned configs of the visible GPUs from the
database (kernel.dispatch), while the tuner's `import flashtune.kernel.launch` and the other
low-level modules load nothing.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from . import dispatch, record
    from .api import attention
    from .kvcache import attention_kvcache

__all__ = ["attention", "attention_kvcache", "dispatch", "record"]


def __getattr__(name: str) -> Any:
    if name == "attention":
        value = importlib.import_module(".api", __name__).attention
    elif name == "attention_kvcache":
        value = importlib.import_module(".kvcache", __name__).attention_kvcache
    elif name in ("dispatch", "record"):
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
