"""The `--gpus` value (`all`, or a comma list of CUDA device indices) and each GPU worker's share of the CPU cores."""
from __future__ import annotations

import os
import re

_INDEX = re.compile(r"[0-9]{1,4}")


def parse_gpus(text: str) -> list[int] | str:
    """'all' (every GPU present) or the distinct indices in the order given. ValueError for an empty
    value, a token that is no index, or an index given twice."""
    value = str(text).strip()
    if value.lower() == "all":
        return "all"
    if not value:
        raise ValueError("empty: give 'all' or a comma list of GPU indices such as 0,1")
    indices: list[int] = []
    for token in (t.strip() for t in value.split(",")):
        if not _INDEX.fullmatch(token):
            raise ValueError(f"{token!r} is not a GPU index: give 'all' or a comma list such as 0,1")
        index = int(token)
        if index in indices:
            raise ValueError(f"GPU {index} is listed twice")
        indices.append(index)
    return indices


def select_gpus(wanted: list[int] | None, count: int) -> list[int]:
    """The GPU indices to tune on (`wanted` None: all), given how many this host has; ValueError for an
    index it lacks."""
    if count <= 0:
        raise ValueError("no CUDA GPU is visible on this host")
    if wanted is None:
        return list(range(count))
    missing = [i for i in wanted if i >= count]
    if missing:
        raise ValueError(f"GPU {missing[0]} does not exist: this host has {count} CUDA GPU(s), "
                         f"indices 0 to {count - 1}")
    return wanted


COMPILE_CAP = 16  # per GPU: each compile-pool process holds a CUDA context (about 0.5 GB) of the GPU


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which taskset and cgroup cpusets narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS has no affinity mask
        return max(1, os.cpu_count() or 1)


def compile_share(gpus: int = 1) -> int:
    """Compile threads, and compile-pool processes, for each of `gpus` GPU workers on this host: the
    usable cores divided between them (the workers compile at the same time), at most COMPILE_CAP."""
    return max(1, min(COMPILE_CAP, usable_cores() // max(1, gpus)))
