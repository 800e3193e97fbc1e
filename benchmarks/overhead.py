"""Per-step time of FlatPerturb against plain LoRA, its baselines and the noise floor.

Model: a GPT-style decoder (``_models.TinyGPT``): token and position embeddings, pre-LN blocks
with causal self-attention (separate q, k, v, o ``nn.Linear``) and a 4x GELU MLP (fc1, fc2), a
final LayerNorm and an LM head. Defaults (the reference configuration): width 512, 4 layers,
8 heads, vocab 2048, 2048 tokens per micro-batch as 8 sequences of 256, no gradient
accumulation. LoRA (rank 8, alpha 16, ``flatopt.lora.add_lora``) goes on every linear layer of
the blocks (q, k, v, o, fc1, fc2). The LM head is left frozen and without LoRA, as in the usual
LoRA recipes for decoders: it is not perturbed, and the floor counts the block weights only.

Five things are timed, in one process, in interleaved rounds (the order rotates each round),
after warm-up; the report uses the median over rounds, and the median of per-round ratios.
One step is ``--accumulation`` micro-batches (forward + cross-entropy + backward each) and one
AdamW step + zero_grad:

- ``lora``: plain LoRA;
- ``flat``: ``flatopt.FlatPerturb(AdamW, model, sigma=0.05, schedule="constant", seed=0,
  resample="step")``: perturb() before each micro-batch's forward, restore() after its backward;
- ``inplace``: the official code's mechanism (``_baselines.InPlace``): ``W.add_(ε)`` before the
  first micro-batch, ``W.sub_(ε)`` with ε regenerated after the last; same noise law and scale;
- ``sam``: LoRA-SAM (``_baselines.LoRASAM``, ρ = 0.05): two forward/backward passes per
  micro-batch, the ascent step on A and B only;
- ``rng``: t_rng, drawing 2 standard-normal tensors of every target weight's shape per
  micro-batch with a ``torch.Generator``: FlatPerturb's floor, since it never keeps the weights
  perturbed (one draw for the forward, one regeneration for the backward);
- ``rng_threads`` (only with more than one torch thread): the same draws, each tensor split
  into one row block per thread with its own generator, drawn in parallel. torch's CPU
  generator is one sequential stream, so t_rng uses one core; this is the floor for a draw
  that uses them all, as flatopt's does on CPU.

Reported ratios: flat / lora, flat / inplace, flat / sam and (flat − lora) / t_rng. The targets
(docs/performance.md), at the reference configuration: (t_flat − t_lora) ≤ 1.10·t_rng, t_flat ≤
1.0 × inplace, t_flat ≤ 0.55 × sam. Wall-clock time (``time.perf_counter``) is the figure of
merit; process-CPU time is recorded too. Every method trains the same LoRA factors in turn,
each with its own AdamW. Before timing, the script checks that perturb() really changes the logits.

``--sweep`` runs the grid tokens per micro-batch {512, 2048, 8192} × width {256, 512, 1024} ×
accumulation {1, 4} with 2 layers (``--layers`` overrides). A step costs about tokens per step ×
d²; cells heavier than ``--max-cost`` times the reference step (2048 tokens at d = 512) are
skipped and listed (the default 1.0 keeps 9 of the 18 cells, which fit in about 5 minutes on 2
shared CPU cores; ``--max-cost 0`` runs all of them, hours there). Each cell gets as many
rounds as fit in ``--cell-seconds`` (estimated from its warm-up), at least 2 (1 where a single
round is estimated at over 3 budgets) and at most ``--rounds``. The warm-up is one
single-micro-batch step per method; the accumulation-4 cell reuses the model of the
accumulation-1 cell before it, already warm.

``--profile`` adds a torch.profiler summary of a few flat and lora steps: where flat's extra
time goes, by aten op. ``--threads N`` sets ``torch.set_num_threads``.

``--device cuda`` runs on the GPU, and its defaults become the GPU reference configuration:
bf16 weights (``--dtype``), d = 1024, 24 layers, 16 heads, 4096 tokens per step as 4 sequences
of 1024 (every flag still overrides). Each timing is ``--repeat`` steps (3 by default there)
between two ``torch.cuda.synchronize()`` and CUDA events. The report adds the overhead as a
percentage of a LoRA step (the target there: ≤ 5%).

``--teaching`` times the teaching-size model instead: 4 × (Linear(64, 64) + GELU), LoRA rank
4 on all four layers (``add_lora``), batch 32 with cross-entropy over 64 classes, AdamW, one
thread. Each timing is ``--repeat`` steps (200 by default), in interleaved rounds; the report
uses medians of per-round ratios. It reports flat / lora; the draw floor (lora + draws) / lora,
where the draws are the standard-normal draws flatopt makes in one step (recorded by shape
from a real step, so the count follows the code), replayed on one generator; and the cost of
hooks that are never armed: a model with a FlatPerturb built on it but never perturbed (its
inner AdamW steps directly) against the same model without, in µs per target per step. With
``--profile`` it adds the components of the extra time (the draws alone, W + ε with
``perturbed_weight``, the row norms with ``noise_std``), a cProfile table of the Python
functions of a flat step and the aten-op table.

``--seed-space`` measures what it costs to give the CPU draw a 64-bit seed space (torch's CPU
generator keeps 32 bits of a seed): ``_baselines.SEED_DRAWS`` against flatopt's draw, per
block, at the teaching size (64 × 64, one block) and at 512 × 512 (four blocks of 128 rows),
one thread, with their statistics checked.

Run the reference configuration (about a minute on 2 idle CPU cores), the sweep, a profile,
the GPU reference, the teaching size, the seed space:

    python benchmarks/overhead.py
    python benchmarks/overhead.py --sweep --out benchmarks/results/overhead_sweep.json
    python benchmarks/overhead.py --profile --out /tmp/overhead_profile.json
    python benchmarks/overhead.py --device cuda --out benchmarks/results/gpu/overhead.json
    python benchmarks/overhead.py --teaching --profile --out /tmp/overhead_teaching.json
    python benchmarks/overhead.py --seed-space --out /tmp/overhead_seed_space.json

Smoke test (tiny model, 2 rounds, a few seconds; also with --teaching or --seed-space):

    python benchmarks/overhead.py --smoke --out /tmp/overhead_smoke.json
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import datetime
import itertools
import json
import os
import platform
import pstats
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _baselines import (
    SEED_DRAWS,
    InPlace,
    LoRASAM,
    PlainLoRA,
    ThreadedFloor,
    count_draws,
    draw_floor,
    replay_draws,
)
from _models import BLOCK_LINEARS, TinyGPT, teaching_mlp
from torch import Tensor, nn

import flatopt
from flatopt.adapters import find_targets
from flatopt.lora import LoRALinear, add_lora
from flatopt.noise import BLOCK_ELEMENTS, blocks, noise_std, perturbed_weight

METHODS = ("lora", "flat", "inplace", "sam", "rng")
SWEEP_TOKENS = (512, 2048, 8192)
SWEEP_WIDTHS = (256, 512, 1024)
SWEEP_ACCUMULATION = (1, 4)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# The GPU reference configuration (docs/performance.md): what --device cuda defaults to.
GPU_DEFAULTS = {
    "width": 1024,
    "layers": 24,  # 2 with --sweep, as on CPU
    "heads": 16,
    "tokens": 4096,
    "max_seq": 1024,
    "dtype": "bf16",
    "repeat": 3,
}
CPU_DEFAULTS = {
    "width": 512,
    "layers": 4,  # 2 with --sweep
    "heads": 8,
    "tokens": 2048,
    "max_seq": 256,
    "dtype": "fp32",
    "repeat": 1,
}

Step = Callable[[int], None]  # one optimizer step over this many micro-batches


def build_model(
    args: argparse.Namespace, width: int, layers: int, tokens: int, micro_batches: int
) -> tuple[nn.Module, list[tuple[Tensor, Tensor]]]:
    """The LoRA-adapted decoder and ``micro_batches`` fixed (inputs, next-token labels)."""
    torch.manual_seed(args.seed)
    seq = min(args.max_seq, tokens)
    model = TinyGPT(args.vocab, width, layers, args.heads, max_seq=seq)
    add_lora(model, BLOCK_LINEARS, rank=args.rank, alpha=args.alpha)
    model.to(args.device, DTYPES[args.dtype])
    batches = []
    for _ in range(micro_batches):
        data = torch.randint(args.vocab, (tokens // seq, seq + 1)).to(args.device)
        batches.append((data[:, :-1], data[:, 1:]))
    return model, batches


def make_steps(
    model: nn.Module, batches: list[tuple[Tensor, Tensor]], sigma: float, rho: float, seed: int
) -> tuple[dict[str, Step], flatopt.FlatPerturb]:
    """One callable per method; ``step(n)`` does one optimizer step over n micro-batches."""
    trainable = [p for p in model.parameters() if p.requires_grad]

    def adamw() -> torch.optim.Optimizer:
        return torch.optim.AdamW(trainable, lr=1e-4)

    flat = flatopt.FlatPerturb(
        adamw(), model, sigma=sigma, schedule="constant", seed=seed, resample="step"
    )
    # The methods take turns on one model, so the other methods' forwards run between two of
    # flat's steps, outside perturb(): by design here, not the mistake flatopt warns about.
    warnings.filterwarnings("ignore", message=r".*forwards of target layers ran outside perturb")
    plain = PlainLoRA(adamw())
    inplace = InPlace(adamw(), model, sigma, seed)
    sam = LoRASAM(adamw(), rho=rho)
    # The same weights FlatPerturb perturbs, found through the same adapters.
    weights = [target.weight for _, target in find_targets(model)]
    generator = torch.Generator(device=weights[0].device)

    def losses(n: int) -> list[Callable[[], Tensor]]:
        def loss(inputs: Tensor, labels: Tensor) -> Tensor:
            return F.cross_entropy(model(inputs).flatten(0, 1), labels.flatten())

        return [lambda b=b: loss(*b) for b in batches[:n]]

    def flat_step(n: int) -> None:
        for loss in losses(n):
            flat.perturb()
            (loss() / n).backward()
            flat.restore()
        flat.step()
        flat.zero_grad()

    steps: dict[str, Step] = {
        "lora": lambda n: plain.step(losses(n)),
        "flat": flat_step,
        "inplace": lambda n: inplace.step(losses(n)),
        "sam": lambda n: sam.step(losses(n)),
        "rng": lambda n: draw_floor(weights, n, generator),
    }
    if weights[0].device.type == "cpu" and torch.get_num_threads() > 1:  # split across threads
        threaded = ThreadedFloor(weights, torch.get_num_threads())
        steps["rng_threads"] = threaded
    return steps, flat


@torch.no_grad()
def check_noise_is_on(model: nn.Module, flat: flatopt.FlatPerturb, inputs: Tensor) -> float:
    """Relative change of the logits under perturb(); zero would make the timing meaningless."""
    clean = model(inputs)
    with flat.perturbed():
        noisy = model(inputs)
    change = ((noisy - clean).norm() / clean.norm()).item()
    if not change > 0:
        raise RuntimeError("FlatPerturb did not change the forward; the noise is not on.")
    return change


def timed(step: Step, micro_batches: int, repeat: int, cuda: bool = False) -> tuple[float, float]:
    """Wall and process-CPU seconds per call of ``step``, over ``repeat`` back-to-back calls.

    With ``cuda``, the device is synchronised before and after, and the wall time is the time
    between two CUDA events recorded around the calls.
    """
    if cuda:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeat):
        step(micro_batches)
    if cuda:
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        seconds = time.perf_counter() - wall
    return seconds / repeat, (time.process_time() - cpu) / repeat


def run_rounds(
    steps: dict[str, Step],
    micro_batches: int,
    warmup: int,
    repeat: int,
    rounds: int,
    budget: float | None,
    estimate: dict[str, float] | None = None,
    cuda: bool = False,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Warm up every method, then time them round-robin.

    The warm-up is ``warmup`` single-micro-batch steps per method; ``estimate`` (seconds per
    micro-batch and method, from an earlier cell on the same model) replaces it. With a
    ``budget`` (seconds), the number of rounds is what fits in it, between 2 and ``rounds``;
    a cell whose single round is estimated at over 3 budgets gets 1 round. Returns wall-clock
    and process-CPU seconds per step, per round and method.
    """
    if estimate is None:
        estimate = {}
        for name, step in steps.items():
            for _ in range(warmup):
                estimate[name] = timed(step, 1, 1, cuda)[0]
    if budget is not None and estimate:
        one_round = micro_batches * repeat * sum(estimate.values())
        floor = 1 if one_round > 3 * budget else 2
        rounds = max(floor, min(rounds, int(budget / max(one_round, 1e-9))))
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            seconds, cpu_seconds = timed(steps[name], micro_batches, repeat, cuda)
            wall[name].append(seconds)
            cpu[name].append(cpu_seconds)
        line = ", ".join(f"{name} {wall[name][-1]:.3f}s" for name in names)
        print(f"  round {index + 1}/{rounds}: {line}", file=sys.stderr, flush=True)
    return wall, cpu


