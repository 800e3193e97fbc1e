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

Run the reference configuration (about a minute on 2 idle CPU cores), the sweep, a profile:

    python benchmarks/overhead.py
    python benchmarks/overhead.py --sweep --out benchmarks/results/overhead_sweep.json
    python benchmarks/overhead.py --profile --out /tmp/overhead_profile.json

Smoke test (tiny model, 2 rounds, a few seconds):

    python benchmarks/overhead.py --smoke --out /tmp/overhead_smoke.json
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _baselines import InPlace, LoRASAM, PlainLoRA, ThreadedFloor, draw_floor
from _models import BLOCK_LINEARS, TinyGPT
from torch import Tensor, nn

import flatopt
from flatopt.adapters import find_targets
from flatopt.lora import add_lora

METHODS = ("lora", "flat", "inplace", "sam", "rng")
SWEEP_TOKENS = (512, 2048, 8192)
SWEEP_WIDTHS = (256, 512, 1024)
SWEEP_ACCUMULATION = (1, 4)

Step = Callable[[int], None]  # one optimizer step over this many micro-batches


def build_model(
    args: argparse.Namespace, width: int, layers: int, tokens: int, micro_batches: int
) -> tuple[nn.Module, list[tuple[Tensor, Tensor]]]:
    """The LoRA-adapted decoder and ``micro_batches`` fixed (inputs, next-token labels)."""
    torch.manual_seed(args.seed)
    seq = min(args.max_seq, tokens)
    model = TinyGPT(args.vocab, width, layers, args.heads, max_seq=seq)
    add_lora(model, BLOCK_LINEARS, rank=args.rank, alpha=args.alpha)
    batches = []
    for _ in range(micro_batches):
        data = torch.randint(args.vocab, (tokens // seq, seq + 1))
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
    plain = PlainLoRA(adamw())
    inplace = InPlace(adamw(), model, sigma, seed)
    sam = LoRASAM(adamw(), rho=rho)
    # The same weights FlatPerturb perturbs, found through the same adapters.
    weights = [target.weight for _, target in find_targets(model)]
    generator = torch.Generator()

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
    if torch.get_num_threads() > 1:  # the same draws, split across the threads
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


def timed(step: Step, micro_batches: int, repeat: int) -> tuple[float, float]:
    """Wall and process-CPU seconds per call of ``step``, over ``repeat`` back-to-back calls."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeat):
        step(micro_batches)
    return (time.perf_counter() - wall) / repeat, (time.process_time() - cpu) / repeat


def run_rounds(
    steps: dict[str, Step],
    micro_batches: int,
    warmup: int,
    repeat: int,
    rounds: int,
    budget: float | None,
    estimate: dict[str, float] | None = None,
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
                estimate[name] = timed(step, 1, 1)[0]
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
            seconds, cpu_seconds = timed(steps[name], micro_batches, repeat)
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
    times, cpu_times = run_rounds(
        steps, accumulation, args.warmup, args.repeat, args.rounds, budget, estimate
    )
    per_micro = {name: statistics.median(values) / accumulation for name, values in times.items()}
    cache[key] = (steps, flat, logits_change, per_micro)
    seconds = time.perf_counter() - began
    profile = profile_steps(steps, accumulation) if args.profile else None
    record: dict[str, Any] = {
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


def profile_steps(steps: dict[str, Step], micro_batches: int, count: int = 3) -> dict[str, Any]:
    """Self CPU time per aten op over ``count`` lora and flat steps, and flat's excess."""
    from torch.profiler import ProfilerActivity, profile

    per_method: dict[str, dict[str, tuple[int, float]]] = {}
    wall: dict[str, float] = {}
    for name in ("lora", "flat"):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            began = time.perf_counter()
            for _ in range(count):
                steps[name](micro_batches)
            wall[name] = (time.perf_counter() - began) / count
        per_method[name] = {
            event.key: (event.count // count, event.self_cpu_time_total / 1e3 / count)
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
    lines = [
        f"profiled wall per step (ms): lora {wall['lora']:.1f}, flat {wall['flat']:.1f}, "
        f"extra {wall['flat'] - wall['lora']:.1f}; aten self CPU summed over threads (ms): "
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
    return "\n".join(
        f"{'meets' if value <= limit else 'MISSES'}: {text} (measured {value:.3f})"
        for text, value, limit in checks
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=512, help="model width d")
    parser.add_argument(
        "--layers", type=int, default=None, help="transformer blocks (default 4; 2 with --sweep)"
    )
    parser.add_argument("--heads", type=int, default=8, help="attention heads")
    parser.add_argument("--vocab", type=int, default=2048, help="vocabulary size")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per micro-batch")
    parser.add_argument(
        "--accumulation", type=int, default=1, help="micro-batches per optimizer step"
    )
    parser.add_argument("--max-seq", type=int, default=256, help="sequence length cap")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--alpha", type=float, default=16, help="LoRA alpha")
    parser.add_argument("--sigma", type=float, default=0.05, help="noise scale σ")
    parser.add_argument("--rho", type=float, default=0.05, help="LoRA-SAM radius ρ")
    parser.add_argument(
        "--rounds", type=int, default=None, help="timed rounds (default 11; at most 7 in a sweep)"
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per method")
    parser.add_argument("--repeat", type=int, default=1, help="steps per timing")
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
    parser.add_argument("--smoke", action="store_true", help="tiny model, 2 rounds")
    parser.add_argument("--out", type=Path, default=None, help="JSON output")
    args = parser.parse_args(argv)

    if args.layers is None:
        args.layers = 2 if args.sweep else 4
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
        args.layers, args.heads, args.vocab = 2, 4, 256
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

    print(
        f"\nGPT decoder, {args.heads} heads, vocab {args.vocab}, LoRA r={args.rank} on the block "
        f"linears, sigma={args.sigma}, rho={args.rho}, {torch.get_num_threads()} threads; "
        f"wall-clock medians\n"
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
        "command": "python benchmarks/overhead.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "config": {
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
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
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
