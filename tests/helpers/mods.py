"""The score modifiers the kernel tests name per case, drawn fresh."""
from __future__ import annotations

import torch


def mods_kwargs(kind: str, b: int, hq: int, nq: int, nk: int, device: str, gen: torch.Generator) -> dict:
    """The modifier arguments a case names ("window6,3+sinks+alibiB"), drawn fresh from `gen`, with masks in the
    shapes and strides SDPA users pass them: window L,R; capC; sinks; alibi (Hq,); alibiB (B, Hq); bool
    (B, Hq, Nq, Nk) with wholly hidden rows; bool2d (Nq, Nk); keypad (1, Hq, 1, Nk); float (B, 1, Nq, Nk)."""
    kw: dict = {}
    for part in kind.split("+"):
        if part.startswith("window"):
            left, right = part.removeprefix("window").split(",")
            kw["window_size"] = (int(left), int(right))
        elif part.startswith("cap"):
            kw["softcap"] = float(part.removeprefix("cap"))
        elif part == "sinks":
            # about a row's top score (inputs of spread 2): the sink always takes a real share of the row
            kw["sinks"] = (torch.randn(hq, generator=gen) * 0.5 + 10.0).to(device)
        elif part == "alibi":
            kw["alibi_slopes"] = (torch.rand(hq, generator=gen) * 0.9 + 0.1).to(device)
        elif part == "alibiB":
            kw["alibi_slopes"] = (torch.rand(b, hq, generator=gen) * 0.9 + 0.1).to(device)
        elif part == "bool":  # full (B, Hq, Nq, Nk), some rows wholly hidden
            m = torch.rand(b, hq, nq, nk, generator=gen) > 0.5
            m[:, :, 3] = False
            m[0, -1, nq // 2:] = False
            kw["attn_mask"] = m.to(device)
        elif part == "bool2d":  # (Nq, Nk): stride 0 over batch and heads
            kw["attn_mask"] = (torch.rand(nq, nk, generator=gen) > 0.4).to(device)
        elif part == "keypad":  # (1, Hq, 1, Nk): stride 0 over batch and queries
            m = torch.rand(1, hq, 1, nk, generator=gen) > 0.3
            m[..., 0] = True
            kw["attn_mask"] = m.to(device)
        elif part == "float":  # (B, 1, Nq, Nk) additive, with some -inf
            m = torch.randn(b, 1, nq, nk, generator=gen) * 2.0
            m[torch.rand(b, 1, nq, nk, generator=gen) > 0.8] = float("-inf")
            kw["attn_mask"] = m.to(device)
        else:
            raise AssertionError(part)
    return kw