def summarise(times: dict[str, list[float]]) -> dict[str, float]:
    """Medians per method, ratios of the medians, and medians of the per-round ratios."""
    median = {f"t_{name}": statistics.median(values) for name, values in times.items()}
    names = list(times)
    rounds = list(zip(*(times[name] for name in names)))
    ratios: dict[str, Callable[[dict[str, float]], float]] = {
        "flat_over_lora": lambda t: t["flat"] / t["lora"],
        "flat_over_inplace": lambda t: t["flat"] / t["inplace"],
        "flat_over_sam": lambda t: t["flat"] / t["sam"],
        "overhead_over_rng": lambda t: (t["flat"] - t["lora"]) / t["rng"],
        "inplace_over_lora": lambda t: t["inplace"] / t["lora"],
        "sam_over_lora": lambda t: t["sam"] / t["lora"],
        "rng_over_lora": lambda t: t["rng"] / t["lora"],
        "overhead_percent_of_lora": lambda t: 100 * (t["flat"] - t["lora"]) / t["lora"],
    }
    if "rng_threads" in times:
        ratios["overhead_over_rng_threads"] = lambda t: (t["flat"] - t["lora"]) / t["rng_threads"]
    summary = dict(median)
    of_medians = {name: median[f"t_{name}"] for name in names}
    for key, ratio in ratios.items():
        summary[key] = ratio(of_medians)
        summary[f"{key}_paired_median"] = statistics.median(
            ratio(dict(zip(names, values))) for values in rounds
        )
    return summary


