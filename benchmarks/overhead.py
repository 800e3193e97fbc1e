"""Per-step time of FlatPerturb against plain LoRA and the noise-drawing floor (DESIGN §7).

Model: a GPT-style decoder (``_models.TinyGPT``): token and position embeddings, pre-LN blocks
with causal self-attention (separate q, k, v, o ``nn.Linear``) and a 4x GELU MLP (fc1, fc2), a
final LayerNorm and an LM head. Defaults: width 512, 4 layers, 8 heads, vocab 2048, 2048 tokens
per step as 8 sequences of 256. LoRA (rank 8, alpha 16, ``flatopt.lora.add_lora``) goes on every
linear layer of the blocks (q, k, v, o, fc1, fc2). The LM head is left frozen and without LoRA,
as in the usual LoRA recipes for decoders (PEFT's ``target_modules``, the LoRA paper): it is
therefore not perturbed, and the floor counts the block weights only.

Three things are timed, in one process, in interleaved rounds (the order rotates each round),
after warm-up; the report uses the median over rounds:

- ``lora``: forward + cross-entropy + backward + AdamW step + zero_grad;
- ``flat``: the same with ``flatopt.FlatPerturb(AdamW, model, sigma=0.05,
  schedule="constant", seed=0)``: perturb() before the forward, restore() after the backward
  (constant, so the noise is on from the first step);
- ``rng``: t_rng, drawing 2 standard-normal tensors of every target weight's shape and dtype
  with a ``torch.Generator``: what the method must do per step at least (one draw for the
  forward, one regeneration for the backward).

The table gives the medians, flat/lora and (flat − lora)/t_rng; DESIGN §7 targets
(t_flat − t_lora) ≤ 1.10·t_rng. Wall-clock time (``time.perf_counter``) is the figure of merit;
the process-CPU row sums all threads (an intra-op worker spinning while the single-threaded
``normal_`` runs counts there) and shows whether other load on the machine disturbed a run.
Both optimizers train the same LoRA factors in turn (each has its own AdamW state), so the
model is identical for all methods. Before timing, the script checks that perturb() really
changes the logits.

t_rng draws for every target twice; flatopt itself regenerates W + ε in the backward only
where autograd saved it, so the first block's q, k and v (whose input needs no gradient) are
drawn once: 45 draws per step against 48 in the floor with the default 4 layers.

``--threads N`` sets ``torch.set_num_threads`` (default: torch's own choice); one thread is
steadier when other processes share the cores.

Run (full size, under a minute on 2 idle CPU cores):

    python benchmarks/overhead.py

Smoke test (tiny model, 2 rounds, a few seconds):

    python benchmarks/overhead.py --smoke --out /tmp/overhead_smoke.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from _models import BLOCK_LINEARS, TinyGPT
from torch import Tensor, nn

import flatopt
from flatopt.adapters import find_targets
from flatopt.lora import add_lora


def build_model(args: argparse.Namespace) -> tuple[nn.Module, Tensor, Tensor]:
    """The LoRA-adapted decoder and one fixed batch of (inputs, next-token labels)."""
    torch.manual_seed(args.seed)
    model = TinyGPT(args.vocab, args.width, args.layers, args.heads, max_seq=args.seq)
    add_lora(model, BLOCK_LINEARS, rank=args.rank, alpha=args.alpha)
    tokens = torch.randint(args.vocab, (args.batch, args.seq + 1))
    return model, tokens[:, :-1], tokens[:, 1:]


def make_steps(
    model: nn.Module, inputs: Tensor, labels: Tensor, sigma: float, seed: int
) -> tuple[dict[str, Callable[[], None]], flatopt.FlatPerturb]:
    """One zero-argument callable per method, each doing one full step."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    plain = torch.optim.AdamW(trainable, lr=1e-4)
    flat = flatopt.FlatPerturb(
        torch.optim.AdamW(trainable, lr=1e-4), model, sigma=sigma, schedule="constant", seed=seed
    )
    # The same weights FlatPerturb perturbs, found through the same adapters.
    weights = [target.weight for _, target in find_targets(model)]
    generator = torch.Generator()

    def loss() -> Tensor:
        logits = model(inputs)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten())

    def lora_step() -> None:
        loss().backward()
        plain.step()
        plain.zero_grad()

    def flat_step() -> None:
        flat.perturb()
        loss().backward()
        flat.restore()
        flat.step()
        flat.zero_grad()

    def rng_step() -> None:
        for weight in weights:
            for draw in range(2):
                generator.manual_seed(draw)
                z = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
                z.normal_(generator=generator)

    return {"lora": lora_step, "flat": flat_step, "rng": rng_step}, flat


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


def timed(step: Callable[[], None], repeat: int) -> tuple[float, float]:
    """Wall and process-CPU seconds per call of ``step``, over ``repeat`` back-to-back calls."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeat):
        step()
    return (time.perf_counter() - wall) / repeat, (time.process_time() - cpu) / repeat


def run_rounds(
    steps: dict[str, Callable[[], None]], rounds: int, warmup: int, repeat: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Warm up every method, then time them round-robin.

    Returns wall-clock and process-CPU seconds per step, one entry per round and method.
    """
    for _ in range(warmup):
        for step in steps.values():
            step()
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            seconds, cpu_seconds = timed(steps[name], repeat)
            wall[name].append(seconds)
            cpu[name].append(cpu_seconds)
        line = ", ".join(f"{name} {wall[name][-1]:.3f}s" for name in names)
        print(f"round {index + 1}/{rounds}: {line}", file=sys.stderr, flush=True)
    return wall, cpu


