"""The methods FlatPerturb is measured against, written plainly as baselines.

Each baseline is a class with ``step(batches)``: one optimizer step over a list of
micro-batches, each a zero-argument callable returning the micro-batch's loss. Gradients are
accumulated over the micro-batches, then the optimizer steps and the gradients are zeroed.

- `PlainLoRA`: no perturbation.
- `InPlace`: the official Flat-LoRA code's mechanism (``FlatLoraTrainer.training_step`` in
  ``logTrainer.py`` of github.com/nblt/Flat-LoRA), without its avoidable work. The official
  code, per optimizer step: seeds torch's global generator once; for every LoRA layer, builds
  the merged weight ``W + s·B @ A``, takes its row norms (``torch.norm(data, dim=1)``), scales
  them to the std ``factor·ρ/√n·‖W'_i‖``, draws ``torch.normal(0, std.repeat(...))`` and adds
  it with ``W.data += noise``, in layer order, keeping only the stds; after the last
  micro-batch's backward it seeds the generator again and subtracts the regenerated noise,
  layer by layer. Here the same: one seed per step, the targets drawn in order from one private
  generator, the row norms of the merged weight built with one ``addmm`` in W's dtype (on a
  GPU, one tensor-core matmul) and read in fp32, only the stds kept. It is cheaper where the
  official code does extra work: z is drawn with ``normal_`` into one buffer and fused in with
  ``W.addcmul_(z, std)`` (no weight-sized std tensor, no separate noise tensor, one pass over
  W), undone with ``W.addcmul_(z, std, value=-1)``. Of flatopt it uses only the adapters (to
  find the same weights) and the seed mixer, none of its hot path: not its row-norm identity,
  its half-precision chunks or its blocked CPU draws (one ``normal_`` per weight on every
  device, as the official code draws). The law is flatopt's: ε_ij = σ·‖W'_i‖/√n·z_ij with
  z ~ N(0, 1). The weights stay perturbed across the micro-batches, so it draws twice per step
  whatever the accumulation. It is inexact: the round trip does not give back W bit for bit.
- `LoRASAM`: SAM (Foret et al.) on the LoRA factors only, as the reference SAM code
  (``davda54/sam``) does it: per micro-batch, forward/backward at the current A, B; the ascent
  ε_AB = ρ·g/‖g‖ (‖g‖ over every factor, with fused ``_foreach_norm``; the scale stays a device
  tensor, so no step waits for the GPU); A, B saved and moved by ε_AB; forward/backward there;
  A, B restored from the saved copy (bitwise); the second gradients are accumulated and the
  optimizer steps with them. Two passes per micro-batch, which is what it costs.
- `CopyRestore`: exact but heavy. It keeps a copy of every target weight, adds the noise in
  place, and copies the clean weights back after the backward: bitwise exact, at the price of
  one extra copy of all the target weights.

The noise floors: `draw_floor` and `ThreadedFloor` draw 2 standard-normal tensors of every
target's shape per micro-batch; `count_draws` records the draws a call really makes (every
``aten.normal_``, by shape) and `replay_draws` makes the same draws on one generator.

The CPU seed space: torch's CPU generator (mt19937) keeps only the low 32 bits of a seed.
`SEED_DRAWS` are ways to draw z ~ N(0, 1) from a 64-bit seed, timed against each other by
``overhead.py --seed-space``: ``seed32`` (flatopt's for a one-block weight), ``sum_of_two`` and
``xor_state`` (flatopt's for each block of a larger one: `flatopt.noise.seed_block`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from flatopt.adapters import Target, find_targets
from flatopt.noise import LowRank, derive_seed, seed_block

__all__ = [
    "SEED_DRAWS",
    "CopyRestore",
    "InPlace",
    "LoRASAM",
    "PlainLoRA",
    "ThreadedFloor",
    "count_draws",
    "draw_floor",
    "replay_draws",
]

Batches = Sequence[Callable[[], Tensor]]


def _backward(batch: Callable[[], Tensor], scale: float) -> None:
    (batch() * scale).backward()


class PlainLoRA:
    """Plain LoRA: forward + backward per micro-batch, then the optimizer step."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def step(self, batches: Batches) -> None:
        for batch in batches:
            _backward(batch, 1 / len(batches))
        self.optimizer.step()
        self.optimizer.zero_grad()


def _logical(tensor: Tensor, transposed: bool) -> Tensor:
    """A weight (or a dense ΔW) as an ``(out, fan_in)`` matrix, a view where possible."""
    if tensor.ndim == 2:
        return tensor.t() if transposed else tensor
    return (tensor.transpose(0, 1) if transposed else tensor).flatten(1)