def run_cell(
    args: argparse.Namespace,
    width: int,
    layers: int,
    tokens: int,
    accumulation: int,
    cache: dict[tuple[int, int, int], Any],
) -> dict[str, Any]:
    """Build (or reuse), check and time one configuration; return its record for the JSON.

    ``cache`` keeps the last model with its steps and per-method times, so the cells that
    differ only in accumulation share one model and one warm-up.
    """
    if width % args.heads:
        raise SystemExit(f"width {width} is not divisible by --heads {args.heads}")
    seq = min(args.max_seq, tokens)
    if tokens % seq:
        raise SystemExit(f"--tokens {tokens} is not a multiple of the sequence length {seq}")
    key = (width, layers, tokens)
    if key not in cache:
        cache.clear()
        micro = max((args.accumulation, *(SWEEP_ACCUMULATION if args.sweep else ())))
        model, batches = build_model(args, width, layers, tokens, micro)
        steps, flat = make_steps(model, batches, args.sigma, args.rho, args.seed)
        logits_change = check_noise_is_on(model, flat, batches[0][0])
        cache[key] = (steps, flat, logits_change, None)
    steps, flat, logits_change, estimate = cache[key]
    target_numel = sum(rows * fan_in for _, (rows, fan_in) in flat.targets)
    print(
        f"d={width}, {layers} layers, {tokens} tokens/micro-batch, accumulation {accumulation}: "
        f"{len(flat.targets)} targets, {target_numel:,} weights",
        file=sys.stderr,
        flush=True,
    )
    load_before = os.getloadavg()
    began = time.perf_counter()
    budget = args.cell_seconds if args.sweep else None
    cuda = args.device == "cuda"
    times, cpu_times = run_rounds(
        steps, accumulation, args.warmup, args.repeat, args.rounds, budget, estimate, cuda
    )
    per_micro = {name: statistics.median(values) / accumulation for name, values in times.items()}
    cache[key] = (steps, flat, logits_change, per_micro)
    seconds = time.perf_counter() - began
    profile = profile_steps(steps, accumulation, cuda=cuda) if args.profile else None
    record: dict[str, Any] = {
        "device": args.device,
        "dtype": args.dtype,
        "width": width,
        "layers": layers,
        "heads": args.heads,
        "vocab": args.vocab,
        "tokens": tokens,
        "batch": tokens // seq,
        "seq": seq,
        "accumulation": accumulation,
        "num_targets": len(flat.targets),
        "target_weights": target_numel,
        "perturbed_logits_relative_change": logits_change,
        "rounds": len(times["lora"]),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "timed_seconds": seconds,
        "times": times,
        "cpu_times": cpu_times,
        "summary": summarise(times),
        "cpu_summary": summarise(cpu_times),
    }
    if profile is not None:
        record["profile"] = profile
    return record


def _self_device_us(event: Any) -> float:
    """An event's self time on the GPU in µs (the attribute was renamed in torch 2.4)."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(event, name, None)
        if value is not None:
            return float(value)
    return 0.0


def profile_steps(
    steps: dict[str, Step], micro_batches: int, count: int = 3, cuda: bool = False
) -> dict[str, Any]:
    """Self time per aten op over ``count`` lora and flat steps, and flat's excess.

    On CPU the time is self CPU time; with ``cuda`` it is the ops' self time on the GPU, which
    is what a GPU step waits for (the CPU side only launches).
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    per_method: dict[str, dict[str, tuple[int, float]]] = {}
    wall: dict[str, float] = {}
    for name in ("lora", "flat"):
        with profile(activities=activities) as prof:
            began = time.perf_counter()
            for _ in range(count):
                steps[name](micro_batches)
            if cuda:
                torch.cuda.synchronize()
            wall[name] = (time.perf_counter() - began) / count
        per_method[name] = {
            event.key: (
                event.count // count,
                (_self_device_us(event) if cuda else event.self_cpu_time_total) / 1e3 / count,
            )
            for event in prof.key_averages()
        }
    rows = []
    for op in set(per_method["lora"]) | set(per_method["flat"]):
        calls_lora, ms_lora = per_method["lora"].get(op, (0, 0.0))
        calls_flat, ms_flat = per_method["flat"].get(op, (0, 0.0))
        rows.append(
            {
                "op": op,
                "calls_lora": calls_lora,
                "calls_flat": calls_flat,
                "self_ms_lora": ms_lora,
                "self_ms_flat": ms_flat,
                "extra_ms": ms_flat - ms_lora,
            }
        )
    rows.sort(key=lambda row: -row["extra_ms"])
    return {
        "clock": "self GPU time" if cuda else "self CPU time",
        "steps_per_method": count,
        "wall_ms_per_step": {name: 1e3 * value for name, value in wall.items()},
        "self_ms_total": {
            name: sum(ms for _, ms in ops.values()) for name, ops in per_method.items()
        },
        "ops_by_extra_time": rows,
    }


