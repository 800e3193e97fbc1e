"""Where a GPU step's time goes: host work, kernels, launches and synchronisations, per method.

Needs a CUDA device (exit status 2 without one; ``--smoke`` then succeeds without doing
anything, so that CI on a CPU machine can run every benchmark). The model and the steps are
``overhead.py``'s (``build_model``, ``make_steps``), at the GPU reference configuration by
default: bf16, d = 1024, 24 layers, 16 heads, 4096 tokens per step as 4 sequences of 1024,
LoRA rank 8 on q, k, v, o, fc1, fc2, σ = 0.05, ρ = 0.05. Every flag overrides.

For each method (plain LoRA, FlatPerturb, the in-place method, LoRA-SAM, and the draws alone,
``rng``), after warm-up steps:

1. ``--steps`` steps timed between two CUDA events, without the profiler: the step's time;
2. the same number of steps under ``torch.profiler`` (CPU and CUDA activities), each step in
   a ``record_function`` range, and read back from the trace:

   - ``host_ms_per_step``: the host's time inside a step (Python, dispatch, launches);
   - ``kernel_ms_per_step``: the summed duration of the GPU kernels (memcpy and memset apart),
     ``gpu_busy_ms_per_step`` the union of their intervals and ``gpu_idle_ms_per_step`` the gaps
     between the first and the last kernel: where the GPU waits for the host;
   - ``launches_per_step``: ``cudaLaunchKernel``-type runtime calls;
   - ``syncs_per_step``: ``cudaStreamSynchronize``, ``cudaDeviceSynchronize`` and
     ``cudaEventSynchronize`` calls, ``memcpy_calls_per_step`` the ``cudaMemcpy*`` calls and
     ``dtoh_copies_per_step`` the device-to-host copies the GPU ran (each a host wait); only
     calls inside the steps count, not the profiler's closing synchronisation;
   - the kernels by name (the ``--top`` largest by time per step, with their counts).

Then, for FlatPerturb against plain LoRA, per target (the perturbed weights) and per step: the
extra host time, extra GPU idle time, extra launches and extra kernel time, and the kernels
that account for the extra kernel time. A step whose wall time far exceeds its kernel time is
bound by the host: the extra launches and the host time per target between them are what to
cut. The profiler itself slows the host, so the unprofiled step time is the figure of merit and
the profiled one says where the time goes.

    python benchmarks/gpu_profile.py --out benchmarks/results/gpu/gpu_profile.json
    python benchmarks/gpu_profile.py --tokens 16384 --out /tmp/gpu_profile_16k.json
    python benchmarks/gpu_profile.py --smoke --out /tmp/gpu_profile_smoke.json   # tiny, or a no-op
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import torch

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("lora", "flat", "inplace", "sam", "rng")
STEP_LABEL = "gpu_profile.step"
GPU_DEFAULTS = {
    "width": 1024,
    "layers": 24,
    "heads": 16,
    "tokens": 4096,
    "max_seq": 1024,
    "dtype": "bf16",
}
SMOKE = {"width": 64, "layers": 2, "heads": 4, "tokens": 256, "max_seq": 128, "vocab": 256}
LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "__cudaLaunchKernel", "cuLaunchKernel")
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


class Event(NamedTuple):
    """One event of the trace, in ns."""

    name: str
    cuda: bool  # ran on the GPU (a kernel, memcpy or memset); else a host-side event
    start: int
    duration: int
    annotation: bool  # a record_function range

    @property
    def end(self) -> int:
        return self.start + self.duration


def trace_events(prof: Any) -> list[Event]:
    """The events of a finished ``torch.profiler.profile``, from its kineto results."""
    cuda = torch.autograd.DeviceType.CUDA
    events = []
    for e in prof.profiler.kineto_results.events():
        events.append(
            Event(e.name(), e.device_type() == cuda, e.start_ns(), e.duration_ns(), _annot(e))
        )
    return events


def _annot(event: Any) -> bool:
    check = getattr(event, "is_user_annotation", None)
    return bool(check()) if check is not None else event.name() == STEP_LABEL


def _union(intervals: Iterable[tuple[int, int]]) -> int:
    total, current_start, current_end = 0, None, None
    for start, end in sorted(intervals):
        if current_end is None or start > current_end:
            if current_end is not None:
                total += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None:
        total += current_end - current_start
    return total


def analyse(events: list[Event], steps: int, top: int) -> dict[str, Any]:
    """Per-step figures of one method's trace (see the module docstring)."""
    windows = [
        (e.start, e.end) for e in events if not e.cuda and e.annotation and e.name == STEP_LABEL
    ]
    if not windows:
        raise RuntimeError(f"no {STEP_LABEL!r} range in the trace")

    def inside(event: Event) -> bool:
        return any(start <= event.start <= end for start, end in windows)

    host = [e for e in events if not e.cuda and inside(e)]
    # the GPU-side copy of a record_function range is no kernel
    device = [e for e in events if e.cuda and not e.annotation and e.name != STEP_LABEL]
    kernels = [e for e in device if not e.name.startswith(("Memcpy", "Memset"))]
    copies = [e for e in device if e.name.startswith("Memcpy")]
    by_name: dict[str, list[int]] = defaultdict(list)
    for kernel in kernels:
        by_name[kernel.name].append(kernel.duration)
    busy = _union((k.start, k.end) for k in kernels)
    span = (max(k.end for k in kernels) - min(k.start for k in kernels)) if kernels else 0
    ms = 1e-6 / steps
    table = sorted(by_name.items(), key=lambda item: -sum(item[1]))
    return {
        "host_ms_per_step": sum(end - start for start, end in windows) * ms,
        "kernel_ms_per_step": sum(k.duration for k in kernels) * ms,
        "gpu_busy_ms_per_step": busy * ms,
        "gpu_idle_ms_per_step": (span - busy) * ms,
        "kernels_per_step": len(kernels) / steps,
        "launches_per_step": sum(e.name.startswith(LAUNCHES) for e in host) / steps,
        "syncs_per_step": sum(e.name.startswith(SYNCS) for e in host) / steps,
        "syncs_by_name_per_step": {
            name: sum(e.name == name for e in host) / steps
            for name in sorted({e.name for e in host if e.name.startswith(SYNCS)})
        },
        "memcpy_calls_per_step": sum(e.name.startswith("cudaMemcpy") for e in host) / steps,
        "dtoh_copies_per_step": sum("DtoH" in e.name for e in copies) / steps,
        "kernels_by_name": {
            name: {"count_per_step": len(d) / steps, "ms_per_step": sum(d) * ms}
            for name, d in table[:top]
        },
        "_all_kernels": {name: (len(d), sum(d)) for name, d in table},
    }