def merged_row_norms(target: Target) -> Tensor:
    """‖W'_i‖ of the merged weight W' = W + ΔW, per logical row, as the official code takes it:
    W' built in W's dtype (one ``addmm`` per low-rank factor pair), the norms read in fp32."""
    weight = target.weight
    merged = _logical(weight, target.transposed)
    delta = target.delta() if target.delta is not None else None
    if isinstance(delta, Tensor):
        merged = merged + _logical(delta.to(weight.dtype), target.transposed)
    elif delta is not None:
        for factor in [delta] if isinstance(delta, LowRank) else list(delta):
            B = factor.B.reshape(factor.B.shape[0], -1).to(weight.dtype)
            A = factor.A.reshape(factor.A.shape[0], -1).to(weight.dtype)
            merged = torch.addmm(merged, B, A, alpha=factor.scale)
    return torch.linalg.vector_norm(merged, dim=1, dtype=torch.float32)


class _Noisy:
    """Shared by the perturb-in-place baselines: the targets, the noise scale and the seed."""

    def __init__(self, model: nn.Module, sigma: float, seed: int):
        self.targets: list[Target] = [target for _, target in find_targets(model)]
        self.sigma = sigma
        self.seed = seed
        self.num_steps = 0
        self.generator = torch.Generator(device=self.targets[0].weight.device)
        self.shapes = []  # where each target's std broadcasts: its rows' storage dim
        for target in self.targets:
            weight = target.weight
            shape = [1] * weight.ndim
            shape[1 if target.transposed else 0] = -1
            self.shapes.append(shape)

    @torch.no_grad()
    def stds(self) -> list[Tensor]:
        """σ·‖W'_i‖/√n per target, in W's dtype and broadcastable against W."""
        stds = []
        for target, shape in zip(self.targets, self.shapes):
            weight = target.weight
            rows = weight.shape[1 if target.transposed else 0]
            fan_in = max(weight.numel() // max(rows, 1), 1)
            scale = self.sigma / math.sqrt(fan_in)
            stds.append(merged_row_norms(target).mul_(scale).to(weight.dtype).view(shape))
        return stds

    @torch.no_grad()
    def _shift(self, stds: list[Tensor], sign: int) -> None:
        """W ± ε for every target: one seed per step, the targets drawn in order."""
        self.generator.manual_seed(derive_seed(self.seed, self.num_steps))
        for target, std in zip(self.targets, stds):
            weight = target.weight
            z = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
            z.normal_(generator=self.generator)
            weight.addcmul_(z, std, value=sign)


class InPlace(_Noisy):
    """The paper's in-place method: ``W += ε`` before, ``W -= ε`` after (inexact)."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, sigma: float, seed: int):
        super().__init__(model, sigma, seed)
        self.optimizer = optimizer

    def step(self, batches: Batches) -> None:
        stds = self.stds()
        self._shift(stds, +1)
        for batch in batches:
            _backward(batch, 1 / len(batches))
        self._shift(stds, -1)
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.num_steps += 1


class CopyRestore(_Noisy):
    """Exact but heavy: a kept copy of every target weight, noise added in place, copy back."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, sigma: float, seed: int):
        super().__init__(model, sigma, seed)
        self.optimizer = optimizer

    def step(self, batches: Batches) -> None:
        stds = self.stds()
        with torch.no_grad():
            saved = [target.weight.clone() for target in self.targets]
        self._shift(stds, +1)
        for batch in batches:
            _backward(batch, 1 / len(batches))
        with torch.no_grad():
            for target, clean in zip(self.targets, saved):
                target.weight.copy_(clean)
        del saved
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.num_steps += 1


class LoRASAM:
    """SAM restricted to the LoRA factors: two forward/backward passes per micro-batch."""

    def __init__(self, optimizer: torch.optim.Optimizer, rho: float = 0.05):
        self.optimizer = optimizer
        self.rho = rho
        self.params = [p for group in optimizer.param_groups for p in group["params"]]

    def step(self, batches: Batches) -> None:
        params, scale = self.params, 1 / len(batches)
        accumulated: list[Tensor] | None = None
        for batch in batches:
            for p in params:
                p.grad = None
            _backward(batch, scale)
            with torch.no_grad():
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
                norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
                saved = [p.detach().clone() for p in params]
                # ρ/‖g‖ stays on the device: nothing here waits for the GPU
                torch._foreach_add_(params, torch._foreach_mul(grads, self.rho / (norm + 1e-12)))
            for p in params:
                p.grad = None
            _backward(batch, scale)
            with torch.no_grad():
                torch._foreach_copy_(params, saved)  # back to A, B bit for bit
                second = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
                if accumulated is None:
                    accumulated = second
                else:
                    torch._foreach_add_(accumulated, second)
        for p, grad in zip(params, accumulated or []):
            p.grad = grad
        self.optimizer.step()
        self.optimizer.zero_grad()


def draw_floor(weights: Sequence[Tensor], micro_batches: int, generator: torch.Generator) -> None:
    """t_rng: draw 2 standard-normal tensors of every target's shape per micro-batch.

    FlatPerturb never keeps the weights perturbed, so it must draw the noise for the forward and
    regenerate it for the backward in every micro-batch: this is its floor.
    """
    for _ in range(micro_batches):
        for weight in weights:
            for draw in range(2):
                generator.manual_seed(draw)
                z = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
                z.normal_(generator=generator)


class ThreadedFloor:
    """t_rng on several threads: each tensor split into one row block per thread, each block
    drawn by its own ``torch.Generator`` (a CPU generator is one sequential stream, one core).

    Calling it with ``micro_batches`` draws 2 tensors of every target's shape per micro-batch,
    as `draw_floor` does.
    """

    def __init__(self, weights: Sequence[Tensor], threads: int):
        self.weights = list(weights)
        self.generators = [torch.Generator() for _ in range(threads)]
        self.pool = ThreadPoolExecutor(max(threads - 1, 1), thread_name_prefix="floor")

    def __call__(self, micro_batches: int) -> None:
        for _ in range(micro_batches):
            for weight in self.weights:
                for draw in range(2):
                    z = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
                    parts = z.chunk(len(self.generators))

                    def fill(
                        index: int, parts: tuple[Tensor, ...] = parts, draw: int = draw
                    ) -> None:
                        generator = self.generators[index]
                        generator.manual_seed(len(self.generators) * draw + index)
                        parts[index].normal_(generator=generator)

                    futures = [self.pool.submit(fill, i) for i in range(1, len(parts))]
                    fill(0)
                    for future in futures:
                        future.result()


class _NormalDraws(TorchDispatchMode):
    """Records the shape, dtype and device of every in-place standard-normal draw."""

    def __init__(self) -> None:
        super().__init__()
        self.draws: list[tuple[torch.Size, torch.dtype, torch.device]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is torch.ops.aten.normal_.default:
            self.draws.append((args[0].shape, args[0].dtype, args[0].device))
        return func(*args, **(kwargs or {}))


def count_draws(call: Callable[[], Any]) -> list[tuple[torch.Size, torch.dtype, torch.device]]:
    """Run ``call()`` once and return the standard-normal draws it made (backward included).

    Example:
        >>> count_draws(lambda: torch.empty(2, 3).normal_())
        [(torch.Size([2, 3]), torch.float32, device(type='cpu'))]
    """
    mode = _NormalDraws()
    with mode:
        call()
    return mode.draws


def replay_draws(
    draws: Sequence[tuple[torch.Size, torch.dtype, torch.device]], generator: torch.Generator
) -> None:
    """The same standard-normal draws, each seeded afresh on one ``generator`` (the floor)."""
    for index, (shape, dtype, device) in enumerate(draws):
        generator.manual_seed(index)
        torch.empty(shape, dtype=dtype, device=device).normal_(generator=generator)


# -- the CPU seed space -----------------------------------------------------------------------

_LOW32 = (1 << 32) - 1


def draw_seed32(out: Tensor, generator: torch.Generator, seed: int, scratch: Tensor) -> None:
    """``manual_seed(seed)`` (flatopt's for a one-block weight): on CPU only 32 bits count."""
    generator.manual_seed(seed)
    out.normal_(generator=generator)


def draw_sum_of_two(out: Tensor, generator: torch.Generator, seed: int, scratch: Tensor) -> None:
    """z = (z₁ + z₂)/√2, z₁ from the low and z₂ from the high 32 bits: two draws and a pass.

    Exactly N(0, 1), and two seeds repeat z only if all 64 bits match; but seeds that share one
    half share z₁ or z₂, so their z correlate at 0.5: collisions get milder, not rarer.
    """
    generator.manual_seed(seed & _LOW32)
    out.normal_(generator=generator)
    generator.manual_seed(seed >> 32)
    scratch.normal_(generator=generator)
    out.add_(scratch).mul_(1 / math.sqrt(2))


def draw_xor_state(out: Tensor, generator: torch.Generator, seed: int, scratch: Tensor) -> None:
    """One draw from an mt19937 state that depends on all 64 bits (`flatopt.noise.seed_block`):
    state(low) XOR state(high), the XOR of two independent streams."""
    seed_block(generator, seed)
    out.normal_(generator=generator)


SEED_DRAWS: dict[str, Callable[[Tensor, torch.Generator, int, Tensor], None]] = {
    "seed32": draw_seed32,
    "sum_of_two": draw_sum_of_two,
    "xor_state": draw_xor_state,
}
