"""The Flat-LoRA noise law as pure functions of (weight, delta, sigma, seed, step).

Nothing here holds state or touches a model, so every piece can be tested on bare tensors.

For a weight W' = W + ΔW read as an ``m × n`` matrix (rows are output features),

    ε_ij = σ_t · ‖W'_i,:‖₂ / √n · z_ij,    z_ij ~ N(0, 1) i.i.d.,

with σ_t = σ · f(t) and f the schedule. ``z`` comes from a private ``torch.Generator`` seeded
by `derive_seed`, so the same ε can be regenerated bit for bit whenever it is needed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

__all__ = [
    "BLOCK_ELEMENTS",
    "SCHEDULES",
    "TARGET_STRIDE",
    "LowRank",
    "base_row_sq",
    "block_seed",
    "blocks",
    "derive_seed",
    "draw_noise",
    "noise_std",
    "perturbed_weight",
    "row_dim",
    "row_norms",
    "schedule_factor",
    "seed_block",
    "seed_of_target",
    "step_seed",
]

SCHEDULES = ("cosine", "linear", "constant")

Schedule = Union[str, Callable[[int], float]]


@dataclass(frozen=True)
class LowRank:
    """A low-rank update ΔW = ``scale · B @ A`` in the logical ``(out, fan_in)`` layout.

    Adapters return this from ``Target.delta`` so the row norms of W + ΔW can be computed
    without ever materialising ``B @ A``.

    Args:
        B: ``(out_features, r)``; extra trailing dims are flattened.
        A: ``(r, fan_in)``; extra trailing dims (a conv kernel) are flattened.
        scale: the LoRA scaling, e.g. ``alpha / r``.

    Example:
        >>> B, A = torch.zeros(4, 2), torch.randn(2, 3)
        >>> LowRank(B, A, scale=0.5).dense().shape
        torch.Size([4, 3])
    """

    B: Tensor
    A: Tensor
    scale: float = 1.0

    def dense(self) -> Tensor:
        """Return ``scale · B @ A`` as an ``(out, fan_in)`` matrix (slow; for references)."""
        B = self.B.reshape(self.B.shape[0], -1)
        A = self.A.reshape(self.A.shape[0], -1)
        return self.scale * (B @ A)


Delta = Union[Tensor, LowRank, Sequence[LowRank], None]


def schedule_factor(schedule: Schedule, step: int, total_steps: int | None) -> float:
    """Return f(t), the factor σ_t / σ at optimizer step ``step`` (0-based).

    ``"cosine"`` is the paper's ½·(1 − cos(π·min(t, T)/T)): exactly 0 at t = 0 and 1 from
    t = T on. ``"linear"`` is min(t, T)/T, ``"constant"`` is 1, and a callable is used as is.

    Args:
        schedule: ``"cosine"``, ``"linear"``, ``"constant"`` or a callable ``step -> factor``.
        step: the number of completed optimizer steps.
        total_steps: T; required by the ramps.

    Raises:
        ValueError: unknown schedule, a ramp without ``total_steps``, or a callable that
            returns a negative or non-finite factor.

    Example:
        >>> schedule_factor("cosine", 0, 100), schedule_factor("cosine", 100, 100)
        (0.0, 1.0)
    """
    if callable(schedule):
        factor = float(schedule(step))
        if not math.isfinite(factor) or factor < 0:
            raise ValueError(
                f"schedule({step}) returned {factor!r}; a schedule callable must return a "
                "finite factor >= 0 (it multiplies sigma)."
            )
        return factor
    if schedule == "constant":
        return 1.0
    if schedule not in SCHEDULES:
        raise ValueError(
            f"Unknown schedule {schedule!r}; use one of {SCHEDULES} or a callable step -> factor."
        )
    if total_steps is None or total_steps < 1:
        raise ValueError(
            f"schedule={schedule!r} needs total_steps >= 1 (the length of the ramp), got "
            f"{total_steps!r}."
        )
    progress = min(step, total_steps) / total_steps
    if schedule == "linear":
        return progress
    return 0.5 * (1.0 - math.cos(math.pi * progress))


_MASK64 = (1 << 64) - 1
_MASK32 = (1 << 32) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(seed: int, step: int, draw: int = 0, target: int = 0, rank: int = 0) -> int:
    """Mix (seed, step, draw, target, rank) into one 63-bit generator seed.

    The high 31 bits are a hash of every input; the low 32 bits are a hash of (seed, step,
    draw, rank) plus ``target`` · `TARGET_STRIDE`, so the targets of one draw never share
    their low 32 bits (up to 4096 targets), which are all torch's CPU generator keeps of a
    seed. Neighbouring steps, draws and ranks get unrelated streams.

    Example:
        >>> derive_seed(0, 1) != derive_seed(0, 2)
        True
    """
    return seed_of_target(step_seed(seed, step, draw), target, rank)


def step_seed(seed: int, step: int, draw: int = 0) -> int:
    """The part of `derive_seed` shared by every target of one draw (computed once per draw).

    Example:
        >>> seed_of_target(step_seed(0, 3, 1), 2, 0) == derive_seed(0, 3, 1, 2, 0)
        True
    """
    h = _splitmix64(seed & _MASK64)
    h = _splitmix64(h ^ (step & _MASK64))
    return _splitmix64(h ^ (draw & _MASK64))


TARGET_STRIDE = 1 << 20
"""The low 32 bits of the seeds of one draw's targets are ``key + target · TARGET_STRIDE``
(mod 2³²), and block ``b`` of a target adds ``b``: every block of a draw has its own low 32 bits
while a weight has fewer than 2²⁰ blocks (6.9·10¹⁰ elements) and the draw at most 4096
targets."""


def seed_of_target(prefix: int, target: int, rank: int = 0) -> int:
    """Finish `derive_seed` from a `step_seed` prefix: one target's seed on one rank."""
    key = _splitmix64(prefix ^ _splitmix64(rank & _MASK64))
    high = _splitmix64(key ^ (target & _MASK64)) >> 33
    return (high << 32) | ((key + target * TARGET_STRIDE) & _MASK32)


