"""Aten ops, host reads and weight-sized temporaries that FlatPerturb adds per target.

No timing: this counts what a perturbed step dispatches, on the CPU, with a
``torch.utils._python_dispatch.TorchDispatchMode`` that sees every aten op of the step (the
backward included; one torch thread, so every op runs in the thread that records it). Op
counts are what the GPU pays in kernel launches and host work per target, whatever the machine.

**Attribution.** A step is counted twice on the same model and inputs: once as FlatPerturb
(``perturb()``, forward + backward, ``restore()`` per micro-batch, then ``step()``) and once as
plain LoRA (forward + backward per micro-batch, then the inner AdamW step), each after warm-up
steps. FlatPerturb's cost is the difference, divided by the number of targets. Each step is
counted with accumulation 1 and ``--accumulation`` (4): the difference between the two
separates what flatopt pays once per optimizer step (the row norms of W') from what it pays
per micro-batch (W + ε for the forward, its regeneration for the backward):

    extra(a) = flat(a) − lora(a) = per_step + a · per_micro_batch

The ops dispatched from flatopt's own source files (the innermost frame of the Python stack that
lies in the ``flatopt`` package) are also counted apart, by op and by source line, so the
table says which line dispatches what; the two counts agree when flatopt changes nothing else in
the step.

**Host reads.** ``aten::_local_scalar_dense`` (what ``.item()``, ``float(t)``, ``bool(t)``
dispatch), ``aten::item``, ``aten::is_nonzero``, ``aten::equal`` and the ops whose output
size depends on values (``nonzero``, ``masked_select``, ``unique``...): on a GPU each one
waits for the device. Target: 0 on the armed path. Each one found is listed with its Python
stack.

**Weight-sized temporaries.** Every tensor an op allocates (a new storage, not a view or an
in-place result) with at least as many elements as the smallest target weight is followed
with a weak reference until it is freed. Reported: how many flatopt's own ops allocate per
target per micro-batch and per step, and the most alive at one time (a layer's W + ε, the row
norms' W' of a small weight, ...). Target: at most 3 alive at once.

Configurations (``--configs``; LoRA rank 8, alpha 16, σ = 0.05, schedule "constant"):

- ``linear``: 4 × (``flatopt.lora.add_lora`` on ``Linear(256, 256)`` + GELU), 64 rows of
  input that require grad (so every target's W + ε is saved and regenerated); fp32 and bf16.
  At 65,536 elements a weight is one CPU draw block and takes the dense row norms, on any
  device. ``linear_auto`` is the same in ``auto=True`` mode.
- ``linear512``: the same with ``Linear(512, 512)``: the row-norm identity, and 4 draw blocks
  on the CPU; ``/cuda-draw`` replaces ``flatopt.noise.blocks`` by one block per tensor, which
  is what a CUDA device draws (the op sequence of the GPU; the bits do not matter here).
- ``gpt``: the GPU reference decoder scaled down (``_models.TinyGPT``, bf16, d = 512, 2
  layers, 8 heads, vocab 512, 256 tokens as 2 sequences of 128, LoRA on q, k, v, o, fc1,
  fc2): every weight takes the identity path, as at d = 1024. The first block's q, k and v
  read an input that needs no grad, so autograd saves nothing of their W + ε and they draw
  once per micro-batch instead of twice; the per-target figures average over that.

Run it from the repository root (about a minute on 2 CPU cores):

    python benchmarks/ops_per_step.py       # writes benchmarks/results/ops_per_step.json
    python benchmarks/ops_per_step.py --configs linear --out /tmp/ops.json
    PYTHONPATH=/path/to/other/checkout python benchmarks/ops_per_step.py --out /tmp/other.json

The JSON records which flatopt was imported (its file and git commit). Smoke test (seconds;
never writes under ``benchmarks/results/``):

    python benchmarks/ops_per_step.py --smoke --out /tmp/ops_smoke.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import warnings
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from _models import BLOCK_LINEARS, TinyGPT
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import flatopt
from flatopt.lora import LoRALinear, add_lora

RESULTS = Path(__file__).resolve().parent / "results"
PACKAGE = str(Path(flatopt.__file__).resolve().parent) + os.sep
TORCH = str(Path(torch.__file__).resolve().parent) + os.sep
_FOREIGN_TORCH = tuple(TORCH + part + os.sep for part in ("optim", os.path.join("nn", "modules")))
_MODEL_CODE = os.sep + "lora.py"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# What makes the host wait for the device: reads of a value, and ops whose output size is one.
HOST_READS = frozenset(
    {
        "aten::_local_scalar_dense",
        "aten::item",
        "aten::is_nonzero",
        "aten::equal",
        "aten::nonzero",
        "aten::nonzero_static",
        "aten::masked_select",
        "aten::unique_consecutive",
        "aten::_unique",
        "aten::_unique2",
        "aten::unique_dim",
    }
)
# Ops that only make a tensor's metadata (a view, an allocation): host work, but no kernel.
NO_KERNEL = frozenset(
    "aten::" + name
    for name in [
        "empty",
        "alias",
        "as_strided",
        "detach",
        "expand",
        "permute",
        "reshape",
        "_reshape_alias",
        "select",
        "slice",
        "split",
        "squeeze",
        "t",
        "transpose",
        "unsqueeze",
        "view",
        "_unsafe_view",
        "unbind",
        "narrow",
        "chunk",
    ]
)
TARGETS = {"ops_per_target_per_micro_batch": 12, "host_reads": 0, "weight_sized_alive": 3}
KINDS = ("linear", "linear_auto", "linear512", "gpt")


# -- recording ------------------------------------------------------------------------------


def _flatopt_frame() -> str | None:
    """``file:line (function)`` of the flatopt frame that dispatched the op being dispatched.

    From the innermost frame outwards, torch's own frames are passed through (``Tensor``
    methods, ``torch.autograd.Function.apply``, the compile wrappers). The first other frame
    decides: one in the flatopt package dispatched the op, except the reference LoRA layer
    (``flatopt/lora.py``: model code); a frame of ``torch.optim`` or ``torch.nn.modules`` (the
    inner optimizer, a layer's own forward) or of any other file did, and the op is not
    flatopt's. Ops that autograd runs in C++ have the caller of ``backward()`` as their
    innermost frame; those dispatched from flatopt's saved-tensor hooks have the hook.
    """
    frame = sys._getframe(2)
    while frame is not None:
        filename = frame.f_code.co_filename
        if filename.startswith(PACKAGE):
            if filename.endswith(_MODEL_CODE):
                return None
            where = f"{filename[len(PACKAGE) :]}:{frame.f_lineno}"
            return f"{where} ({frame.f_code.co_name})"
        if not filename.startswith(TORCH) or filename.startswith(_FOREIGN_TORCH):
            return None
        frame = frame.f_back
    return None


def _short_stack(limit: int = 12) -> list[str]:
    """The Python stack of the op being dispatched, innermost last, without this file."""
    frames = []
    frame = sys._getframe(2)
    while frame is not None and len(frames) < limit:
        code = frame.f_code
        if code.co_filename != __file__:
            frames.append(f"{code.co_filename}:{frame.f_lineno} in {code.co_name}")
        frame = frame.f_back
    return frames[::-1]


class Recorder(TorchDispatchMode):
    """Counts the aten ops of a stretch of code, by op, by phase and by flatopt source line,
    lists the host reads, and follows the weight-sized tensors it allocates."""

    def __init__(self, threshold: int, attribute: bool = True):
        super().__init__()
        self.threshold = threshold
        self.attribute = attribute
        self.phase = "other"
        self.ops: Counter[str] = Counter()
        self.by_phase: Counter[str] = Counter()
        self.flatopt_ops: Counter[str] = Counter()
        self.flatopt_lines: Counter[str] = Counter()
        self.host_reads: list[dict[str, Any]] = []
        self.allocated = 0  # weight-sized tensors allocated, by any op
        self.flatopt_allocated = 0  # by ops dispatched from flatopt's files
        self.alive: set[int] = set()
        self.flatopt_alive: set[int] = set()
        self.max_alive = 0
        self.max_flatopt_alive = 0
        self.flatopt_allocations: Counter[str] = Counter()
        self._next = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        name = func._schema.name
        self.ops[name] += 1
        self.by_phase[self.phase] += 1
        where = _flatopt_frame() if self.attribute else None
        if where is not None:
            self.flatopt_ops[name] += 1
            self.flatopt_lines[f"{name} @ {where}"] += 1
        if name in HOST_READS:
            self.host_reads.append(
                {"op": name, "phase": self.phase, "flatopt_line": where, "stack": _short_stack()}
            )
        out = func(*args, **kwargs)
        self._follow(out, (args, kwargs), name, where)
        return out

    def _follow(self, out: Any, inputs: Any, name: str, where: str | None) -> None:
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]
        big = [t for t in outputs if t.numel() >= self.threshold]
        if not big:
            return
        seen = {_storage(t) for t in tree_flatten(inputs)[0] if isinstance(t, Tensor)}
        for tensor in big:
            base = tensor if tensor._base is None else tensor._base
            storage = _storage(base)
            if storage in seen:
                continue  # a view, an in-place op or an out= argument: nothing new
            seen.add(storage)
            key, self._next = self._next, self._next + 1
            self.allocated += 1
            self.alive.add(key)
            if where is not None:
                self.flatopt_allocated += 1
                self.flatopt_alive.add(key)
                self.flatopt_allocations[f"{name} @ {where}"] += 1
            weakref.finalize(base, self._freed, key)
            self.max_alive = max(self.max_alive, len(self.alive))
            self.max_flatopt_alive = max(self.max_flatopt_alive, len(self.flatopt_alive))

    def _freed(self, key: int) -> None:
        self.alive.discard(key)
        self.flatopt_alive.discard(key)

    @contextlib.contextmanager
    def in_phase(self, phase: str) -> Iterator[None]:
        previous, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = previous


def _storage(tensor: Tensor) -> tuple[str, int]:
    try:
        return (str(tensor.device), tensor.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # a tensor without storage
        return (str(tensor.device), id(tensor))


def _nullcontext(phase: str) -> contextlib.AbstractContextManager[None]:
    return contextlib.nullcontext()


# -- models ---------------------------------------------------------------------------------


class Setup:
    """One configuration: its micro-batches and the two steps to compare.

    Plain LoRA runs on a copy of the model taken before FlatPerturb is built (no hooks at all:
    an ``auto=True`` FlatPerturb would arm itself from any training forward of its model).
    """

    def __init__(
        self,
        model: nn.Module,
        batches: list[tuple[Tensor, ...]],
        loss: Callable[..., Tensor],
        auto: bool,
        description: str,
    ):
        self.lora_model = copy.deepcopy(model)
        self.model = model
        self.batches = batches
        self.loss = loss
        self.auto = auto
        self.description = description
        trainable = [p for p in model.parameters() if p.requires_grad]
        lora_trainable = [p for p in self.lora_model.parameters() if p.requires_grad]
        self.lora_optimizer = torch.optim.AdamW(lora_trainable, lr=1e-4)
        self.flat = flatopt.FlatPerturb(
            torch.optim.AdamW(trainable, lr=1e-4),
            model,
            sigma=0.05,
            schedule="constant",
            seed=0,
            resample="step",
            auto=auto,
        )
        self.weights = _target_weights(self.flat)

    def lora_step(self, micro_batches: int, phase: Callable[[str], Any] = _nullcontext) -> None:
        for batch in self.batches[:micro_batches]:
            with phase("forward"):
                loss = self.loss(self.lora_model, *batch) / micro_batches
            with phase("backward"):
                loss.backward()
        with phase("step"):
            self.lora_optimizer.step()
            self.lora_optimizer.zero_grad()

    def flat_step(self, micro_batches: int, phase: Callable[[str], Any] = _nullcontext) -> None:
        flat = self.flat
        for batch in self.batches[:micro_batches]:
            if not self.auto:
                with phase("perturb"):
                    flat.perturb()
            with phase("forward"):
                loss = self.loss(self.model, *batch) / micro_batches
            with phase("backward"):
                loss.backward()
            if not self.auto:
                with phase("restore"):
                    flat.restore()
        with phase("step"):
            flat.step()
            flat.zero_grad()


def _target_weights(flat: flatopt.FlatPerturb) -> list[Tensor]:
    from flatopt.adapters import find_targets

    return [target.weight for _, target in find_targets(flat._state.model)]


def _random_b(model: nn.Module, generator: torch.Generator) -> None:
    """Give every LoRA B a nonzero value (a fresh B is zero): W' ≠ W, as after some training."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                value = torch.randn(module.lora_B.shape, generator=generator) * 0.01
                module.lora_B.copy_(value.to(module.lora_B.dtype))


def linear_setup(width: int, layers: int, rows: int, dtype: torch.dtype, auto: bool) -> Setup:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    modules: list[nn.Module] = []
    for _ in range(layers):
        modules += [nn.Linear(width, width), nn.GELU()]
    model = add_lora(nn.Sequential(*modules), [str(2 * i) for i in range(layers)], 8, 16)
    model.to(dtype)
    _random_b(model, generator)
    batches = []
    for _ in range(4):
        x = torch.randn(rows, width, generator=generator).to(dtype).requires_grad_(True)
        batches.append((x,))

    def loss(model: nn.Module, x: Tensor) -> Tensor:
        return model(x).float().square().mean()

    description = (
        f"{layers} × LoRA Linear({width}, {width}) + GELU, {rows} input rows that require grad"
    )
    return Setup(model, batches, loss, auto, description)


def gpt_setup(
    width: int, layers: int, heads: int, tokens: int, seq: int, vocab: int, dtype: torch.dtype
) -> Setup:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = TinyGPT(vocab, width, layers, heads, max_seq=seq)
    add_lora(model, BLOCK_LINEARS, rank=8, alpha=16)
    model.to(dtype)
    _random_b(model, generator)
    batches = []
    for _ in range(4):
        data = torch.randint(vocab, (tokens // seq, seq + 1), generator=generator)
        batches.append((data[:, :-1], data[:, 1:]))

    def loss(model: nn.Module, inputs: Tensor, labels: Tensor) -> Tensor:
        logits = model(inputs).float()
        return nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())

    description = (
        f"TinyGPT d={width}, {layers} layers, {heads} heads, vocab {vocab}, {tokens} tokens "
        f"({tokens // seq} × {seq}), LoRA on {', '.join(BLOCK_LINEARS)}"
    )
    return Setup(model, batches, loss, False, description)


@contextlib.contextmanager
def cuda_draw_layout(enabled: bool) -> Iterator[str]:
    """With ``enabled``, every CPU draw is one block, as on a CUDA device."""
    noise = flatopt.noise
    original = getattr(noise, "blocks", None)
    if not enabled:
        yield "cpu"
        return
    if original is None:
        yield "cpu (flatopt.noise.blocks not found: not replaced)"
        return

    def one_block(weight: Tensor) -> list[slice]:
        return [slice(0, weight.shape[0] if weight.ndim else 1)]

    noise.blocks = one_block
    try:
        yield "one block per tensor, as on CUDA (flatopt.noise.blocks replaced)"
    finally:
        noise.blocks = original


def make_setup(name: str, smoke: bool) -> tuple[Setup, str, bool]:
    """The setup of configuration ``name``, its dtype label and whether draws are CUDA-like."""
    base, _, layout = name.partition("/")
    kind, _, dtype_label = base.partition(":")
    dtype = DTYPES[dtype_label or "fp32"]
    if smoke:
        return linear_setup(64, 2, 16, dtype, kind.endswith("auto")), dtype_label, bool(layout)
    if kind in ("linear", "linear_auto"):
        setup = linear_setup(256, 4, 64, dtype, kind == "linear_auto")
    elif kind == "linear512":
        setup = linear_setup(512, 4, 64, dtype, False)
    elif kind == "gpt":
        setup = gpt_setup(512, 2, 8, 256, 128, 512, dtype)
    else:
        raise SystemExit(f"unknown configuration {name!r}; the kinds are {KINDS}")
    return setup, dtype_label, bool(layout)


# -- one configuration ----------------------------------------------------------------------


def count(setup: Setup, method: str, micro_batches: int, threshold: int) -> Recorder:
    recorder = Recorder(threshold)
    step = setup.flat_step if method == "flat" else setup.lora_step
    with recorder:
        step(micro_batches, recorder.in_phase)
    return recorder


def _per(extra_1: float, extra_a: float, accumulation: int, targets: int) -> tuple[float, float]:
    """(per step, per micro-batch) per target from the extras at accumulation 1 and a."""
    per_micro = (extra_a - extra_1) / (accumulation - 1)
    return (extra_1 - per_micro) / targets, per_micro / targets


def _split_counters(
    flat1: Counter[str],
    flat_a: Counter[str],
    lora1: Counter[str] | None,
    lora_a: Counter[str] | None,
    accumulation: int,
    targets: int,
) -> dict[str, dict[str, float]]:
    keys = set(flat1) | set(flat_a) | set(lora1 or ()) | set(lora_a or ())
    table = {}
    for key in sorted(keys):
        e1 = flat1[key] - (lora1[key] if lora1 is not None else 0)
        ea = flat_a[key] - (lora_a[key] if lora_a is not None else 0)
        per_step, per_micro = _per(e1, ea, accumulation, targets)
        if per_step or per_micro:
            table[key] = {"per_step": round(per_step, 3), "per_micro_batch": round(per_micro, 3)}
    return dict(sorted(table.items(), key=lambda kv: -abs(kv[1]["per_micro_batch"])))


def run_config(name: str, args: argparse.Namespace) -> dict[str, Any]:
    setup, dtype_label, cuda_draw = make_setup(name, args.smoke)
    accumulation = args.accumulation
    with cuda_draw_layout(cuda_draw) as layout:
        warnings.filterwarnings("ignore", message=r".*ran outside perturb")
        for _ in range(args.warmup):
            setup.lora_step(accumulation)
            setup.flat_step(accumulation)
        weights = setup.weights
        threshold = min(w.numel() for w in weights)
        counts = {
            (method, a): count(setup, method, a, threshold)
            for method in ("lora", "flat")
            for a in (1, accumulation)
        }
    targets = len(weights)
    f1, fa = counts[("flat", 1)], counts[("flat", accumulation)]
    l1, la = counts[("lora", 1)], counts[("lora", accumulation)]

    def total(recorder: Recorder) -> int:  # aten ops only (not profiler:: record_function)
        return sum(n for op, n in recorder.ops.items() if op.startswith("aten::"))

    def kernels(recorder: Recorder) -> int:  # aten ops that launch work on a device
        return sum(
            n for op, n in recorder.ops.items() if op.startswith("aten::") and op not in NO_KERNEL
        )

    per_step, per_micro = _per(total(f1) - total(l1), total(fa) - total(la), accumulation, targets)
    kernel_step, kernel_micro = _per(
        kernels(f1) - kernels(l1), kernels(fa) - kernels(la), accumulation, targets
    )
    own_step, own_micro = _per(_aten(f1.flatopt_ops), _aten(fa.flatopt_ops), accumulation, targets)
    alloc_step, alloc_micro = _per(
        f1.flatopt_allocated, fa.flatopt_allocated, accumulation, targets
    )
    extra_alloc_step, extra_alloc_micro = _per(
        f1.allocated - l1.allocated, fa.allocated - la.allocated, accumulation, targets
    )
    reads_flat = [r for r in f1.host_reads + fa.host_reads]
    reads_lora = [r for r in l1.host_reads + la.host_reads]
    own_reads = [r for r in reads_flat if r["flatopt_line"] is not None]
    extra_reads = len(reads_flat) - len(reads_lora)
    shapes = Counter(str(tuple(w.shape)) for w in weights)
    normal_per_micro = _split_counters(
        f1.flatopt_ops, fa.flatopt_ops, None, None, accumulation, targets
    ).get("aten::normal_", {"per_micro_batch": 0.0})["per_micro_batch"]
    record = {
        "config": name,
        "description": setup.description,
        "dtype": dtype_label or "fp32",
        "mode": "auto" if setup.auto else "explicit",
        "draw_layout": layout,
        "targets": targets,
        "target_shapes": dict(shapes),
        "threshold_numel": threshold,
        "accumulation": [1, accumulation],
        "ops": {
            "flat": {"1": total(f1), str(accumulation): total(fa)},
            "lora": {"1": total(l1), str(accumulation): total(la)},
        },
        "ops_by_phase": {
            "flat": {str(a): dict(counts[("flat", a)].by_phase) for a in (1, accumulation)},
            "lora": {str(a): dict(counts[("lora", a)].by_phase) for a in (1, accumulation)},
        },
        "per_target": {
            "ops_per_micro_batch": round(per_micro, 3),
            "ops_per_step": round(per_step, 3),
            "kernel_ops_per_micro_batch": round(kernel_micro, 3),
            "kernel_ops_per_step": round(kernel_step, 3),
            "flatopt_ops_per_micro_batch": round(own_micro, 3),
            "flatopt_ops_per_step": round(own_step, 3),
            "normal_draws_per_micro_batch": normal_per_micro,
            "weight_sized_allocated_per_micro_batch": round(alloc_micro, 3),
            "weight_sized_allocated_per_step": round(alloc_step, 3),
            "extra_weight_sized_allocated_per_micro_batch": round(extra_alloc_micro, 3),
            "extra_weight_sized_allocated_per_step": round(extra_alloc_step, 3),
        },
        "host_reads": {
            "flat_minus_lora": extra_reads,
            "from_flatopt": len(own_reads),
            "flat_total": len(reads_flat),
            "lora_total": len(reads_lora),
            "by_flatopt": own_reads[:10],
            "not_in_lora": _unmatched(reads_flat, reads_lora)[:10],
        },
        "weight_sized_alive_max": {
            "flatopt": max(f1.max_flatopt_alive, fa.max_flatopt_alive),
            "flat_step_all_ops": max(f1.max_alive, fa.max_alive),
            "lora_step_all_ops": max(l1.max_alive, la.max_alive),
        },
        "ops_by_name_per_target": _split_counters(
            f1.ops, fa.ops, l1.ops, la.ops, accumulation, targets
        ),
        "flatopt_ops_by_line_per_target": _split_counters(
            f1.flatopt_lines, fa.flatopt_lines, None, None, accumulation, targets
        ),
        "flatopt_allocations_by_line_per_target": _split_counters(
            f1.flatopt_allocations, fa.flatopt_allocations, None, None, accumulation, targets
        ),
    }
    return record


def _aten(counter: Counter[str]) -> int:
    return sum(n for op, n in counter.items() if op.startswith("aten::"))


def _unmatched(flat: list[dict[str, Any]], lora: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The host reads of the flat steps beyond those the plain LoRA steps made (by op)."""
    left = Counter(r["op"] for r in lora)
    extra = []
    for read in flat:
        if left[read["op"]]:
            left[read["op"]] -= 1
        else:
            extra.append(read)
    return extra


# -- report ---------------------------------------------------------------------------------


def _verdict(value: float, target: float) -> str:
    return "ok" if value <= target else "MISS"


def table(records: list[dict[str, Any]]) -> str:
    lines = [
        "| config | dtype | targets | draws | ops / target / micro-batch | ops / target / step "
        "| of which launch a kernel (mb / step) | flatopt's own (mb / step) | host reads "
        "| weight-sized alloc / target / mb | max alive |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        t = r["per_target"]
        reads = max(r["host_reads"]["flat_minus_lora"], r["host_reads"]["from_flatopt"])
        alive = r["weight_sized_alive_max"]["flatopt"]
        draws = "cuda" if r["draw_layout"].startswith("one block") else "cpu"
        lines.append(
            f"| {r['config']} | {r['dtype']} | {r['targets']} | {draws} "
            f"| {t['ops_per_micro_batch']:.1f} | {t['ops_per_step']:.1f} "
            f"| {t['kernel_ops_per_micro_batch']:.1f} / {t['kernel_ops_per_step']:.1f} "
            f"| {t['flatopt_ops_per_micro_batch']:.1f} / {t['flatopt_ops_per_step']:.1f} "
            f"| {reads} | {t['weight_sized_allocated_per_micro_batch']:.1f} | {alive} |"
        )
    return "\n".join(lines)


def targets_check(records: list[dict[str, Any]]) -> list[str]:
    lines = []
    for r in records:
        t = r["per_target"]
        reads = max(r["host_reads"]["flat_minus_lora"], r["host_reads"]["from_flatopt"])
        alive = r["weight_sized_alive_max"]["flatopt"]
        checks = [
            f"ops/target/micro-batch ≤ {TARGETS['ops_per_target_per_micro_batch']}: "
            f"{_verdict(t['ops_per_micro_batch'], TARGETS['ops_per_target_per_micro_batch'])}",
            f"host reads = 0: {_verdict(reads, 0)}",
            f"alive ≤ {TARGETS['weight_sized_alive']}: "
            f"{_verdict(alive, TARGETS['weight_sized_alive'])}",
        ]
        lines.append(f"{r['config']} {r['dtype']}: " + "; ".join(checks))
    return lines


def top_lines(record: dict[str, Any], count: int = 12) -> str:
    rows = [
        f"  {v['per_micro_batch']:6.2f} /mb {v['per_step']:6.2f} /step  {line}"
        for line, v in list(record["flatopt_ops_by_line_per_target"].items())[:count]
    ]
    return "\n".join(rows)


def _flatopt_commit() -> dict[str, Any]:
    root = Path(flatopt.__file__).resolve().parent.parent
    info: dict[str, Any] = {"flatopt_file": flatopt.__file__}
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "flatopt"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        info["flatopt_commit"] = commit
        info["flatopt_uncommitted_changes"] = bool(dirty)
    except (OSError, subprocess.CalledProcessError):
        info["flatopt_commit"] = None
    return info


def output_path(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Path:
    """Where the JSON goes. A smoke run never writes into ``benchmarks/results``."""
    if args.out is None:
        if args.smoke:
            return Path(tempfile.gettempdir()) / "flatopt-ops-smoke" / "ops_per_step.json"
        return RESULTS / "ops_per_step.json"
    if args.smoke and RESULTS in args.out.resolve().parents:
        parser.error(
            f"--smoke would overwrite the committed results in {RESULTS}; pass "
            "--out /tmp/ops_smoke.json, or leave --out out (a temporary folder)."
        )
    return args.out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--configs",
        default=None,
        help="comma-separated configurations, each NAME[:fp32|bf16][/cuda-draw]; default: "
        "linear and linear512 in fp32 and bf16, their /cuda-draw forms, linear_auto, gpt:bf16 "
        "and gpt:bf16/cuda-draw",
    )
    parser.add_argument(
        "--accumulation", type=int, default=4, help="the second accumulation counted (4)"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before counting")
    parser.add_argument("--smoke", action="store_true", help="a tiny linear model, seconds")
    parser.add_argument("--out", type=Path, default=None, help="JSON output")
    args = parser.parse_args(argv)
    argv_used = sys.argv[1:] if argv is None else list(argv)
    if args.accumulation < 2 or args.warmup < 1:
        parser.error("--accumulation must be >= 2 and --warmup >= 1")
    out = output_path(args, parser)
    torch.set_num_threads(1)  # every op in this thread, where the dispatch mode sees it
    if args.configs is not None:
        names = [c.strip() for c in args.configs.split(",") if c.strip()]
    elif args.smoke:
        names = ["linear:fp32", "linear:bf16"]
    else:
        names = [
            "linear:fp32",
            "linear:bf16",
            "linear_auto:fp32",
            "linear512:fp32",
            "linear512:bf16",
            "linear512:fp32/cuda-draw",
            "linear512:bf16/cuda-draw",
            "gpt:bf16",
            "gpt:bf16/cuda-draw",
        ]
    if args.smoke:
        args.accumulation, args.warmup = 2, 1
    provenance = _flatopt_commit()
    print(
        f"flatopt from {provenance['flatopt_file']} (commit {provenance.get('flatopt_commit')}"
        f"{', uncommitted changes' if provenance.get('flatopt_uncommitted_changes') else ''})",
        file=sys.stderr,
    )
    records = []
    for name in names:
        print(f"-- {name}", file=sys.stderr, flush=True)
        records.append(run_config(name, args))
    print()
    print(table(records))
    print()
    for line in targets_check(records):
        print(line)
    for record in records:
        print(f"\n{record['config']} {record['dtype']}: flatopt's ops per target, by line")
        print(top_lines(record))
        for read in record["host_reads"]["by_flatopt"][:3]:
            print(f"  host read {read['op']} at {read['flatopt_line']}")
    report = {
        "benchmark": "ops_per_step",
        "command": "python benchmarks/ops_per_step.py " + " ".join(argv_used),
        **provenance,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "smoke": args.smoke,
        "warmup": args.warmup,
        "targets": TARGETS,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "configs": records,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
