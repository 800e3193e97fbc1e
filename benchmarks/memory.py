"""Peak memory of one training step per method, each in a fresh process.

The model is the reference configuration of ``overhead.py``: a GPT-style decoder, d = 512,
4 layers, LoRA (rank 8) on every linear layer of the blocks, 2048 tokens per step, AdamW.
Each method runs in its own subprocess, which builds the model, records its memory, runs two
training steps and records the peak:

- ``lora``: plain LoRA;
- ``flat``: ``flatopt.FlatPerturb`` (σ = 0.05, constant schedule, so the noise is on);
- ``inplace``: the official code's ``W.add_(ε)`` / ``W.sub_(ε)`` (inexact; ``_baselines``);
- ``sam``: LoRA-SAM, two passes, the ascent on A and B only (``_baselines``);
- ``copy``: exact but heavy: a kept copy of every target weight, noise added in place, the
  clean weights copied back after the backward (``_baselines.CopyRestore``).

On CPU the peak is ``resource.getrusage(RUSAGE_SELF).ru_maxrss``, with
``MALLOC_MMAP_THRESHOLD_=65536`` in the child's environment so that glibc serves every buffer
of 64 KiB or more with mmap and really returns it to the system when it is freed; otherwise a
freed buffer could be reused without showing in the RSS, or stay counted after it is freed.
With ``--device cuda`` the peak is ``torch.cuda.max_memory_allocated``. The children run one
intra-op thread (``--threads``). Each child runs ``--repeat`` times (3 by default) in
interleaved order and the median is reported, since RSS is noisy.

Reported per method: the memory after building the model, the peak of the two steps, and the
extra peak over plain LoRA, in MiB and in units of the largest target weight's bytes (the
target, docs/performance.md: at most 1.0). For FlatPerturb, its persistent state: the bytes of
every tensor the wrapper keeps between steps (the per-row noise std of each target, the cached
‖W_i‖² of each frozen weight) and of its generators' states. Seeds and the step counter are
Python ints.

Run, and smoke test (tiny model; lora, flat and copy once each, concurrently; seconds):

    python benchmarks/memory.py
    python benchmarks/memory.py --smoke --out /tmp/memory_smoke.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _baselines import CopyRestore, InPlace, LoRASAM, PlainLoRA
from _models import BLOCK_LINEARS, TinyGPT
from torch import Tensor, nn

import flatopt
from flatopt.adapters import find_targets
from flatopt.lora import add_lora

METHODS = ("lora", "flat", "inplace", "sam", "copy")
MIB = 2**20


def rss_now() -> int:
    """The current resident set size in bytes (Linux), or -1 where /proc is missing."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return -1


