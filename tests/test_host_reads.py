"""The armed path never reads a device value on the host.

A read of a tensor's value (``.item()``, ``float(t)``, ``bool(t)``, ``torch.equal``) makes a
GPU step wait for the device, and a step that waits once per target loses the overlap between
host and device. On every device, a ``TorchDispatchMode`` counts the ops that read a value
(``aten::_local_scalar_dense``, which ``.item()`` and friends dispatch, ``aten::item``,
``aten::is_nonzero``, ``aten::equal``) during whole perturbed steps: perturb, forward,
backward, restore and the inner optimizer's step, explicitly and with ``auto=True``. On CUDA,
``torch.cuda.set_sync_debug_mode("error")`` turns every synchronising call (a device-to-host
copy, a stream or device synchronisation) into an error over the same steps.

The inner optimizer is plain SGD, which reads nothing back itself. Each case first checks that
the forward really saw W + ε, so that a passing count is not a vacuous one.
"""

from __future__ import annotations

import sys

import pytest
import torch
from helpers import build
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import flatopt
from flatopt.lora import add_lora

HOST_READS = frozenset(
    {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal"}
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# reference LoRA, small (dense row norms, one draw block) and large (the row-norm identity,
# several CPU draw blocks); a user's conv LoRA; a trainable dense target next to a LoRA layer
KINDS = ("lora", "lora_large", "conv", "dense")
MODES = ("explicit", "auto")


class HostReads(TorchDispatchMode):
    """Records every op of ``HOST_READS`` dispatched inside it, with its Python stack."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func._schema.name
        if name in HOST_READS:
            self.reads.append((name, _stack()))
        return func(*args, **(kwargs or {}))

    def report(self) -> str:
        return "\n\n".join(f"{name} dispatched from:\n{stack}" for name, stack in self.reads)


def _stack(limit: int = 14) -> str:
    lines, frame = [], sys._getframe(2)
    while frame is not None and len(lines) < limit:
        code = frame.f_code
        lines.append(f"  {code.co_filename}:{frame.f_lineno} in {code.co_name}")
        frame = frame.f_back
    return "\n".join(reversed(lines))


def _case(kind: str, dtype: torch.dtype, device: str) -> tuple[nn.Module, Tensor, list]:
    """(model, input, adapters) of one kind, drawn on the CPU and moved to ``device``."""
    if kind == "lora":
        return build("lora", dtype, 12, 16, 2, seed=0, device=device)
    if kind == "lora_large":  # 320 × 256 weights: more than 65,536 elements
        return build("lora", dtype, 320, 256, 4, seed=0, device=device)
    if kind == "conv":
        return build("conv", dtype, 6, 16, 2, seed=0, device=device)
    if kind == "dense":
        g = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        model = add_lora(nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3)), ["2"], 2)
        model[0].requires_grad_(True)  # a trainable full-rank layer, perturbed as a target
        model = model.to(device, dtype)
        x = torch.randn(5, 16, generator=g).to(device, dtype)
        return model, x, [flatopt.dense(model[0])]
    raise ValueError(kind)


def _loss(output: Tensor) -> Tensor:
    return output.float().square().mean()


def _armed_steps(kind: str, dtype: torch.dtype, mode: str, device: str, during) -> None:
    """Two perturbed steps of ``kind`` inside the context ``during()``; asserts the forward
    inside them saw W + ε."""
    model, x, adapters = _case(kind, dtype, device)
    _loss(model(x)).backward()  # kernels and libraries warmed up before anything is counted
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        clean = model(x)
    inner = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    opt = flatopt.FlatPerturb(
        inner, model, sigma=0.1, schedule="constant", seed=3, adapters=adapters, auto=mode == "auto"
    )
    outputs = []
    with during():
        for _ in range(2):
            if mode == "explicit":
                opt.perturb()
            output = model(x)
            _loss(output).backward()
            if mode == "explicit":
                opt.restore()
            opt.step()
            opt.zero_grad()
            outputs.append(output.detach())
    assert not torch.equal(outputs[0], clean), "the forward did not see W + ε"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("kind", KINDS)
def test_armed_step_reads_no_device_value(kind, dtype, mode, device):
    counter = HostReads()
    _armed_steps(kind, dtype, mode, device, lambda: counter)
    assert not counter.reads, (
        f"{len(counter.reads)} host reads in two perturbed steps:\n{counter.report()}"
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_armed_step_never_synchronises(kind, mode, device):
    if device != "cuda":
        pytest.skip("torch.cuda.set_sync_debug_mode is CUDA's")

    class SyncErrors:
        def __enter__(self) -> None:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")

        def __exit__(self, *exc: object) -> None:
            torch.cuda.set_sync_debug_mode("default")

    _armed_steps(kind, torch.bfloat16, mode, device, SyncErrors)


def test_a_host_read_is_caught():
    """The counter sees ``.item()``, ``bool(t)`` and ``torch.equal`` (the test can fail)."""
    counter = HostReads()
    t = torch.ones(3)
    with counter:
        t.sum().item()
        bool(t[0] > 0)
        torch.equal(t, t)
    names = [name for name, _ in counter.reads]
    assert "aten::_local_scalar_dense" in names and "aten::equal" in names
    assert len(names) >= 3