def summarise(times: dict[str, list[float]]) -> dict[str, float]:
    median = {name: statistics.median(values) for name, values in times.items()}
    paired = [f / lo for f, lo in zip(times["flat"], times["lora"])]
    paired_floor = [(f - lo) / r for f, lo, r in zip(times["flat"], times["lora"], times["rng"])]
    return {
        "t_lora": median["lora"],
        "t_flat": median["flat"],
        "t_rng": median["rng"],
        "flat_over_lora": median["flat"] / median["lora"],
        "overhead_over_rng": (median["flat"] - median["lora"]) / median["rng"],
        "flat_over_lora_paired_median": statistics.median(paired),
        "overhead_over_rng_paired_median": statistics.median(paired_floor),
    }


def markdown_table(summaries: dict[str, dict[str, float]]) -> str:
    rows = [
        "| clock (median) | t_lora (s) | t_flat (s) | t_rng (s) | flat / lora "
        "| (flat − lora) / t_rng |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for clock, summary in summaries.items():
        rows.append(
            f"| {clock} | {summary['t_lora']:.4f} | {summary['t_flat']:.4f} "
            f"| {summary['t_rng']:.4f} | {summary['flat_over_lora']:.3f} "
            f"| {summary['overhead_over_rng']:.2f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=512, help="model width d")
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks")
    parser.add_argument("--heads", type=int, default=8, help="attention heads")
    parser.add_argument("--vocab", type=int, default=2048, help="vocabulary size")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per step (batch x seq)")
    parser.add_argument("--max-seq", type=int, default=256, help="sequence length cap")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--alpha", type=float, default=16, help="LoRA alpha")
    parser.add_argument("--sigma", type=float, default=0.05, help="noise scale σ")
    parser.add_argument("--rounds", type=int, default=11, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per method")
    parser.add_argument("--repeat", type=int, default=1, help="steps per timing")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model, data, noise")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny model, 2 rounds")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/overhead.json"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.width, args.layers, args.heads, args.vocab = 64, 2, 4, 256
        args.tokens, args.rounds, args.warmup = 256, 2, 1
    args.seq = min(args.max_seq, args.tokens)
    if args.tokens % args.seq:
        parser.error(f"--tokens {args.tokens} is not a multiple of the sequence length {args.seq}")
    args.batch = args.tokens // args.seq
    if min(args.rounds, args.repeat) < 1 or args.warmup < 0:
        parser.error("--rounds and --repeat must be >= 1, --warmup >= 0")

    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)

    model, inputs, labels = build_model(args)
    steps, flat = make_steps(model, inputs, labels, args.sigma, args.seed)
    logits_change = check_noise_is_on(model, flat, inputs)
    target_numel = sum(rows * fan_in for _, (rows, fan_in) in flat.targets)
    load_before = os.getloadavg()
    began = time.perf_counter()
    times, cpu_times = run_rounds(steps, args.rounds, args.warmup, args.repeat)
    seconds = time.perf_counter() - began
    summary, cpu_summary = summarise(times), summarise(cpu_times)

    print(
        f"GPT decoder d={args.width}, {args.layers} layers, {args.heads} heads, "
        f"vocab {args.vocab}, {args.batch}x{args.seq} tokens, LoRA r={args.rank} on "
        f"{len(flat.targets)} block linears ({target_numel:,} weights), sigma={args.sigma}, "
        f"{torch.get_num_threads()} threads, median of {args.rounds} rounds\n"
    )
    print(markdown_table({"wall": summary, "process CPU": cpu_summary}))
    print(
        f"\nwall, medians of per-round ratios: flat / lora "
        f"{summary['flat_over_lora_paired_median']:.3f}, (flat − lora) / t_rng "
        f"{summary['overhead_over_rng_paired_median']:.2f}"
    )
    print(f"load average before / after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f}")

    report = {
        "benchmark": "overhead",
        "config": {
            "width": args.width,
            "layers": args.layers,
            "heads": args.heads,
            "vocab": args.vocab,
            "batch": args.batch,
            "seq": args.seq,
            "tokens": args.tokens,
            "lora_rank": args.rank,
            "lora_alpha": args.alpha,
            "lora_targets": list(BLOCK_LINEARS),
            "lm_head": "frozen, no LoRA, not perturbed (not counted in t_rng)",
            "num_targets": len(flat.targets),
            "perturbed_logits_relative_change": logits_change,
            "target_weights": target_numel,
            "sigma": args.sigma,
            "schedule": "constant",
            "optimizer": "AdamW(lr=1e-4)",
            "rounds": args.rounds,
            "warmup": args.warmup,
            "repeat": args.repeat,
            "seed": args.seed,
            "smoke": args.smoke,
        },
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "timed_seconds": seconds,
        "times": times,
        "cpu_times": cpu_times,
        "summary": summary,
        "cpu_summary": cpu_summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
