"""Drift of "frozen" weights under in-place perturbation, against flatopt.

The paper-style way to train on W + ε is ``W.add_(ε)`` before the forward and ``W.sub_(ε)``
after the backward, with ε regenerated from its seed for the subtraction. In floating point
that round trip is not the identity, so the frozen weights drift as training goes on.

For a ``size × size`` weight drawn from N(0, 0.02²) after ``torch.manual_seed(--seed)`` (the
weight of an ``nn.Linear``), σ = 0.05 and the Flat-LoRA row-norm law
ε_ij = σ·‖W_i‖/√n·z_ij (``flatopt.noise.noise_std`` and ``flatopt.noise.draw_noise``, ε cast
to the weight's dtype as a noise tensor drawn for that weight would be), this script measures
in fp32, bf16 and fp16:

- one round trip ``W.add_(ε); W.sub_(ε)``: the fraction of entries whose bits changed;
- ``--steps`` round trips with a fresh ε each step: the fraction of entries that differ from
  the start and the relative drift ‖W_N − W_0‖_F / ‖W_0‖_F (in fp64), with the values at
  1, 10, 100, ... steps to show the random-walk growth;
- one round trip on ``nn.Linear``'s default U(±1/√n) init instead, for comparison: the
  fraction depends on where the values sit between powers of two, and for n = 4^k the bound
  1/√n is itself a power of two (in fp32 that lowers the fraction from about 7% to about 3%);
- the same number of steps with ``flatopt.FlatPerturb`` (``schedule="constant"``, the same σ)
  around a ``flatopt.lora.LoRALinear`` that wraps the same weight in that dtype. Each step is
  perturb, forward on a 4-row batch, backward, restore, then an SGD step on the LoRA factors
  (so the step count, and with it ε, changes every step, and backward's regeneration of W + ε
  is exercised too).

flatopt's base weight and bias must come back bitwise identical with an unmoved ``_version``
counter. The script exits with status 1 if they do not: that is a correctness claim, not a
performance figure.

Run (full size, a few minutes on 2 CPU cores):

    python benchmarks/drift.py

Smoke test (a few seconds):

    python benchmarks/drift.py --smoke --out /tmp/drift_smoke.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import flatopt
from flatopt.lora import add_lora
from flatopt.noise import derive_seed, draw_noise, noise_std

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
WEIGHT_STD = 0.02  # GPT-2's init; a normal weight spans many binades, unlike U(±1/√n)
_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def changed_fraction(current: Tensor, start: Tensor) -> float:
    """Fraction of entries whose bit pattern differs (so -0.0 vs 0.0 counts as a change)."""
    differs = current.view(_BITS[current.dtype]) != start.view(_BITS[start.dtype])
    return differs.double().mean().item()


def relative_drift(current: Tensor, start: Tensor) -> float:
    """‖current − start‖_F / ‖start‖_F, computed in fp64."""
    start64 = start.double()
    return ((current.double() - start64).norm() / start64.norm()).item()


def checkpoints(steps: int) -> list[int]:
    """1, 10, 100, ... up to ``steps``, plus ``steps`` itself."""
    marks = [10**k for k in range(int(math.log10(max(steps, 1))) + 1) if 10**k <= steps]
    return sorted({*marks, steps})


def in_place_noise(weight: Tensor, std: Tensor, generator: torch.Generator, seed: int) -> Tensor:
    """ε for ``weight`` from ``seed``, in the weight's dtype (regenerated bit for bit)."""
    return draw_noise(weight, std, generator=generator, seed=seed).to(weight.dtype)


def round_trip(start: Tensor, sigma: float, seed: int) -> float:
    """Fraction of entries changed by one ``W.add_(ε); W.sub_(ε)``, ε regenerated from its seed."""
    generator, weight = torch.Generator(), start.clone()
    std = noise_std(weight, sigma=sigma)
    noise_seed = derive_seed(seed, 0)
    weight.add_(in_place_noise(weight, std, generator, noise_seed))
    weight.sub_(in_place_noise(weight, std, generator, noise_seed))
    return changed_fraction(weight, start)


def measure_in_place(start: Tensor, sigma: float, steps: int, seed: int) -> dict[str, Any]:
    """``steps`` round trips ``W.add_(ε); W.sub_(ε)``, fresh ε each step, on a copy of ``start``."""
    generator = torch.Generator()
    weight = start.clone()
    marks, history = set(checkpoints(steps)), []
    began = time.perf_counter()
    for step in range(steps):
        # The std is taken from the current weight, as a training loop would; it is O(rows)
        # floats, so the subtraction reuses it and regenerates ε exactly.
        std = noise_std(weight, sigma=sigma)
        noise_seed = derive_seed(seed, step)
        weight.add_(in_place_noise(weight, std, generator, noise_seed))
        weight.sub_(in_place_noise(weight, std, generator, noise_seed))
        if step + 1 in marks:
            history.append(
                {
                    "step": step + 1,
                    "changed_fraction": changed_fraction(weight, start),
                    "relative_drift": relative_drift(weight, start),
                }
            )
    return {
        "round_trip_changed_fraction": round_trip(start, sigma, seed),
        "changed_fraction": history[-1]["changed_fraction"],
        "relative_drift": history[-1]["relative_drift"],
        "history": history,
        "seconds": time.perf_counter() - began,
    }