def extra_over_lora(
    records: dict[str, dict[str, Any]], targets: int, steps: int, top: int
) -> dict[str, Any]:
    """FlatPerturb minus plain LoRA: per step and per target, and the kernels behind it."""
    flat, lora = records["flat"]["profile"], records["lora"]["profile"]
    per_target = {}
    for key, unit in (
        ("host_ms_per_step", "host_us"),
        ("gpu_idle_ms_per_step", "gpu_idle_us"),
        ("kernel_ms_per_step", "kernel_us"),
    ):
        per_target[f"{unit}_per_target_per_step"] = 1e3 * (flat[key] - lora[key]) / targets
    for key, name in (
        ("launches_per_step", "launches"),
        ("kernels_per_step", "kernels"),
        ("syncs_per_step", "syncs"),
        ("dtoh_copies_per_step", "dtoh_copies"),
    ):
        per_target[f"{name}_per_target_per_step"] = (flat[key] - lora[key]) / targets
    kernels = []
    names = set(flat["_all_kernels"]) | set(lora["_all_kernels"])
    for name in names:
        count_f, time_f = flat["_all_kernels"].get(name, (0, 0))
        count_l, time_l = lora["_all_kernels"].get(name, (0, 0))
        kernels.append(
            {
                "kernel": name,
                "extra_count_per_step": (count_f - count_l) / steps,
                "extra_ms_per_step": (time_f - time_l) * 1e-6 / steps,
            }
        )
    kernels.sort(key=lambda k: -k["extra_ms_per_step"])
    t_flat, t_lora = records["flat"]["event_ms_per_step"], records["lora"]["event_ms_per_step"]
    return {
        "flat_over_lora_unprofiled": t_flat / t_lora,
        "flat_minus_lora_ms_unprofiled": t_flat - t_lora,
        "per_target": per_target,
        "kernels_by_extra_time": kernels[:top],
    }


