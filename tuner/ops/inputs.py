"""The benchmark inputs every op draws the same way: `OpInputs`, the base of each op's workload class.

An op's inputs are q, k and v of the key's shape, drawn from N(0, 1) with a seeded generator on the
bench device: B·Hq is the key's bucket split by `split_heads`, k and v have Hq / key.group heads
(real GQA inputs), and the compile pool's copy (`warm`) has only compile_batch(B) sequences and no
reference. A key with attention features also gets its score modifiers (`mods`, tuner.ops.mods), drawn
after q, k and v, which the launches and the reference both take. The op's class adds what is its own:
more tensors (`prepare`), the reference (`compute_reference`), the launch (`run`) and, where one
relative error does not fit, the check.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, ClassVar, Mapping, TypeVar

import torch

from ...db.types import DTYPE_BYTES, Config, Key
from ...kernel.dtypes import FP8_NAME, TORCH_DTYPES
from ...kernel.checks import AttnShape, check_inputs
from ...kernel.mods import NO_MODS, ScoreMods, sdpa_mask

from .mods import NOMINAL_SOFTCAP, mods_bytes, workload_mods

__all__ = ["NOMINAL_SOFTCAP", "OpInputs", "compile_batch", "poisoned", "relative_error", "split_heads", "unmodified"]

HEADS = 16  # query heads of the benchmark inputs when B·Hq allows: one Hq for every bucket shares compiles

Draw = Callable[[int, int], torch.Tensor]  # (heads, length) -> a (B, heads, length, D) tensor of the inputs' stream
I = TypeVar("I", bound="OpInputs")


def split_heads(batch_heads: int, group: int = 1) -> tuple[int, int]:
    """(B, Hq) for benchmark inputs of `batch_heads` = B·Hq with Hq a multiple of `group`.

    B·Hq is exact whenever Hq can divide it, else as near as possible in log2 (a group of 3 and a
    bucket of 64: 7 × 9 = 63). Among equally near splits the one with Hq nearest HEADS wins, so
    that buckets share one Hq and hence one compiled kernel (Triton specialises on head counts).
    """
    if batch_heads < 1 or group < 1:
        raise ValueError(f"batch_heads and group must be positive, got {batch_heads} and {group}")
    target = group * max(1, round(HEADS / group))
    best: tuple[float, int, int, int] | None = None
    for heads in range(group, max(target, group) + 1, group):
        batch = max(1, round(batch_heads / heads))
        score = (abs(math.log2(batch * heads / batch_heads)), abs(heads - target), batch, heads)
        best = score if best is None or score[:2] < best[:2] else best
    assert best is not None
    return best[2], best[3]


def compile_batch(batch: int) -> int:
    """The smallest batch B' that every kernel launched on a workload of `batch` sequences compiles
    the same for: the compile pool's inputs (tuner.compile_pool) use it to save GPU memory.

    Triton specialises an integer argument on whether it equals 1 and whether it is divisible by 16
    (and on its width, which no benchmark size here reaches). The kernels get B only through the
    grid and through products B·x (the TMA kernel's persistent work count B·H·blocks), and a size-1
    batch changes the strides some launches pass (the TMA launch zeroes a size-1 dim's stride); so
    B' keeps B's gcd with 16 (then B'·x is divisible by 16 exactly when B·x is) and B' = 1 only
    when B = 1: 48 → 16, 12 → 4, 6 → 2, an odd B > 1 → 3.
    """
    if batch < 1:
        raise ValueError(f"batch must be positive, got {batch}")
    if batch == 1:
        return 1
    common = math.gcd(batch, 16)
    return common if common > 1 else min(batch, 3)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in fp32; inf when `out` has a NaN or inf."""
    from ...kernel.testing import output_errors

    return output_errors(out, ref)[1]


def unmodified(mods: ScoreMods) -> bool:
    """Whether `mods` modify nothing: then the references are torch SDPA's (math backend, fp32), else the float64
    reference with the modifiers (tuner.ops.reference)."""
    return mods.plain and not mods.softcap


def poisoned(buffers: Any) -> Any:
    """`buffers` (a tensor or a tuple of them, as `Workload.buffers` gives) NaN-filled, so that an element a
    candidate leaves unwritten fails the check instead of passing on what an earlier candidate wrote there."""
    for tensor in buffers if isinstance(buffers, tuple) else (buffers,):
        tensor.fill_(math.nan)
    return buffers


@dataclass
class OpInputs:
    """Random inputs of a key's shape on the bench device and the op's reference output; a `Workload`.

    `reference` is None for the compile pool's inputs (`warm=True`), which are never checked.
    A subclass sets `tolerance` (the relative error allowed per dtype) and `against` (what the
    reference is, for the check's message), and implements `run` and `compute_reference`.
    """

    key: Key
    batch_heads: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    shape: AttnShape
    scale: float
    reference: Any = None
    # The byte budget of the reference's chunks (its fp32 scores at once); None: kernel.testing's default.
    reference_bytes: int | None = None
    # The score modifiers of the key's features (tuner.ops.mods.workload_mods); NO_MODS for a key without.
    mods: ScoreMods = NO_MODS
    # An fp8 key's per-tensor fp32 descales of q, k, v (kernel.testing.quantize_fp8); None otherwise.
    descales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    tolerance: ClassVar[Mapping[str, float]]
    against: ClassVar[str]
    fp8: ClassVar[bool] = False  # whether the op takes fp8 keys (the forward alone)
    against_modified: ClassVar[str] = "the float64 reference with the key's modifiers"

    @property
    def described(self) -> str:
        """What the reference is, for the check's message."""
        return self.against if unmodified(self.mods) else self.against_modified

    @cached_property
    def sdpa_attn_mask(self) -> torch.Tensor | None:
        """The attn_mask an SDPA candidate computes this workload's modifiers with (kernel.mods.sdpa_mask, the
        causal mask folded in), or None: none needed. Built once per workload, outside the timed launches."""
        return sdpa_mask(self.mods, self.shape, self.key.causal, self.q.device, self.q.dtype)

    @classmethod
    def build(cls: type[I], key: Key, batch_heads: int, device: torch.device, seed: int = 0, *,
              warm: bool = False, reference_bytes: int | None = None) -> I:
        """Inputs drawn from N(0, 1) with a fixed seed; the reference is computed once per key, in
        chunks of at most `reference_bytes` of scores (the bench sizes it to the free memory).
        `warm`: the compile pool's inputs: compile_batch(B) sequences and no reference."""
        cls.check_key(key)
        batch, heads_q, heads_kv = cls.sizes(key, batch_heads)
        batch = compile_batch(batch) if warm else batch
        gen = torch.Generator(device=device).manual_seed(seed)
        dtype = TORCH_DTYPES[key.dtype]
        fp8 = key.dtype == FP8_NAME
        # fp8 inputs are fresh fp32 draws quantised with one power-of-two scale per tensor.
        drawn = torch.float32 if fp8 else dtype

        def draw(heads: int, n: int) -> torch.Tensor:
            return torch.randn(batch, heads, n, key.head_dim, generator=gen, device=device, dtype=drawn)

        q, k, v = draw(heads_q, key.seq_len), draw(heads_kv, key.seq_len_kv), draw(heads_kv, key.seq_len_kv)
        descales = None
        if fp8:
            from ...kernel.testing import quantize_fp8

            (q, qd), (k, kd), (v, vd) = (quantize_fp8(x) for x in (q, k, v))
            descales = (qd, kd, vd)
        shape = cls.shape_of(q, k, v)
        inputs = cls(key, batch_heads, q, k, v, shape, 1.0 / math.sqrt(key.head_dim),
                     reference_bytes=reference_bytes, mods=workload_mods(key, shape, gen, device, dtype),
                     descales=descales)
        inputs.prepare(draw)
        if not warm:
            inputs.reference = inputs.compute_reference()
        return inputs

    @classmethod
    def check_key(cls, key: Key) -> None:
        """ValueError for a key whose inputs cannot be drawn: features its op's kernels do not take, a window no
        call can have (tuner.ops.mods.check_features), or what the op says otherwise."""
        from .mods import check_features, has_features

        check_features(key)
        if key.dtype == FP8_NAME and (not cls.fp8 or has_features(key)):
            raise ValueError(f"{key}: fp8 keys are plain forward keys (the fp8 kernel is an inference forward "
                             "without score modifiers)")

    @classmethod
    def sizes(cls, key: Key, batch_heads: int) -> tuple[int, int, int]:
        """(B, Hq, Hkv) of the inputs for `key` at `batch_heads` = B·Hq."""
        batch, heads = split_heads(batch_heads, key.group)
        return batch, heads, heads // key.group

    @classmethod
    def footprint(cls, key: Key, batch_heads: int) -> int:
        """Bytes one workload of `key` at `batch_heads` holds on the device: q, k, v, the output buffer
        (like q) and an fp32 reference of q's shape. An op that holds more (further inputs, several
        outputs) adds its own; the bench sizes the batch by it (tuner.bench). A feature key's modifiers add
        theirs (tuner.ops.mods.mods_bytes)."""
        batch, heads_q, heads_kv = cls.sizes(key, batch_heads)
        q = batch * heads_q * key.seq_len * key.head_dim
        kv = 2 * batch * heads_kv * key.seq_len_kv * key.head_dim
        return (2 * q + kv) * DTYPE_BYTES[key.dtype] + 4 * q + mods_bytes(key, batch, heads_q)

    @classmethod
    def shape_of(cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> AttnShape:
        """The launch shape of q, k, v, checked as the op's entry point checks it."""
        return check_inputs(q, k, v, fp8=cls.fp8)

    def prepare(self, draw: Draw) -> None:
        """Draw or compute the op's further inputs, after q, k and v from the same stream (`draw`)."""

    def compute_reference(self) -> Any:
        """The op's reference output on these inputs (what `check` compares with)."""
        raise NotImplementedError

    def run(self, config: Config, out: Any = None) -> tuple[Any, Any]:
        """One launch with `config`: (its output, Triton's compiled kernel(s) or None)."""
        raise NotImplementedError

    def check(self, output: Any) -> str | None:
        """Why `output` is wrong against the reference, or None."""
        if self.reference is None:
            raise RuntimeError("the compile pool's inputs have no reference to check against")
        return self.problem(output, self.reference, self.tolerance[self.key.dtype])

    def problem(self, output: Any, reference: Any, tolerance: float) -> str | None:
        """Why `output` is off `reference` by more than `tolerance` (one line), or None: its relative error."""
        err = relative_error(output, reference)
        return None if err <= tolerance else f"relative error {err:.3g} > {tolerance:g} against {self.described}"

    def buffers(self) -> Any:
        """One output tensor the timed launches share."""
        return torch.empty_like(self.q)