def profile_table(profile: dict[str, Any], limit: int = 12) -> str:
    wall = profile["wall_ms_per_step"]
    total = profile["self_ms_total"]
    clock = profile.get("clock", "self CPU time")
    lines = [
        f"profiled wall per step (ms): lora {wall['lora']:.1f}, flat {wall['flat']:.1f}, "
        f"extra {wall['flat'] - wall['lora']:.1f}; aten {clock} summed (ms): "
        f"lora {total['lora']:.1f}, flat {total['flat']:.1f}",
        "",
        "| aten op | calls lora | calls flat | self ms lora | self ms flat | extra ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in profile["ops_by_extra_time"][:limit]:
        lines.append(
            f"| `{row['op']}` | {row['calls_lora']} | {row['calls_flat']} "
            f"| {row['self_ms_lora']:.1f} | {row['self_ms_flat']:.1f} | {row['extra_ms']:+.1f} |"
        )
    return "\n".join(lines)


def cell_table(cells: list[dict[str, Any]]) -> str:
    """One row per configuration: the medians and the four ratios (wall clock)."""
    rows = [
        "| d | layers | tokens | GA | rounds | t_lora (s) | t_flat (s) | t_inplace (s) "
        "| t_sam (s) | t_rng (s) | flat / lora | flat / inplace | flat / sam "
        "| (flat − lora) / t_rng | load |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cell in cells:
        s = cell["summary"]
        rows.append(
            f"| {cell['width']} | {cell['layers']} | {cell['tokens']} | {cell['accumulation']} "
            f"| {cell['rounds']} | {s['t_lora']:.4f} | {s['t_flat']:.4f} | {s['t_inplace']:.4f} "
            f"| {s['t_sam']:.4f} | {s['t_rng']:.4f} | {s['flat_over_lora']:.3f} "
            f"| {s['flat_over_inplace']:.3f} | {s['flat_over_sam']:.3f} "
            f"| {s['overhead_over_rng']:.2f} | {cell['load_average_before'][0]:.1f} |"
        )
    return "\n".join(rows)


def reference_table(cell: dict[str, Any]) -> str:
    """The single-configuration report: wall and process-CPU medians and ratios."""
    rows = [
        "| clock (median) | t_lora (s) | t_flat (s) | t_inplace (s) | t_sam (s) | t_rng (s) "
        "| flat / lora | flat / inplace | flat / sam | (flat − lora) / t_rng |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for clock, key in (("wall", "summary"), ("process CPU", "cpu_summary")):
        s = cell[key]
        rows.append(
            f"| {clock} | {s['t_lora']:.4f} | {s['t_flat']:.4f} | {s['t_inplace']:.4f} "
            f"| {s['t_sam']:.4f} | {s['t_rng']:.4f} | {s['flat_over_lora']:.3f} "
            f"| {s['flat_over_inplace']:.3f} | {s['flat_over_sam']:.3f} "
            f"| {s['overhead_over_rng']:.2f} |"
        )
    s = cell["summary"]
    if "t_rng_threads" in s:
        rows.append(
            f"\nt_rng on {torch.get_num_threads()} threads: {s['t_rng_threads']:.4f} s; "
            f"(flat − lora) / that: {s['overhead_over_rng_threads_paired_median']:.2f} "
            "(median of per-round ratios)"
        )
    rows.append(
        f"\noverhead: {s['overhead_percent_of_lora_paired_median']:.1f}% of a LoRA step "
        "(median of per-round ratios)"
    )
    rows.append(
        f"\nwall, medians of per-round ratios: flat / lora "
        f"{s['flat_over_lora_paired_median']:.3f}, flat / inplace "
        f"{s['flat_over_inplace_paired_median']:.3f}, flat / sam "
        f"{s['flat_over_sam_paired_median']:.3f}, (flat − lora) / t_rng "
        f"{s['overhead_over_rng_paired_median']:.2f}"
    )
    return "\n".join(rows)


def targets_check(cell: dict[str, Any]) -> str:
    """The time targets of docs/performance.md, on the medians of per-round ratios."""
    s = cell["summary"]
    checks = [
        ("(t_flat − t_lora) ≤ 1.10·t_rng", s["overhead_over_rng_paired_median"], 1.10),
        ("t_flat ≤ 1.0 × inplace", s["flat_over_inplace_paired_median"], 1.0),
        ("t_flat ≤ 0.55 × sam", s["flat_over_sam_paired_median"], 0.55),
    ]
    if cell.get("device") == "cuda":
        checks.append(
            ("GPU: overhead ≤ 5% of a LoRA step", s["overhead_percent_of_lora_paired_median"], 5.0)
        )
    return "\n".join(
        f"{'meets' if value <= limit else 'MISSES'}: {text} (measured {value:.3f})"
        for text, value, limit in checks
    )


# -- the teaching size ------------------------------------------------------------------------

TEACHING = {"width": 64, "depth": 4, "rank": 4, "alpha": 8, "batch": 32, "classes": 64}

Call = Callable[[], Any]


def timed_calls(call: Call, repeat: int) -> tuple[float, float]:
    """Wall and thread-CPU seconds per call of ``call``, over ``repeat`` back-to-back calls.

    With one torch thread every op and the backward run on this thread, so its CPU time is the
    work itself, without the waits a shared machine adds to the wall clock.
    """
    wall, cpu = time.perf_counter(), time.thread_time()
    for _ in range(repeat):
        call()
    return (time.perf_counter() - wall) / repeat, (time.thread_time() - cpu) / repeat


Times = dict[str, list[float]]


def interleaved(
    calls: dict[str, Call], rounds: int, repeat: int, warmup: int
) -> tuple[Times, Times]:
    """Warm every call up, then time them in rounds whose order rotates: wall and thread-CPU
    seconds per call, per round."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    wall: Times = {name: [] for name in calls}
    cpu: Times = {name: [] for name in calls}
    names = list(calls)
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            seconds, cpu_seconds = timed_calls(calls[name], repeat)
            wall[name].append(seconds)
            cpu[name].append(cpu_seconds)
        line = ", ".join(f"{name} {1e6 * wall[name][-1]:.0f}µs" for name in names)
        print(f"  round {index + 1}/{rounds}: {line}", file=sys.stderr, flush=True)
    return wall, cpu


def paired(times: dict[str, list[float]], ratio: Callable[[dict[str, float]], float]) -> float:
    """The median over rounds of ``ratio`` applied to each round's times."""
    names = list(times)
    return statistics.median(ratio(dict(zip(names, row))) for row in zip(*times.values()))


def teaching_setup(args: argparse.Namespace) -> dict[str, Any]:
    """Three copies of the teaching model (plain, FlatPerturb, FlatPerturb never armed), the
    step of each, and the standard-normal draws one flat step makes."""
    t = TEACHING
    torch.manual_seed(args.seed)
    base = add_lora(teaching_mlp(t["width"], t["depth"]), None, rank=t["rank"], alpha=t["alpha"])
    with torch.no_grad():  # a model some way into training: ΔW ≠ 0, so W' ≠ W
        for module in base.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.normal_(std=0.02)
    plain, flat_model, unarmed_model = (copy.deepcopy(base) for _ in range(3))
    x = torch.randn(t["batch"], t["width"])
    labels = torch.randint(t["classes"], (t["batch"],))

    def adamw(model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def plain_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> Call:
        def step() -> None:
            F.cross_entropy(model(x), labels).backward()
            optimizer.step()
            optimizer.zero_grad()

        return step

    flat = flatopt.FlatPerturb(
        adamw(flat_model), flat_model, sigma=args.sigma, schedule="constant", seed=args.seed
    )

    def flat_step() -> None:
        flat.perturb()
        F.cross_entropy(flat_model(x), labels).backward()
        flat.restore()
        flat.step()
        flat.zero_grad()

    # Built and kept, never perturbed: its hooks are installed and never armed.
    unarmed = flatopt.FlatPerturb(
        adamw(unarmed_model), unarmed_model, sigma=args.sigma, schedule="constant", seed=0
    )
    lora = plain_step(plain, adamw(plain))
    lora_twin = plain_step(plain, adamw(plain))
    draws = count_draws(flat_step)
    generator = torch.Generator()

    def lora_and_draws() -> None:
        lora_twin()
        replay_draws(draws, generator)

    calls: dict[str, Call] = {
        "lora": lora,
        "flat": flat_step,
        "lora_draws": lora_and_draws,
        "unarmed": plain_step(unarmed_model, adamw(unarmed_model)),
    }
    targets = [target for _, target in find_targets(flat_model)]
    if args.profile:  # the components of flat's extra time, each alone
        calls["draws"] = lambda: replay_draws(draws, generator)

        def norms() -> None:
            for target in targets:
                noise_std(target.weight, target.delta(), args.sigma)

        by_shape = {tuple(target.weight.shape): target.weight for target in targets}
        stds = {shape: noise_std(w, None, args.sigma) for shape, w in by_shape.items()}

        def w_plus_eps() -> None:
            for index, (shape, _, _) in enumerate(draws):
                key = tuple(shape)
                perturbed_weight(by_shape[key], stds[key], generator=generator, seed=index)

        calls["norms"] = norms
        calls["w_plus_eps"] = w_plus_eps
    return {
        "calls": calls,
        "flat": flat,
        "flat_step": flat_step,
        "unarmed": unarmed,
        "draws": draws,
        "targets": len(targets),
    }


def python_profile(call: Call, count: int) -> dict[str, list[dict[str, Any]]]:
    """cProfile of ``count`` calls: the Python functions by self time, and flatopt's own
    functions by cumulative time, in µs per call (cProfile inflates small functions)."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(count):
        call()
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (cc, nc, tt, ct, callers)
    root = str(Path(flatopt.__file__).resolve().parent.parent) + os.sep
    rows = []
    for (file, line, name), (_, calls, self_s, cumulative_s, _) in stats.items():
        where = file.replace(root, "") if file.startswith(root) else Path(file).name
        label = f"{where}:{line}({name})" if line else name
        rows.append(
            {
                "function": label,
                "calls_per_step": calls / count,
                "self_us": 1e6 * self_s / count,
                "cumulative_us": 1e6 * cumulative_s / count,
                "flatopt": file.startswith(root + "flatopt"),
            }
        )
    by_self = sorted(rows, key=lambda r: -r["self_us"])[:15]
    own = sorted((r for r in rows if r["flatopt"]), key=lambda r: -r["cumulative_us"])[:15]
    return {"by_self_time": by_self, "flatopt_by_cumulative_time": own}


def run_teaching(args: argparse.Namespace) -> dict[str, Any]:
    """Time the teaching size; return the record for the JSON."""
    setup = teaching_setup(args)
    calls, targets, draws = setup["calls"], setup["targets"], setup["draws"]
    print(
        f"teaching size: {TEACHING['depth']} × (Linear({TEACHING['width']}, "
        f"{TEACHING['width']}) + GELU), LoRA r={TEACHING['rank']} on {targets} targets, batch "
        f"{TEACHING['batch']}; flatopt draws {len(draws)} normal tensors per step",
        file=sys.stderr,
        flush=True,
    )
    load_before = os.getloadavg()
    wall, cpu = interleaved(calls, args.rounds, args.repeat, args.warmup)

    def summarise_teaching(times: Times) -> dict[str, float]:
        median = {name: statistics.median(values) for name, values in times.items()}
        summary = {f"t_{name}_us": 1e6 * value for name, value in median.items()}
        summary["flat_over_lora"] = paired(times, lambda t: t["flat"] / t["lora"])
        summary["floor_lora_plus_draws_over_lora"] = paired(
            times, lambda t: t["lora_draws"] / t["lora"]
        )
        summary["flat_extra_us_per_target"] = paired(
            times, lambda t: 1e6 * (t["flat"] - t["lora"]) / targets
        )
        summary["unarmed_hooks_us_per_target"] = paired(
            times, lambda t: 1e6 * (t["unarmed"] - t["lora"]) / targets
        )
        return summary

    times = cpu  # the breakdown below uses the thread-CPU clock, the steadier one
    record: dict[str, Any] = {
        "model": dict(TEACHING),
        "num_targets": targets,
        "draws_per_step": [list(shape) for shape, _, _ in draws],
        "rounds": args.rounds,
        "steps_per_timing": args.repeat,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "times": wall,
        "cpu_times": cpu,
        "summary": summarise_teaching(wall),
        "cpu_summary": summarise_teaching(cpu),
    }
    if args.profile:
        extra = paired(times, lambda t: t["flat"] - t["lora"])
        parts = {
            "W + ε (draw, addcmul, allocation: perturbed_weight)": paired(
                times, lambda t: t["w_plus_eps"]
            ),
            "  of which the draws alone": paired(times, lambda t: t["draws"]),
            "row norms (noise_std)": paired(times, lambda t: t["norms"]),
            "hooks installed, not armed": paired(times, lambda t: t["unarmed"] - t["lora"]),
        }
        counted = sum(v for k, v in parts.items() if not k.startswith("  "))
        parts["rest: arming, saved-tensor hooks, autograd Function, wrappers"] = extra - counted
        record["breakdown_us_per_step"] = {
            "clock": "thread CPU time",
            "flat_minus_lora": 1e6 * extra,
            "components": {name: 1e6 * value for name, value in parts.items()},
        }
        record["python_profile"] = python_profile(setup["flat_step"], max(args.repeat, 20))
        steps = {"lora": lambda n: calls["lora"](), "flat": lambda n: calls["flat"]()}
        record["aten_profile"] = profile_steps(steps, 1, count=max(args.repeat // 4, 5))
    return record


def teaching_table(record: dict[str, Any]) -> str:
    lines = [
        "| clock | t_lora (µs) | t_flat (µs) | t_lora + draws (µs) | t_unarmed (µs) "
        "| flat / lora | floor (lora + draws) / lora | flat extra (µs/target) "
        "| unarmed hooks (µs/target) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for clock, key in (("wall", "summary"), ("thread CPU", "cpu_summary")):
        s = record[key]
        lines.append(
            f"| {clock} | {s['t_lora_us']:.0f} | {s['t_flat_us']:.0f} "
            f"| {s['t_lora_draws_us']:.0f} | {s['t_unarmed_us']:.0f} | {s['flat_over_lora']:.3f} "
            f"| {s['floor_lora_plus_draws_over_lora']:.3f} "
            f"| {s['flat_extra_us_per_target']:.1f} | {s['unarmed_hooks_us_per_target']:.1f} |"
        )
    lines += ["", "ratios and µs are medians of per-round values", ""]
    for clock, key in (("wall", "summary"), ("thread CPU", "cpu_summary")):
        s = record[key]
        for text, value, limit in (
            ("t_flat ≤ 1.25 × t_lora", s["flat_over_lora"], 1.25),
            ("unarmed hooks ≤ 2 µs per target per step", s["unarmed_hooks_us_per_target"], 2.0),
        ):
            verdict = "meets" if value <= limit else "MISSES"
            lines.append(f"{verdict} ({clock}): {text} (measured {value:.3f})")
    if "breakdown_us_per_step" in record:
        breakdown = record["breakdown_us_per_step"]
        total = breakdown["flat_minus_lora"]
        lines += [
            "",
            f"where flat's extra {total:.0f} µs per step go (thread CPU time; each component "
            "timed alone, the rest by difference):",
            "",
            "| component | µs / step | µs / target / step | share |",
            "|---|---:|---:|---:|",
        ]
        for name, value in breakdown["components"].items():
            lines.append(
                f"| {name} | {value:.0f} | {value / record['num_targets']:.1f} "
                f"| {100 * value / total:.0f}% |"
            )
        lines += [
            "",
            "cProfile of flat steps, flatopt's functions by cumulative time (µs per step):",
            "",
            "| function | calls / step | self µs | cumulative µs |",
            "|---|---:|---:|---:|",
        ]
        for row in record["python_profile"]["flatopt_by_cumulative_time"]:
            lines.append(
                f"| `{row['function']}` | {row['calls_per_step']:.0f} | {row['self_us']:.1f} "
                f"| {row['cumulative_us']:.1f} |"
            )
        lines += ["", profile_table(record["aten_profile"])]
    return "\n".join(lines)


# -- the CPU seed space -------------------------------------------------------------------------

SEED_SPACE_SHAPES = {"teaching 64x64": (64, 64), "512x512": (512, 512)}


def seed_space_statistics(generator: torch.Generator) -> dict[str, dict[str, float]]:
    """Each draw's z at 512 × 512 for a 63-bit seed: moments, and its correlation with the z of
    the seed + 2³² (the same low 32 bits) and of the seed + 1."""
    seed = flatopt.noise.derive_seed(0, 0)
    stats = {}
    for name, draw in SEED_DRAWS.items():
        z, same_low, next_seed = (torch.empty(512, 512) for _ in range(3))
        scratch = torch.empty(512, 512)
        draw(z, generator, seed, scratch)
        draw(same_low, generator, seed ^ (1 << 40), scratch)
        draw(next_seed, generator, seed + 1, scratch)
        flat = z.double().flatten()
        centred = flat - flat.mean()

        def corr(other: Tensor, flat: Tensor = flat) -> float:
            return torch.corrcoef(torch.stack([flat, other.double().flatten()]))[0, 1].item()

        stats[name] = {
            "mean": flat.mean().item(),
            "std": flat.std().item(),
            "kurtosis": (centred.pow(4).mean() / centred.square().mean() ** 2).item(),
            "corr_with_seed_differing_above_bit_32": corr(same_low),
            "corr_with_next_seed": corr(next_seed),
        }
    return stats


def run_seed_space(args: argparse.Namespace) -> dict[str, Any]:
    """Time each way of drawing z from a 64-bit seed against flatopt's 32-bit-seeded draw."""
    generator = torch.Generator()
    seed = flatopt.noise.derive_seed(args.seed, 0)
    calls: dict[str, Call] = {}
    shapes: dict[str, dict[str, Any]] = {}
    for label, shape in SEED_SPACE_SHAPES.items():
        weight = torch.randn(shape)
        parts = blocks(weight) if weight.numel() > BLOCK_ELEMENTS else [slice(0, shape[0])]
        out = torch.empty(shape)
        scratch = torch.empty(shape)
        seeds = [flatopt.noise.block_seed(seed, index) for index in range(len(parts))]
        shapes[label] = {"shape": list(shape), "blocks": len(parts)}
        for name, draw in SEED_DRAWS.items():

            def call(draw=draw, out=out, scratch=scratch, parts=parts, seeds=seeds) -> None:
                for rows, block_seed in zip(parts, seeds):
                    draw(out[rows], generator, block_seed, scratch[rows])

            calls[f"{label}: {name}"] = call
        std = noise_std(weight, None, args.sigma)
        calls[f"{label}: W + ε"] = lambda weight=weight, std=std: perturbed_weight(
            weight, std, generator=generator, seed=seed
        )
    setup = teaching_setup(argparse.Namespace(**{**vars(args), "profile": False}))
    calls["teaching LoRA step"] = setup["calls"]["lora"]
    draws_per_step = len(setup["draws"])
    wall, times = interleaved(calls, args.rounds, args.repeat, args.warmup)
    results: dict[str, Any] = {}
    for label, info in shapes.items():
        row: dict[str, Any] = dict(info)
        row["us"] = {
            name: 1e6 * statistics.median(times[f"{label}: {name}"])
            for name in [*SEED_DRAWS, "W + ε"]
        }
        base, whole = f"{label}: seed32", f"{label}: W + ε"
        for name in SEED_DRAWS:
            if name == "seed32":
                continue
            extra = [a - b for a, b in zip(times[f"{label}: {name}"], times[base])]
            row[f"{name}_extra_us_per_draw"] = 1e6 * statistics.median(extra)
            row[f"{name}_extra_percent_of_w_plus_eps"] = statistics.median(
                100 * e / w for e, w in zip(extra, times[whole])
            )
            if label.startswith("teaching"):
                row[f"{name}_extra_percent_of_teaching_lora_step"] = statistics.median(
                    100 * draws_per_step * e / step
                    for e, step in zip(extra, times["teaching LoRA step"])
                )
        results[label] = row
    return {
        "draws_per_teaching_step": draws_per_step,
        "t_teaching_lora_step_us": 1e6 * statistics.median(times["teaching LoRA step"]),
        "shapes": results,
        "statistics_512x512": seed_space_statistics(generator),
        "clock": "thread CPU time (one torch thread)",
        "rounds": args.rounds,
        "calls_per_timing": args.repeat,
        "times": wall,
        "cpu_times": times,
    }


def seed_space_table(record: dict[str, Any]) -> str:
    lines = [
        "| shape | blocks | seed32 (µs) | sum_of_two (µs) | xor_state (µs) | W + ε today (µs) "
        "| sum_of_two extra | xor_state extra |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, row in record["shapes"].items():
        us = row["us"]
        lines.append(
            f"| {label} | {row['blocks']} | {us['seed32']:.1f} | {us['sum_of_two']:.1f} "
            f"| {us['xor_state']:.1f} | {us['W + ε']:.1f} "
            f"| {row['sum_of_two_extra_us_per_draw']:+.1f} µs "
            f"({row['sum_of_two_extra_percent_of_w_plus_eps']:+.0f}% of W + ε) "
            f"| {row['xor_state_extra_us_per_draw']:+.1f} µs "
            f"({row['xor_state_extra_percent_of_w_plus_eps']:+.0f}% of W + ε) |"
        )
    teaching = next(r for label, r in record["shapes"].items() if label.startswith("teaching"))
    lines.append(
        f"\nat the teaching size, {record['draws_per_teaching_step']} draws per step: "
        f"sum_of_two adds {teaching['sum_of_two_extra_percent_of_teaching_lora_step']:+.1f}% "
        f"and xor_state {teaching['xor_state_extra_percent_of_teaching_lora_step']:+.1f}% of "
        f"a LoRA step ({record['t_teaching_lora_step_us']:.0f} µs)"
    )
    lines += ["", "| draw | mean | std | kurtosis | corr, seed ^ 2⁴⁰ | corr, seed + 1 |"]
    lines.append("|---|---:|---:|---:|---:|---:|")
    for name, row in record["statistics_512x512"].items():
        lines.append(
            f"| {name} | {row['mean']:+.4f} | {row['std']:.4f} | {row['kurtosis']:.3f} "
            f"| {row['corr_with_seed_differing_above_bit_32']:+.4f} "
            f"| {row['corr_with_next_seed']:+.4f} |"
        )
    return "\n".join(lines)


def environment(args: argparse.Namespace) -> dict[str, Any]:
    """Where the run happened: versions, machine, threads, and the GPU when there is one."""
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "device": args.device,
    }
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def run_mode(args: argparse.Namespace, mode: str) -> int:
    """``--teaching`` and ``--seed-space``: one CPU thread, interleaved rounds, a JSON."""
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    began = time.perf_counter()
    record = run_teaching(args) if mode == "teaching" else run_seed_space(args)
    seconds = time.perf_counter() - began
    print()
    print(teaching_table(record) if mode == "teaching" else seed_space_table(record))
    print(
        f"\nload average before / after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f}; "
        f"{seconds:.0f} s"
    )
    report = {
        "benchmark": f"overhead_{mode.replace('-', '_')}",
        "command": "python benchmarks/overhead.py " + " ".join(args.argv),
        "config": {
            "sigma": args.sigma,
            "schedule": "constant",
            "optimizer": "AdamW(lr=1e-3)",
            "rounds": args.rounds,
            "repeat": args.repeat,
            "warmup": args.warmup,
            "seed": args.seed,
            "smoke": args.smoke,
        },
        **environment(args),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "timed_seconds": seconds,
        mode.replace("-", "_"): record,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="where the model trains"
    )
    parser.add_argument(
        "--dtype", choices=tuple(DTYPES), default=None, help="weights (default fp32; cuda: bf16)"
    )
    parser.add_argument("--width", type=int, default=None, help="model width d (512; cuda 1024)")
    parser.add_argument(
        "--layers",
        type=int,
        default=None,
        help="transformer blocks (default 4, 2 with --sweep; cuda: 24)",
    )
    parser.add_argument("--heads", type=int, default=None, help="attention heads (8; cuda 16)")
    parser.add_argument("--vocab", type=int, default=2048, help="vocabulary size")
    parser.add_argument(
        "--tokens", type=int, default=None, help="tokens per micro-batch (2048; cuda 4096)"
    )
    parser.add_argument(
        "--accumulation", type=int, default=1, help="micro-batches per optimizer step"
    )
    parser.add_argument(
        "--max-seq", type=int, default=None, help="sequence length cap (256; cuda 1024)"
    )
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--alpha", type=float, default=16, help="LoRA alpha")
    parser.add_argument("--sigma", type=float, default=0.05, help="noise scale σ")
    parser.add_argument("--rho", type=float, default=0.05, help="LoRA-SAM radius ρ")
    parser.add_argument(
        "--rounds", type=int, default=None, help="timed rounds (default 11; at most 7 in a sweep)"
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per method")
    parser.add_argument(
        "--repeat", type=int, default=None, help="steps per timing (1; cuda 3; teaching 200)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the model, data, noise")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--sweep", action="store_true", help="tokens × width × accumulation grid")
    parser.add_argument(
        "--cell-seconds", type=float, default=12.0, help="time budget per sweep cell"
    )
    parser.add_argument(
        "--max-cost",
        type=float,
        default=1.0,
        help="sweep: skip cells whose tokens per step × d² exceed this many times the "
        "reference step's (2048 × 512²); 0 runs every cell",
    )
    parser.add_argument("--profile", action="store_true", help="torch.profiler summary")
    parser.add_argument(
        "--teaching", action="store_true", help="the teaching-size model (one CPU thread)"
    )
    parser.add_argument(
        "--seed-space", action="store_true", help="the cost of a 64-bit seed space on CPU"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny model, 2 rounds")
    parser.add_argument("--out", type=Path, default=None, help="JSON output")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)

    mode = "teaching" if args.teaching else "seed-space" if args.seed_space else None
    if args.teaching and args.seed_space:
        parser.error("--teaching and --seed-space are separate runs; choose one")
    if mode is not None:
        if args.device != "cpu" or args.sweep:
            parser.error(f"--{mode} runs on the CPU, without --sweep")
        args.rounds = args.rounds or (2 if args.smoke else 15)
        args.repeat = args.repeat or (10 if args.smoke else 200)
        args.warmup = 5 if args.warmup is None else args.warmup
        if min(args.rounds, args.repeat) < 1 or args.warmup < 0:
            parser.error("--rounds and --repeat must be >= 1, --warmup >= 0")
        if args.out is None:
            args.out = Path("benchmarks/results") / f"overhead_{mode.replace('-', '_')}.json"
        return run_mode(args, mode)

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(
            "--device cuda, but torch.cuda.is_available() is False: run it on a machine with a "
            "CUDA GPU and a CUDA build of torch"
        )
    if args.layers is None and args.sweep:
        args.layers = 2
    defaults = GPU_DEFAULTS if args.device == "cuda" else CPU_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.rounds is None:
        args.rounds = 7 if args.sweep else 11
    if args.warmup is None:
        args.warmup = 1 if args.sweep else 2
    if args.out is None:
        name = "overhead_sweep.json" if args.sweep else "overhead.json"
        args.out = Path("benchmarks/results") / name
    grid = [(args.tokens, args.width, args.accumulation)]
    skipped: list[dict[str, int]] = []
    if args.sweep:
        grid = list(itertools.product(SWEEP_TOKENS, SWEEP_WIDTHS, SWEEP_ACCUMULATION))
        if args.max_cost > 0:  # cost of a step ~ tokens per step × d², relative to 2048 × 512²
            heavy = [g for g in grid if g[0] * g[2] * g[1] ** 2 > args.max_cost * 2048 * 512**2]
            skipped = [{"tokens": t, "width": w, "accumulation": a} for t, w, a in heavy]
            grid = [g for g in grid if g not in heavy]
    if args.smoke:
        args.layers, args.heads, args.vocab, args.max_seq = 2, 4, 256, 256
        args.rounds, args.warmup, args.cell_seconds = 2, 1, 1.0
        grid = [(128, 64, 1), (128, 64, 2)] if args.sweep else [(256, 64, args.accumulation)]
        if args.threads is None:  # tiny matrices: a second thread only adds waiting
            args.threads = 1
    if min(args.rounds, args.repeat, args.accumulation) < 1 or args.warmup < 0:
        parser.error("--rounds, --repeat and --accumulation must be >= 1, --warmup >= 0")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)

    load_before = os.getloadavg()
    began = time.perf_counter()
    cache: dict[tuple[int, int, int], Any] = {}
    cells = [
        run_cell(args, width, args.layers, tokens, accumulation, cache)
        for tokens, width, accumulation in grid
    ]
    seconds = time.perf_counter() - began

    where = (
        f"{torch.cuda.get_device_name()}, {args.dtype}"
        if args.device == "cuda"
        else f"CPU, {args.dtype}, {torch.get_num_threads()} threads"
    )
    print(
        f"\nGPT decoder, {args.heads} heads, vocab {args.vocab}, LoRA r={args.rank} on the block "
        f"linears, sigma={args.sigma}, rho={args.rho}, {where}; wall-clock medians\n"
    )
    if len(cells) == 1:
        print(reference_table(cells[0]))
        print("\n" + targets_check(cells[0]))
    else:
        print(cell_table(cells))
        if skipped:
            names = ", ".join(
                f"{c['tokens']}×{c['accumulation']} at d={c['width']}" for c in skipped
            )
            print(f"\nskipped (heavier than --max-cost {args.max_cost:g}): {names}")
    for cell in cells:
        if "profile" in cell:
            print("\n" + profile_table(cell["profile"]))
    print(
        f"\nload average before / after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f}; "
        f"{seconds:.0f} s"
    )

    report: dict[str, Any] = {
        "benchmark": "overhead_sweep" if args.sweep else "overhead",
        "command": "python benchmarks/overhead.py " + " ".join(args.argv),
        "config": {
            "device": args.device,
            "dtype": args.dtype,
            "lora_rank": args.rank,
            "lora_alpha": args.alpha,
            "lora_targets": list(BLOCK_LINEARS),
            "lm_head": "frozen, no LoRA, not perturbed (not counted in t_rng)",
            "sigma": args.sigma,
            "rho": args.rho,
            "schedule": "constant",
            "resample": "step",
            "optimizer": "AdamW(lr=1e-4)",
            "max_rounds": args.rounds,
            "cell_seconds": args.cell_seconds if args.sweep else None,
            "warmup": args.warmup,
            "repeat": args.repeat,
            "seed": args.seed,
            "smoke": args.smoke,
        },
        **environment(args),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "timed_seconds": seconds,
        "cells": cells,
        "skipped_cells": skipped,
    }
    if len(cells) == 1:  # the single-configuration run keeps its flat layout too
        report["summary"] = cells[0]["summary"]
        report["cpu_summary"] = cells[0]["cpu_summary"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
