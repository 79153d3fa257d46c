"""flashtune's kernel package: `from kernel import attention` runs the best stored config.

`attention` and `dispatch` are imported on first access (PEP 562): `from kernel import attention`
loads the tuned configs of the visible GPUs from the database (kernel.dispatch), while the tuner's
`import kernel.launch` and the other low-level modules load nothing.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from . import dispatch
    from .api import attention

__all__ = ["attention", "dispatch"]


def __getattr__(name: str) -> Any:
    if name == "attention":
        value = importlib.import_module(".api", __name__).attention
    elif name == "dispatch":
        value = importlib.import_module(".dispatch", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