def row_dim(weight: Tensor, transposed: bool = False) -> int:
    """Return the storage dim that holds the logical rows (output features) of ``weight``.

    Example:
        >>> row_dim(torch.empty(3, 4)), row_dim(torch.empty(4, 3), transposed=True)
        (0, 1)
    """
    return 1 if transposed else 0


def _accumulate_dtype(weight: Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _logical_matrix(weight: Tensor, transposed: bool) -> Tensor:
    """``weight`` as an ``(out, fan_in)`` matrix (a view where the layout allows)."""
    if weight.ndim == 2:
        return weight.t() if transposed else weight
    w = weight.transpose(0, 1) if transposed else weight
    return w.reshape(w.shape[0], -1)


def _as(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


@torch.no_grad()
def base_row_sq(weight: Tensor, transposed: bool = False) -> Tensor:
    """Return ‖W_i,:‖² per logical row, in fp32 (fp64 for fp64 weights), without upcasting W.

    Example:
        >>> base_row_sq(torch.tensor([[3.0, 4.0], [0.0, 1.0]]))
        tensor([25.,  1.])
    """
    dim = row_dim(weight, transposed)
    other = [d for d in range(weight.ndim) if d != dim]
    return torch.linalg.vector_norm(weight, dim=other, dtype=_accumulate_dtype(weight)).square()


def _merged_factors(delta: Delta, dtype: torch.dtype) -> tuple[Tensor, Tensor, float] | None:
    """ΔW = scale · B @ A in ``dtype``, every active adapter stacked: ``[s₁B₁, …] @ [A₁; …]``."""
    factors = [delta] if isinstance(delta, LowRank) else list(delta or ())
    if not factors:
        return None
    if len(factors) == 1:
        f = factors[0]
        B = f.B if f.B.ndim == 2 else f.B.reshape(f.B.shape[0], -1)
        A = f.A if f.A.ndim == 2 else f.A.reshape(f.A.shape[0], -1)
        return _as(B, dtype), _as(A, dtype), f.scale
    B = torch.cat([f.scale * f.B.reshape(f.B.shape[0], -1).to(dtype) for f in factors], 1)
    A = torch.cat([f.A.reshape(f.A.shape[0], -1).to(dtype) for f in factors], 0)
    return B, A, 1.0


def _weight_times(weight: Tensor, A: Tensor, transposed: bool, acc: torch.dtype) -> Tensor:
    """W·Aᵀ in ``acc`` precision. fp32 and fp64 weights are read as they are; half-precision
    weights are upcast a row chunk at a time, so no weight-sized fp32 copy is ever made."""
    if weight.dtype == acc:
        if transposed and weight.ndim == 2:
            return (A @ weight).t()
        return _logical_matrix(weight, transposed) @ A.t()
    matrix = _logical_matrix(weight, transposed)
    rows = matrix.shape[0]
    step = max(1, -(-rows // 8)) if matrix.numel() > BLOCK_ELEMENTS else rows
    return torch.cat([matrix[i : i + step].to(acc) @ A.t() for i in range(0, rows, step)])


@torch.no_grad()
def row_norms(
    weight: Tensor,
    delta: Delta = None,
    *,
    transposed: bool = False,
    base_sq: Tensor | None = None,
) -> Tensor:
    """Return ‖W'_i,:‖₂ per logical row of W' = W + ΔW, in fp32 (fp64 for fp64 weights).

    For a `LowRank` delta (or a list of them) W' is one ``addmm`` in W's dtype (on tensor
    cores where there are some; fp16 weights: in fp32, a row chunk at a time), and its rows
    are reduced with fp32 (fp64) accumulation, so large half-precision weights cannot
    overflow. The temporary W' is freed before this returns. A tensor delta is in the
    weight's storage layout.

    Args:
        weight: the base weight in its storage layout.
        delta: None, a tensor like ``weight``, a `LowRank` or a sequence of them.
        transposed: the weight is stored as ``(fan_in, out)``.
        base_sq: optional ‖W_i‖², known to the caller: a `LowRank` delta then uses the
            identity ‖W_i + s·B_i·A‖² = ‖W_i‖² + 2s·B_i·(W·Aᵀ)_i + s²·B_i·(A·Aᵀ)·B_iᵀ,
            which never builds W' (the caller answers for ``base_sq`` matching W).

    Example:
        >>> W = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
        >>> row_norms(W)
        tensor([5., 1.])
    """
    return _row_norms(weight, delta, transposed, base_sq)


def _row_norms(
    weight: Tensor,
    delta: Delta,
    transposed: bool,
    base_sq: Tensor | None = None,
    scale: float = 1.0,
) -> Tensor:
    """``scale`` · ‖W'_i,:‖ with grad mode already off (``row_norms`` is ``scale`` = 1)."""
    acc = _accumulate_dtype(weight)
    if isinstance(delta, Tensor):
        norms = base_row_sq(weight.to(acc) + delta.to(acc), transposed).sqrt_()
        return norms if scale == 1.0 else norms.mul_(scale)
    # W' is built in W's dtype (bf16 on tensor cores), except fp16: its 5-bit exponent could
    # overflow or flush c·W', so it is built in fp32 a row chunk at a time.
    half = weight.dtype == torch.float16
    factors = _merged_factors(delta, acc if half or base_sq is not None else weight.dtype)
    if factors is None:
        norms = (base_row_sq(weight, transposed) if base_sq is None else base_sq).sqrt()
        return norms if scale == 1.0 else norms.mul_(scale)
    B, A, factor = factors
    if base_sq is not None:
        WA = _weight_times(weight, A, transposed, acc)
        # ‖W_i + s·B_i·A‖² = ‖W_i‖² + B_i·(2s·(W·Aᵀ)_i + s²·(B·A·Aᵀ)_i)
        inner = torch.addmm(WA, B, A @ A.t(), beta=2 * factor, alpha=factor * factor)
        norms = (base_sq + torch.linalg.vecdot(B, inner)).clamp_min_(0).sqrt_()
        return norms if scale == 1.0 else norms.mul_(scale)
    matrix = _logical_matrix(weight, transposed)
    if half:
        rows = matrix.shape[0]
        step = max(1, -(-rows // 8)) if matrix.numel() > BLOCK_ELEMENTS else rows
        norms = torch.cat(
            [
                torch.linalg.vector_norm(
                    torch.addmm(matrix[i : i + step].to(acc), B[i : i + step], A, alpha=factor),
                    dim=1,
                )
                for i in range(0, rows, step)
            ]
        )
        return norms if scale == 1.0 else norms.mul_(scale)
    # c·W' (a new tensor: W is never written): ‖c·W'_i‖ = c·‖W'_i‖ for c > 0, so the scale
    # rides in the addmm.
    merged = torch.addmm(matrix, B, A, beta=scale, alpha=scale * factor)
    norms = torch.linalg.vector_norm(merged, dim=1, dtype=acc)
    del merged  # before W + ε is allocated: the peak stays one weight-sized tensor
    return norms


def noise_std(
    weight: Tensor,
    delta: Delta = None,
    sigma: float = 0.05,
    *,
    transposed: bool = False,
    base_sq: Tensor | None = None,
) -> Tensor:
    """Return the per-row noise standard deviation σ·‖W'_i‖/√n (a constant: no gradient).

    Example:
        >>> noise_std(torch.ones(2, 4), sigma=0.1)
        tensor([0.1000, 0.1000])
    """
    scale = std_scale(weight, sigma, transposed)
    grad = torch.is_grad_enabled()
    if grad:
        torch._C._set_grad_enabled(False)
    try:
        return _row_norms(weight, delta, transposed, base_sq, scale)
    finally:
        if grad:
            torch._C._set_grad_enabled(True)


def std_scale(weight: Tensor, sigma: float, transposed: bool = False) -> float:
    """σ/√n for ``weight``, n its fan-in: the std is this times the row norm of W'."""
    rows = weight.shape[row_dim(weight, transposed)]
    fan_in = weight.numel() // max(rows, 1)
    return sigma / math.sqrt(max(fan_in, 1))


def _broadcast(std: Tensor, weight: Tensor, transposed: bool) -> Tensor:
    shape = [1] * weight.ndim
    shape[row_dim(weight, transposed)] = -1
    return std.view(shape)


BLOCK_ELEMENTS = 1 << 16
"""On CPU, z is drawn in blocks of about this many elements (whole rows of storage), block b
from a generator seeded with `block_seed(seed, b)`. The blocks are fixed by the shape alone, so
the same seed gives the same z whatever the thread count, and blocks can be drawn in parallel:
torch's CPU generator is sequential, so one stream would use one core. Other devices draw the
whole tensor as one block."""


def block_seed(seed: int, index: int) -> int:
    """The 64-bit seed of block ``index`` of a multi-block CPU draw seeded with ``seed``.

    The low 32 bits mix ``seed + index`` (mod 2³²) bijectively, so the blocks of one draw
    never share them (see `TARGET_STRIDE`); the high 32 bits hash (seed, index). `seed_block`
    seeds a generator with all 64 bits.

    Example:
        >>> block_seed(7, 0) != block_seed(7, 1)
        True
    """
    low = _fmix32((seed + index) & _MASK32)
    high = _splitmix64(seed ^ _splitmix64(index)) >> 32
    if high == low:  # the two halves would cancel in `seed_block`
        high ^= 0x9E3779B9
    return (high << 32) | low


def _fmix32(x: int) -> int:
    """MurmurHash3's 32-bit finaliser: a bijection of [0, 2³²) that mixes every bit."""
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & _MASK32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


# The 624 words of mt19937 in the bytes of torch's CPU generator state (a uint64 each, after the
# initial seed, `left`, `seeded` and `next`).
_STATE_BYTES = 5056
_WORDS = slice(24, 24 + 624 * 8)


def seed_block(generator: torch.Generator, seed: int) -> None:
    """Seed a CPU ``generator`` with all 64 bits of ``seed``.

    torch's CPU generator (mt19937) keeps 32 bits of a seed. mt19937 is linear over GF(2),
    tempering included, so the state state(low) XOR state(high) yields the XOR of the two
    32-bit streams: two seeds that share one half still draw independent z. It costs two
    seedings and a copy of the 5 kB state, a few µs per block of `BLOCK_ELEMENTS`.

    Example:
        >>> g = torch.Generator()
        >>> seed_block(g, 5 | 1 << 32); a = torch.randn(3, generator=g)
        >>> seed_block(g, 5 | 2 << 32); b = torch.randn(3, generator=g)
        >>> torch.equal(a, b)
        False
    """
    low, high = seed & _MASK32, (seed >> 32) & _MASK32
    generator.manual_seed(low)
    state = generator.get_state()
    if state.numel() != _STATE_BYTES:  # pragma: no cover - a torch with another generator
        raise RuntimeError(
            f"torch's CPU generator state is {state.numel()} bytes, not the {_STATE_BYTES} of "
            "the mt19937 layout flatopt seeds 64 bits into; please report this torch version."
        )
    generator.manual_seed(high)
    other = generator.get_state()
    state[_WORDS].view(torch.int64).bitwise_xor_(other[_WORDS].view(torch.int64))
    generator.set_state(state)


def blocks(weight: Tensor) -> list[slice]:
    """The row slices of ``weight`` (storage dim 0) that are drawn as separate blocks.

    Example:
        >>> len(blocks(torch.empty(1024, 1024))), len(blocks(torch.empty(4, 4)))
        (16, 1)
    """
    rows = weight.shape[0] if weight.ndim else 1
    if weight.device.type != "cpu" or rows <= 1:
        return [slice(0, rows)]
    per_block = max(1, BLOCK_ELEMENTS // max(1, weight.numel() // rows))
    return [slice(start, min(start + per_block, rows)) for start in range(0, rows, per_block)]


Runner = Callable[[Callable[[int, torch.Generator], None], int], None]

_whole = (slice(None),)  # one block: every weight of at most BLOCK_ELEMENTS elements


def _serial(generator: torch.Generator) -> Runner:
    def run(fill: Callable[[int, torch.Generator], None], count: int) -> None:
        for index in range(count):
            fill(index, generator)

    return run


@torch.no_grad()
def perturbed_weight(
    weight: Tensor,
    std: Tensor,
    *,
    transposed: bool = False,
    generator: torch.Generator,
    seed: int,
    run: Optional[Runner] = None,
    keep: Optional[int] = None,
) -> Tensor:
    """Return a new tensor W + ε in W's dtype and device; W itself is never written.

    The noise of each block is drawn straight into the output buffer and W is fused in with
    one ``addcmul`` while the block is still in cache, so the call allocates exactly one
    weight-sized tensor. Calling it again with the same seed on the same device type returns
    the same bits.

    Args:
        weight: W, in its storage layout.
        std: the per-row noise std (see `noise_std`).
        transposed: W is stored as ``(fan_in, out)``.
        generator: a generator on W's device (used for every block unless ``run`` is given).
        seed: the draw's seed.
        run: optional ``run(fill, count)`` that calls ``fill(index, generator)`` for every
            block index, e.g. on several threads each with its own generator.
        keep: a storage row (dim 0) left unperturbed, e.g. an embedding's ``padding_idx``.

    Example:
        >>> W, g = torch.zeros(2, 3), torch.Generator()
        >>> a = perturbed_weight(W, torch.ones(2), generator=g, seed=1)
        >>> torch.equal(a, perturbed_weight(W, torch.ones(2), generator=g, seed=1))
        True
    """
    scale = _broadcast(std, weight, transposed)
    return _perturbed_weight(weight, scale, generator, seed, run, keep)


def _perturbed_weight(
    weight: Tensor,
    scale: Tensor,
    generator: torch.Generator,
    seed: int,
    run: Optional[Runner] = None,
    keep: Optional[int] = None,
) -> Tensor:
    """`perturbed_weight` with the std already broadcast to W's storage layout; no grad mode
    is entered, so a W that requires grad must come with grad mode off."""
    out = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    parts = _whole if weight.numel() <= BLOCK_ELEMENTS else blocks(weight)
    if len(parts) == 1:  # a single block: its seed is the draw's own
        generator.manual_seed(seed)
        out.normal_(generator=generator)
        torch.addcmul(weight, out, scale, out=out)
    else:

        def fill(index: int, block_generator: torch.Generator) -> None:
            rows = parts[index]
            block = out[rows]
            seed_block(block_generator, block_seed(seed, index))
            block.normal_(generator=block_generator)
            block_scale = scale if scale.shape[0] == 1 else scale[rows]
            torch.addcmul(weight[rows], block, block_scale, out=block)

        (run if run is not None else _serial(generator))(fill, len(parts))
    if keep is not None:
        out[keep] = weight[keep]
    return out


def _standard_normal(
    weight: Tensor, generator: torch.Generator, seed: int, dtype: Optional[torch.dtype] = None
) -> Tensor:
    z = torch.empty(weight.shape, dtype=dtype or weight.dtype, device=weight.device)
    parts = _whole if weight.numel() <= BLOCK_ELEMENTS else blocks(weight)
    if len(parts) == 1:
        generator.manual_seed(seed)
        return z.normal_(generator=generator)
    for index, rows in enumerate(parts):
        seed_block(generator, block_seed(seed, index))
        z[rows].normal_(generator=generator)
    return z


@torch.no_grad()
def draw_noise(
    weight: Tensor,
    std: Tensor,
    *,
    transposed: bool = False,
    generator: torch.Generator,
    seed: int,
    dtype: Optional[torch.dtype] = None,
    keep: Optional[int] = None,
) -> Tensor:
    """Return ε itself: the explicit form of the law, in ``std``'s dtype (fp32 or fp64).

    It uses the same ``z`` as `perturbed_weight`; tests and references use it to build
    W + ε by hand. ``dtype`` draws z in another dtype than W's: a quantized W has no
    floating dtype of its own, and its noise is drawn in the dtype of the layer's input.
    ``keep`` is a storage row (dim 0) whose noise is zero, as in `perturbed_weight`.

    Example:
        >>> eps = draw_noise(torch.zeros(2, 3), torch.ones(2), generator=torch.Generator(), seed=1)
        >>> eps.shape
        torch.Size([2, 3])
    """
    z = _standard_normal(weight, generator, seed, dtype)
    eps = z.to(std.dtype) * _broadcast(std, weight, transposed)
    if keep is not None:
        eps[keep] = 0
    return eps