def profile_method(step: Any, micro_batches: int, steps: int) -> tuple[float, float, list[Event]]:
    """(CUDA-event ms per step unprofiled, wall ms per step profiled, the profiled trace)."""
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        step(micro_batches)
    end.record()
    torch.cuda.synchronize()
    event_ms = start.elapsed_time(end) / steps
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        began = time.perf_counter()
        for _ in range(steps):
            with record_function(STEP_LABEL):
                step(micro_batches)
        torch.cuda.synchronize()
        wall_ms = 1e3 * (time.perf_counter() - began) / steps
    return event_ms, wall_ms, trace_events(prof)


def table(records: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| method | step (ms) | profiled wall (ms) | host (ms) | kernels (ms) | GPU busy (ms) "
        "| GPU idle (ms) | kernels | launches | syncs | DtoH copies |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in records.items():
        p = r["profile"]
        lines.append(
            f"| {name} | {r['event_ms_per_step']:.1f} | {r['profiled_wall_ms_per_step']:.1f} "
            f"| {p['host_ms_per_step']:.1f} | {p['kernel_ms_per_step']:.1f} "
            f"| {p['gpu_busy_ms_per_step']:.1f} | {p['gpu_idle_ms_per_step']:.1f} "
            f"| {p['kernels_per_step']:.0f} | {p['launches_per_step']:.0f} "
            f"| {p['syncs_per_step']:.1f} | {p['dtoh_copies_per_step']:.1f} |"
        )
    return "\n".join(lines)


def output_path(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Path:
    """Where the JSON goes. A smoke run never writes into ``benchmarks/results``."""
    if args.out is None:
        if args.smoke:
            return Path(tempfile.gettempdir()) / "flatopt-gpu-profile-smoke" / "gpu_profile.json"
        return RESULTS / "gpu" / "gpu_profile.json"
    if args.smoke and RESULTS in args.out.resolve().parents:
        parser.error(
            f"--smoke would overwrite the committed results in {RESULTS}; pass "
            "--out /tmp/gpu_profile_smoke.json, or leave --out out (a temporary folder)."
        )
    return args.out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="(bf16)")
    parser.add_argument("--width", type=int, default=None, help="model width d (1024)")
    parser.add_argument("--layers", type=int, default=None, help="transformer blocks (24)")
    parser.add_argument("--heads", type=int, default=None, help="attention heads (16)")
    parser.add_argument("--vocab", type=int, default=2048, help="vocabulary size")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per micro-batch (4096)")
    parser.add_argument("--max-seq", type=int, default=None, help="sequence length cap (1024)")
    parser.add_argument("--accumulation", type=int, default=1, help="micro-batches per step")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--alpha", type=float, default=16, help="LoRA alpha")
    parser.add_argument("--sigma", type=float, default=0.05, help="noise scale σ")
    parser.add_argument("--rho", type=float, default=0.05, help="LoRA-SAM radius ρ")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model, data, noise")
    parser.add_argument("--steps", type=int, default=3, help="steps per method, each way")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per method")
    parser.add_argument("--top", type=int, default=15, help="kernels listed per method")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 1 step; no-op w/o CUDA")
    parser.add_argument("--out", type=Path, default=None, help="JSON output")
    args = parser.parse_args(argv)
    argv_used = sys.argv[1:] if argv is None else list(argv)
    out = output_path(args, parser)
    if not torch.cuda.is_available():
        message = (
            "gpu_profile.py: no CUDA device (torch.cuda.is_available() is False); it profiles "
            "GPU steps. Run it on a machine with an NVIDIA GPU and a CUDA build of torch."
        )
        print(message, file=sys.stderr)
        if args.smoke:
            print("--smoke: nothing to do without CUDA; exit 0.", file=sys.stderr)
            return 0
        return 2
    if min(args.steps, args.accumulation, args.top) < 1 or args.warmup < 0:
        parser.error("--steps, --accumulation and --top must be >= 1, --warmup >= 0")

    from overhead import build_model, make_steps

    for name, value in GPU_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.smoke:
        for name, value in SMOKE.items():
            setattr(args, name, value)
        args.steps, args.warmup = 1, 1
    args.device = "cuda"
    seq = min(args.max_seq, args.tokens)
    if args.width % args.heads or args.tokens % seq:
        parser.error("--width must divide by --heads, --tokens by the sequence length")
    model, batches = build_model(args, args.width, args.layers, args.tokens, args.accumulation)
    steps, flat = make_steps(model, batches, args.sigma, args.rho, args.seed)
    warnings.filterwarnings("ignore", message=r".*ran outside perturb")
    targets = len(flat.targets)
    print(
        f"{torch.cuda.get_device_name()}, {args.dtype}, d={args.width}, {args.layers} layers, "
        f"{args.tokens} tokens × {args.accumulation}: {targets} targets",
        file=sys.stderr,
        flush=True,
    )
    records: dict[str, dict[str, Any]] = {}
    for name in METHODS:
        step = steps[name]
        for _ in range(args.warmup):
            step(args.accumulation)
        event_ms, wall_ms, events = profile_method(step, args.accumulation, args.steps)
        records[name] = {
            "event_ms_per_step": event_ms,
            "profiled_wall_ms_per_step": wall_ms,
            "profile": analyse(events, args.steps, args.top),
        }
        print(f"  {name}: {event_ms:.1f} ms per step", file=sys.stderr, flush=True)
    extra = extra_over_lora(records, targets, args.steps, args.top)
    for record in records.values():
        del record["profile"]["_all_kernels"]
    print()
    print(table(records))
    t = extra["per_target"]
    print(
        f"\nFlatPerturb − LoRA, per target per step: host {t['host_us_per_target_per_step']:.0f} "
        f"µs, GPU idle {t['gpu_idle_us_per_target_per_step']:.0f} µs, kernels "
        f"{t['kernel_us_per_target_per_step']:.0f} µs, {t['launches_per_target_per_step']:.1f} "
        f"launches, {t['syncs_per_target_per_step']:.2f} syncs; flat / lora "
        f"{extra['flat_over_lora_unprofiled']:.2f} (unprofiled)"
    )
    print("\nkernels by extra time per step (FlatPerturb − LoRA):")
    for k in extra["kernels_by_extra_time"][:10]:
        print(
            f"  {k['extra_ms_per_step']:8.3f} ms {k['extra_count_per_step']:7.1f}×  "
            f"{k['kernel'][:90]}"
        )
    report = {
        "benchmark": "gpu_profile",
        "command": "python benchmarks/gpu_profile.py " + " ".join(argv_used),
        "config": {
            "dtype": args.dtype,
            "width": args.width,
            "layers": args.layers,
            "heads": args.heads,
            "vocab": args.vocab,
            "tokens": args.tokens,
            "seq": seq,
            "accumulation": args.accumulation,
            "lora_rank": args.rank,
            "sigma": args.sigma,
            "rho": args.rho,
            "steps": args.steps,
            "warmup": args.warmup,
            "smoke": args.smoke,
        },
        "targets": targets,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(),
        "python": platform.python_version(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "methods": records,
        "flat_minus_lora": extra,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
