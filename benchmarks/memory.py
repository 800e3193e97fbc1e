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
The children run one intra-op thread (``--threads``). Each child runs ``--repeat`` times (3 by
default) in interleaved order and the median is reported, since RSS is noisy.

With ``--device cuda`` everything runs in this one process, on the GPU reference configuration
unless flags override it: bf16 weights (``--dtype``), d = 1024, 24 layers, 16 heads, 4096 tokens
per step as 4 sequences of 1024. The model is built once; each method in turn (rotating order,
``--repeat`` times, 2 by default) gets a fresh AdamW, one warm-up step (which allocates the
optimizer state and flatopt's persistent state), then ``torch.cuda.synchronize`` and
``torch.cuda.reset_peak_memory_stats``; its peak is ``torch.cuda.max_memory_allocated`` over
``--steps`` steps minus the memory allocated before them. The caching allocator counts exactly
what is allocated, so the extra peak over plain LoRA is exact, in the same process.

Reported per method: the memory after building the model, the peak of the two steps, and the
extra peak over plain LoRA, in MiB and in units of the largest target weight's bytes (the
target, docs/performance.md: at most 1.0). For FlatPerturb, its persistent state: the bytes of
every tensor the wrapper keeps between steps (the per-row noise std of each target, until the
step ends) and of its generators' states. Seeds and the step counter are
Python ints.

Run, on the GPU, and smoke test (tiny model; lora, flat and copy once each, concurrently;
seconds):

    python benchmarks/memory.py
    python benchmarks/memory.py --device cuda --out benchmarks/results/gpu/memory.json
    python benchmarks/memory.py --smoke --out /tmp/memory_smoke.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

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
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# The GPU reference configuration (docs/performance.md): what --device cuda defaults to.
GPU_DEFAULTS = {
    "width": 1024,
    "layers": 24,
    "heads": 16,
    "tokens": 4096,
    "max_seq": 1024,
    "dtype": "bf16",
    "repeat": 2,
}
CPU_DEFAULTS = {
    "width": 512,
    "layers": 4,
    "heads": 8,
    "tokens": 2048,
    "max_seq": 256,
    "dtype": "fp32",
    "repeat": 3,
}


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

    Walks the wrapper and every flatopt object it reaches (attributes and slots, and the lists,
    tuples, sets and dicts among them); every tensor found is counted once, except the model's
    own parameters and buffers, and so is the state of every ``torch.Generator``. The wrapped
    optimizer (and its state) is not flatopt's and is skipped.
    """
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen_storage: set[int] = set()
    seen_objects: set[int] = set()
    found: dict[str, int] = {}
    generators = [0]

    def fields(value: Any) -> list[tuple[str, Any]]:
        items = list(getattr(value, "__dict__", {}).items())
        for klass in type(value).__mro__:
            for name in getattr(klass, "__slots__", ()):
                if hasattr(value, name):
                    items.append((name, getattr(value, name)))
        return items

    def visit(value: Any, where: str, depth: int) -> None:
        if depth > 8 or id(value) in seen_objects:
            return
        if isinstance(value, Tensor):
            ptr = value.untyped_storage().data_ptr()
            if ptr not in own and ptr not in seen_storage:
                seen_storage.add(ptr)
                found[where] = found.get(where, 0) + value.untyped_storage().nbytes()
            return
        seen_objects.add(id(value))
        if isinstance(value, torch.Generator):
            generators[0] += value.get_state().numel()
        elif isinstance(value, (list, tuple, set, frozenset)):
            for item in value:
                visit(item, where, depth + 1)
        elif isinstance(value, dict):
            for item in value.values():
                visit(item, where, depth + 1)
        elif isinstance(value, flatopt.FlatPerturb) or (
            type(value).__module__.startswith("flatopt")
            and not isinstance(value, (nn.Module, torch.optim.Optimizer))
        ):
            for name, item in fields(value):
                if not isinstance(item, torch.optim.Optimizer):
                    visit(item, f"{type(value).__name__}.{name}", depth + 1)

    visit(opt, "FlatPerturb", 0)
    tensors = sum(found.values())
    return {
        "tensor_bytes": found,
        "tensors_total_bytes": tensors,
        "generator_state_bytes": generators[0],
        "total_bytes": tensors + generators[0],
        "seeds": "Python ints (the root seed, the step and draw counters)",
    }


def build(args: argparse.Namespace) -> tuple[nn.Module, Tensor, Tensor]:
    """The LoRA decoder on ``args.device`` in ``args.dtype``, and one batch of tokens."""
    torch.manual_seed(args.seed)
    seq = min(args.max_seq, args.tokens)
    model = TinyGPT(args.vocab, args.width, args.layers, args.heads, max_seq=seq)
    add_lora(model, BLOCK_LINEARS, rank=args.rank, alpha=args.alpha)
    model.to(args.device, DTYPES[args.dtype])
    data = torch.randint(args.vocab, (args.tokens // seq, seq + 1)).to(args.device)
    return model, data[:, :-1], data[:, 1:]


def make_method(
    args: argparse.Namespace, name: str, model: nn.Module, inputs: Tensor, labels: Tensor
) -> tuple[Callable[[], None], Optional[flatopt.FlatPerturb]]:
    """One training step of method ``name`` with a fresh AdamW, and the FlatPerturb if any."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    inner = torch.optim.AdamW(trainable, lr=1e-4)

    def loss() -> Tensor:
        return F.cross_entropy(model(inputs).flatten(0, 1), labels.flatten())

    if name == "flat":
        opt = flatopt.FlatPerturb(inner, model, sigma=args.sigma, schedule="constant", seed=0)

        def flat_step() -> None:
            with opt.perturbed():
                loss().backward()
            opt.step()
            opt.zero_grad()

        return flat_step, opt
    method = {
        "lora": lambda: PlainLoRA(inner),
        "inplace": lambda: InPlace(inner, model, args.sigma, 0),
        "sam": lambda: LoRASAM(inner, rho=0.05),
        "copy": lambda: CopyRestore(inner, model, args.sigma, 0),
    }[name]()
    return lambda: method.step([loss]), None