def measure_flatopt(
    linear: nn.Linear, dtype: torch.dtype, sigma: float, steps: int, seed: int
) -> dict[str, Any]:
    """``steps`` perturbed steps through FlatPerturb; the base must not change at all."""
    net = add_lora(nn.Sequential(copy.deepcopy(linear).to(dtype)), rank=8, alpha=16)
    base = net[0].base
    inner = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    opt = flatopt.FlatPerturb(inner, net, sigma=sigma, schedule="constant", seed=seed)
    batch = torch.randn(4, base.in_features, generator=torch.Generator().manual_seed(seed))
    batch = batch.to(dtype)

    weight_before, bias_before = base.weight.detach().clone(), base.bias.detach().clone()
    versions = (base.weight._version, base.bias._version)
    pointers = (base.weight.data_ptr(), base.bias.data_ptr())
    with torch.no_grad():
        clean = net(batch).double()

    began = time.perf_counter()
    first_output_change = None
    for _ in range(steps):
        opt.perturb()
        output = net(batch)
        if first_output_change is None:
            # Guards against a vacuous pass: the forward really saw W + ε.
            first_output_change = relative_drift(output.detach(), clean)
        output.float().square().mean().backward()
        opt.restore()
        opt.step()
        opt.zero_grad()
    seconds = time.perf_counter() - began

    unchanged = (
        torch.equal(base.weight, weight_before)
        and torch.equal(base.bias, bias_before)
        and changed_fraction(base.weight.detach(), weight_before) == 0.0
        and (base.weight._version, base.bias._version) == versions
        and (base.weight.data_ptr(), base.bias.data_ptr()) == pointers
        and base.weight.dtype == dtype
    )
    return {
        "changed_fraction": changed_fraction(base.weight.detach(), weight_before),
        "relative_drift": relative_drift(base.weight.detach(), weight_before),
        "version_moved": (base.weight._version, base.bias._version) != versions,
        "perturbed_output_relative_change": first_output_change,
        "num_steps": opt.num_steps,
        "exact": bool(unchanged),
        "seconds": seconds,
    }


def markdown_table(results: dict[str, dict[str, Any]], steps: int) -> str:
    rows = [
        f"| dtype | 1 round trip: changed | {steps} steps: changed | {steps} steps: rel. drift "
        f"| flatopt {steps} steps: changed | flatopt rel. drift |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, result in results.items():
        in_place, flat = result["in_place"], result["flatopt"]
        rows.append(
            f"| {name} | {in_place['round_trip_changed_fraction']:.2%} "
            f"| {in_place['changed_fraction']:.2%} | {in_place['relative_drift']:.2e} "
            f"| {flat['changed_fraction']:.2%} | {flat['relative_drift']:.1e} |"
        )
    return "\n".join(rows)


def growth_table(results: dict[str, dict[str, Any]]) -> str:
    marks = [entry["step"] for entry in next(iter(results.values()))["in_place"]["history"]]
    rows = [
        "| dtype | " + " | ".join(f"drift @ {m}" for m in marks) + " |",
        "|---|" + "---:|" * len(marks),
    ]
    for name, result in results.items():
        cells = [f"{entry['relative_drift']:.2e}" for entry in result["in_place"]["history"]]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def init_table(results: dict[str, dict[str, Any]], size: int) -> str:
    rows = [
        f"| dtype | N(0, {WEIGHT_STD}²) | nn.Linear default U(±1/√{size}) |",
        "|---|---:|---:|",
    ]
    for name, result in results.items():
        rows.append(
            f"| {name} | {result['in_place']['round_trip_changed_fraction']:.2%} "
            f"| {result['round_trip_nn_linear_init']:.2%} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000, help="round trips (default 1000)")
    parser.add_argument("--size", type=int, default=1024, help="weight is size x size")
    parser.add_argument("--sigma", type=float, default=0.05, help="noise scale σ")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weight and the noise")
    parser.add_argument("--smoke", action="store_true", help="size 128, 20 steps")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/drift.json"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.steps = 128, 20
    if args.steps < 1 or args.size < 1:
        parser.error("--steps and --size must be positive")

    torch.manual_seed(args.seed)
    linear = nn.Linear(args.size, args.size)
    default_init = linear.weight.detach().clone()
    with torch.no_grad():
        linear.weight.normal_(0.0, WEIGHT_STD)

    results: dict[str, dict[str, Any]] = {}
    for name, dtype in DTYPES.items():
        start = linear.weight.detach().to(dtype)
        results[name] = {
            "in_place": measure_in_place(start, args.sigma, args.steps, args.seed),
            "flatopt": measure_flatopt(linear, dtype, args.sigma, args.steps, args.seed),
            "round_trip_nn_linear_init": round_trip(default_init.to(dtype), args.sigma, args.seed),
        }

    exact = all(result["flatopt"]["exact"] for result in results.values())
    print(f"Weight {args.size}x{args.size}, sigma={args.sigma}, {args.steps} steps\n")
    print(markdown_table(results, args.steps))
    print("\nIn-place relative drift as the steps accumulate:\n")
    print(growth_table(results))
    print("\nOne round trip, by weight init (the fraction depends on where the values sit")
    print("between powers of two; U(±1/√n) with n a power of 4 has a power-of-two bound):\n")
    print(init_table(results, args.size))
    print(f"\nflatopt restored every weight bitwise: {exact}")

    report = {
        "benchmark": "drift",
        "config": {
            "size": args.size,
            "steps": args.steps,
            "sigma": args.sigma,
            "seed": args.seed,
            "smoke": args.smoke,
            "weight_init": f"normal(0, {WEIGHT_STD}) after torch.manual_seed(seed), cast to dtype",
            "noise": "sigma * ||W_i|| / sqrt(n) * z, z drawn in the weight's dtype, "
            "epsilon cast to the weight's dtype",
            "flatopt": "FlatPerturb(SGD(lr=1e-3), LoRALinear rank 8 alpha 16, "
            "schedule='constant'); perturb, forward (batch 4), backward, restore, step",
        },
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "flatopt_exact": exact,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    if not exact:
        print("ERROR: flatopt changed the frozen weights", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