def rss_peak() -> int:
    """The peak resident set size in bytes: ru_maxrss is KiB on Linux, bytes on macOS."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def persistent_state(opt: flatopt.FlatPerturb, model: nn.Module) -> dict[str, Any]:
    """Bytes of the tensors FlatPerturb keeps between steps, and what they are.

    Every tensor held by the wrapper itself or by one of its sites (directly, or in a list,
    tuple or dict there) is counted once, except the model's own parameters and buffers; the
    wrapped optimizer's state is not flatopt's. The generators' states are counted too.
    """
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: set[int] = set()
    found: dict[str, int] = {}

    def visit(value: Any, where: str, depth: int = 0) -> None:
        if isinstance(value, Tensor):
            ptr = value.untyped_storage().data_ptr()
            if ptr not in own and ptr not in seen:
                seen.add(ptr)
                found[where] = found.get(where, 0) + value.untyped_storage().nbytes()
        elif depth < 3 and isinstance(value, (list, tuple)):
            for item in value:
                visit(item, where, depth + 1)
        elif depth < 3 and isinstance(value, dict):
            for item in value.values():
                visit(item, where, depth + 1)

    for name, value in vars(opt).items():
        if name not in ("optimizer", "_sites"):
            visit(value, f"opt.{name}")
    for site in getattr(opt, "_sites", []):
        for name, value in vars(site).items():
            visit(value, f"site.{name}")
    generators = 0
    for generator in getattr(getattr(opt, "_generators", None), "_by_device", {}).values():
        generators += generator.get_state().numel()
    tensors = sum(found.values())
    return {
        "tensor_bytes": found,
        "tensors_total_bytes": tensors,
        "generator_state_bytes": generators,
        "total_bytes": tensors + generators,
        "seeds": "Python ints (the root seed, the step and draw counters)",
    }


def child(args: argparse.Namespace) -> dict[str, Any]:
    """Build the model, run two steps of ``args.child``, report memory (in this process)."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(args.seed)
    seq = min(args.max_seq, args.tokens)
    model = TinyGPT(args.vocab, args.width, args.layers, args.heads, max_seq=seq)
    add_lora(model, BLOCK_LINEARS, rank=args.rank, alpha=args.alpha)
    model.to(device)
    data = torch.randint(args.vocab, (args.tokens // seq, seq + 1), device=device)
    inputs, labels = data[:, :-1], data[:, 1:]
    weights = [target.weight for _, target in find_targets(model)]
    trainable = [p for p in model.parameters() if p.requires_grad]
    inner = torch.optim.AdamW(trainable, lr=1e-4)

    def loss() -> Tensor:
        return F.cross_entropy(model(inputs).flatten(0, 1), labels.flatten())

    opt = None
    if args.child == "flat":
        opt = flatopt.FlatPerturb(inner, model, sigma=args.sigma, schedule="constant", seed=0)

        def step() -> None:
            with opt.perturbed():
                loss().backward()
            opt.step()
            opt.zero_grad()

    else:
        method = {
            "lora": lambda: PlainLoRA(inner),
            "inplace": lambda: InPlace(inner, model, args.sigma, 0),
            "sam": lambda: LoRASAM(inner, rho=0.05),
            "copy": lambda: CopyRestore(inner, model, args.sigma, 0),
        }[args.child]()

        def step() -> None:
            method.step([loss])

    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    built = {"rss": rss_now(), "peak_rss": rss_peak()}
    if cuda:
        built["cuda_allocated"] = torch.cuda.memory_allocated(device)
    for _ in range(args.steps):
        step()
    result: dict[str, Any] = {
        "method": args.child,
        "built": built,
        "peak_rss": rss_peak(),
        "rss_after": rss_now(),
        "largest_target_bytes": max(w.numel() * w.element_size() for w in weights),
        "target_bytes": sum(w.numel() * w.element_size() for w in weights),
        "num_targets": len(weights),
    }
    if cuda:
        torch.cuda.synchronize(device)
        result["cuda_peak_allocated"] = torch.cuda.max_memory_allocated(device)
    if opt is not None:
        result["persistent"] = persistent_state(opt, model)
    return result


def child_command(args: argparse.Namespace, method: str) -> list[str]:
    options = [
        f"--{name}={getattr(args, name.replace('-', '_'))}"
        for name in ("width", "layers", "heads", "vocab", "tokens", "max-seq", "rank", "alpha")
    ]
    options += [f"--sigma={args.sigma}", f"--steps={args.steps}", f"--threads={args.threads}"]
    options += [f"--device={args.device}", f"--seed={args.seed}"]
    return [sys.executable, __file__, "--child", method, *options]


def run_children(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """Every method ``args.repeat`` times, each in a fresh process, in rotating order."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    # The smoke run checks the code, not the figures: plain LoRA, FlatPerturb and the copy.
    methods = ("lora", "flat", "copy") if args.smoke else METHODS
    runs: dict[str, list[dict[str, Any]]] = {method: [] for method in methods}
    for index in range(args.repeat):
        order = methods[index % len(methods) :] + methods[: index % len(methods)]
        # The smoke run starts its children together.
        batch = [order] if args.smoke else [[method] for method in order]
        for group in batch:
            procs = [
                (m, subprocess.Popen(child_command(args, m), env=env, stdout=subprocess.PIPE))
                for m in group
            ]
            for method, proc in procs:
                out, _ = proc.communicate()
                if proc.returncode:
                    raise SystemExit(f"the {method} child failed (exit {proc.returncode})")
                runs[method].append(json.loads(out.decode().strip().splitlines()[-1]))
                print(
                    f"  run {index + 1}/{args.repeat} {method}: peak "
                    f"{runs[method][-1]['peak_rss'] / MIB:.1f} MiB",
                    file=sys.stderr,
                    flush=True,
                )
    return runs


def summarise(runs: dict[str, list[dict[str, Any]]], key: str) -> dict[str, dict[str, float]]:
    """Medians per method of the built and peak memory, and the extra peak over plain LoRA."""
    largest = runs["lora"][0]["largest_target_bytes"]
    built_key = "rss" if key == "peak_rss" else "cuda_allocated"
    table: dict[str, dict[str, float]] = {}
    for method, results in runs.items():
        table[method] = {
            "built_mib": statistics.median(r["built"][built_key] for r in results) / MIB,
            "peak_mib": statistics.median(r[key] for r in results) / MIB,
            "peaks_mib": [r[key] / MIB for r in results],
        }
    base = table["lora"]["peak_mib"]
    for row in table.values():
        row["extra_mib"] = row["peak_mib"] - base
        row["extra_in_largest_targets"] = row["extra_mib"] * MIB / largest
    return table


def markdown(table: dict[str, dict[str, float]], clock: str) -> str:
    rows = [
        f"| method | after build ({clock}, MiB) | peak (MiB) | extra peak over LoRA (MiB) "
        "| extra / largest target weight |",
        "|---|---:|---:|---:|---:|",
    ]
    for method, row in table.items():
        rows.append(
            f"| {method} | {row['built_mib']:.1f} | {row['peak_mib']:.1f} "
            f"| {row['extra_mib']:+.1f} | {row['extra_in_largest_targets']:+.2f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=512, help="model width d")
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks")
    parser.add_argument("--heads", type=int, default=8, help="attention heads")
    parser.add_argument("--vocab", type=int, default=2048, help="vocabulary size")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per step")
    parser.add_argument("--max-seq", type=int, default=256, help="sequence length cap")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--alpha", type=float, default=16, help="LoRA alpha")
    parser.add_argument("--sigma", type=float, default=0.05, help="noise scale σ")
    parser.add_argument("--steps", type=int, default=2, help="training steps per child")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each child (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each child")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda to read the CUDA peak")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model and data")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="tiny model, one run per child")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/memory.json"))
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args)))
        return 0
    if args.smoke:
        args.width, args.layers, args.heads, args.vocab = 64, 2, 4, 256
        args.tokens, args.repeat = 256, 1
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda, but torch.cuda.is_available() is False")

    load_before = os.getloadavg()
    began = time.perf_counter()
    runs = run_children(args)
    seconds = time.perf_counter() - began
    cuda = args.device.startswith("cuda")
    first = runs["flat"][0]
    largest, targets = first["largest_target_bytes"], first["target_bytes"]
    persistent = first["persistent"]
    tables = {"rss": summarise(runs, "peak_rss")}
    if cuda:
        tables["cuda"] = summarise(runs, "cuda_peak_allocated")

    print(
        f"\nGPT decoder d={args.width}, {args.layers} layers, {args.tokens} tokens, LoRA "
        f"r={args.rank} on {first['num_targets']} block linears; target weights "
        f"{targets / MIB:.1f} MiB, the largest {largest / MIB:.2f} MiB; median of "
        f"{args.repeat} fresh processes per method, {args.threads} thread(s)\n"
    )
    for clock, table in tables.items():
        print(markdown(table, "RSS" if clock == "rss" else "CUDA allocated") + "\n")
    print(
        f"FlatPerturb persistent state: {persistent['total_bytes']:,} bytes "
        f"({100 * persistent['total_bytes'] / targets:.3f}% of the target weights' bytes): "
        f"tensors {persistent['tensor_bytes']}, generator states "
        f"{persistent['generator_state_bytes']:,} bytes; seeds are Python ints"
    )
    print(f"load average before / after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f}")

    report = {
        "benchmark": "memory",
        "command": "python benchmarks/memory.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "config": {
            "width": args.width,
            "layers": args.layers,
            "heads": args.heads,
            "vocab": args.vocab,
            "tokens": args.tokens,
            "lora_rank": args.rank,
            "sigma": args.sigma,
            "steps": args.steps,
            "repeat": args.repeat,
            "threads": args.threads,
            "device": args.device,
            "malloc_mmap_threshold": 65536,
            "smoke": args.smoke,
        },
        "largest_target_bytes": largest,
        "target_bytes": targets,
        "persistent": persistent,
        "persistent_fraction_of_targets": persistent["total_bytes"] / targets,
        "tables": tables,
        "runs": runs,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": seconds,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