def target_sizes(model: nn.Module) -> dict[str, int]:
    weights = [target.weight for _, target in find_targets(model)]
    return {
        "largest_target_bytes": max(w.numel() * w.element_size() for w in weights),
        "target_bytes": sum(w.numel() * w.element_size() for w in weights),
        "num_targets": len(weights),
    }


def child(args: argparse.Namespace) -> dict[str, Any]:
    """Build the model, run two steps of ``args.child``, report memory (in this process)."""
    torch.set_num_threads(args.threads)
    model, inputs, labels = build(args)
    step, opt = make_method(args, args.child, model, inputs, labels)
    built = {"rss": rss_now(), "peak_rss": rss_peak()}
    for _ in range(args.steps):
        step()
    result: dict[str, Any] = {
        "method": args.child,
        "built": built,
        "peak_rss": rss_peak(),
        "rss_after": rss_now(),
        **target_sizes(model),
    }
    if opt is not None:
        result["persistent"] = persistent_state(opt, model)
    return result


def cuda_runs(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """Every method ``args.repeat`` times in this process, on the GPU, in rotating order.

    Each run: a fresh AdamW, one warm-up step, then the peak allocated over ``args.steps``
    steps, from ``torch.cuda.reset_peak_memory_stats`` on, relative to what was allocated
    before them (the model, the data, the optimizer state, flatopt's persistent state).
    """
    device = torch.device(args.device)
    model, inputs, labels = build(args)
    sizes = target_sizes(model)
    methods = ("lora", "flat", "copy") if args.smoke else METHODS
    runs: dict[str, list[dict[str, Any]]] = {method: [] for method in methods}
    for index in range(args.repeat):
        order = methods[index % len(methods) :] + methods[: index % len(methods)]
        for method in order:
            step, opt = make_method(args, method, model, inputs, labels)
            step()  # allocates the optimizer state (and flatopt's std and norm caches)
            gc.collect()
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            for _ in range(args.steps):
                step()
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device)
            result: dict[str, Any] = {
                "method": method,
                "built": {"cuda_allocated": before},
                "cuda_peak_allocated": peak,
                "cuda_step_peak": peak - before,
                **sizes,
            }
            if opt is not None:
                result["persistent"] = persistent_state(opt, model)
                flatopt.remove_hooks(model)  # the next method trains the plain model
            runs[method].append(result)
            del step, opt
            gc.collect()
            print(
                f"  run {index + 1}/{args.repeat} {method}: step peak "
                f"{result['cuda_step_peak'] / MIB:.1f} MiB over {before / MIB:.1f} MiB",
                file=sys.stderr,
                flush=True,
            )
    return runs


