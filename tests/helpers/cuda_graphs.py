"""One check for the host paths' CUDA-graph tests: a call captured in a graph replays what an eager call gives."""
from __future__ import annotations

from typing import Callable, Sequence

import torch


def replay_matches_eager(call: Callable[[], torch.Tensor], inputs: Sequence[torch.Tensor]) -> bool:
    """Warm `call` twice (its relaunch path is then live), capture it on a side stream, refill `inputs`
    in place with fresh random values, replay, and compare bitwise with an eager call on the new values."""
    with torch.no_grad():
        call()
        call()
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            with torch.cuda.graph(graph, stream=stream):
                out = call()
        torch.cuda.current_stream().wait_stream(stream)
        for t in inputs:
            t.copy_(torch.randn_like(t))
        graph.replay()
        torch.cuda.synchronize()
        return torch.equal(out, call())