def child_command(args: argparse.Namespace, method: str) -> list[str]:
    options = [
        f"--{name}={getattr(args, name.replace('-', '_'))}"
        for name in ("width", "layers", "heads", "vocab", "tokens", "max-seq", "rank", "alpha")
    ]
    options += [f"--sigma={args.sigma}", f"--steps={args.steps}", f"--threads={args.threads}"]
    options += [f"--device={args.device}", f"--dtype={args.dtype}", f"--seed={args.seed}"]
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
    """Medians per method of the built and peak memory, and the extra peak over plain LoRA.

    ``key`` is ``peak_rss`` (fresh processes: the peaks compare as they are) or
    ``cuda_step_peak`` (one process: the peak of the steps over what was allocated before).
    """
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
    peak = "peak of the steps over that" if clock == "CUDA allocated" else "peak"
    start = "before the steps" if clock == "CUDA allocated" else "after build"
    rows = [
        f"| method | {start} ({clock}, MiB) | {peak} (MiB) | extra peak over LoRA (MiB) "
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
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="cpu (RSS) or cuda (allocated)"
    )
    parser.add_argument(
        "--dtype", choices=tuple(DTYPES), default=None, help="weights (default fp32; cuda: bf16)"
    )
    parser.add_argument("--width", type=int, default=None, help="model width d (512; cuda 1024)")
    parser.add_argument("--layers", type=int, default=None, help="transformer blocks (4; cuda 24)")
    parser.add_argument("--heads", type=int, default=None, help="attention heads (8; cuda 16)")
    parser.add_argument("--vocab", type=int, default=2048, help="vocabulary size")
    parser.add_argument(
        "--tokens", type=int, default=None, help="tokens per step (2048; cuda 4096)"
    )
    parser.add_argument(
        "--max-seq", type=int, default=None, help="sequence length cap (256; cuda 1024)"
    )
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--alpha", type=float, default=16, help="LoRA alpha")
    parser.add_argument("--sigma", type=float, default=0.05, help="noise scale σ")
    parser.add_argument("--steps", type=int, default=2, help="training steps per child")
    parser.add_argument(
        "--repeat", type=int, default=None, help="runs of each method, median (3; cuda 2)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each child")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model and data")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="tiny model, one run per child")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/memory.json"))
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    for name, value in (GPU_DEFAULTS if cuda else CPU_DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.child is not None:
        print(json.dumps(child(args)))
        return 0
    if args.smoke:
        args.width, args.layers, args.heads, args.vocab = 64, 2, 4, 256
        args.tokens, args.max_seq, args.repeat = 256, 256, 1
    if cuda and not torch.cuda.is_available():
        parser.error(
            "--device cuda, but torch.cuda.is_available() is False: run it on a machine with a "
            "CUDA GPU and a CUDA build of torch"
        )
    if min(args.repeat, args.steps) < 1:
        parser.error("--repeat and --steps must be >= 1")

    load_before = os.getloadavg()
    began = time.perf_counter()
    runs = cuda_runs(args) if cuda else run_children(args)
    seconds = time.perf_counter() - began
    first = runs["flat"][0]
    largest, targets = first["largest_target_bytes"], first["target_bytes"]
    persistent = first["persistent"]
    tables = {"cuda": summarise(runs, "cuda_step_peak")} if cuda else {}
    if not cuda:
        tables["rss"] = summarise(runs, "peak_rss")

    where = (
        f"{torch.cuda.get_device_name()}, {args.dtype}; median of {args.repeat} runs per "
        "method in one process"
        if cuda
        else f"{args.dtype}; median of {args.repeat} fresh processes per method, "
        f"{args.threads} thread(s)"
    )
    print(
        f"\nGPT decoder d={args.width}, {args.layers} layers, {args.tokens} tokens, LoRA "
        f"r={args.rank} on {first['num_targets']} block linears; target weights "
        f"{targets / MIB:.1f} MiB, the largest {largest / MIB:.2f} MiB; {where}\n"
    )
    for clock, table in tables.items():
        print(markdown(table, "RSS" if clock == "rss" else "CUDA allocated") + "\n")
    if cuda:
        extra = tables["cuda"]["flat"]["extra_in_largest_targets"]
        verdict = "meets" if extra <= 1.0 else "MISSES"
        print(f"{verdict}: GPU peak extra memory ≤ 1 largest target layer (measured {extra:.2f})")
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
            "dtype": args.dtype,
            "max_seq": args.max_seq,
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
            "malloc_mmap_threshold": None if cuda else 65536,
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
        "gpu": torch.cuda.get_device_name() if cuda else None,
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
