"""Exactness: after restore() every parameter and buffer is bitwise what it was; W is never
written, and the perturbed weights do not outlive the forward."""

import weakref

import pytest
import torch
from helpers import (
    KINDS,
    assert_untouched,
    bits_equal,
    build,
    frozen_names,
    snapshot,
)
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.utils.checkpoint import checkpoint

import flatopt
from flatopt._arming import find_slot
from flatopt.adapters import find_targets
from flatopt.lora import LoRALinear, add_lora

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _top_hooks():
    return torch._C._autograd._top_saved_tensors_default_hooks(False)


def _wrap(model, adapters, sigma, seed, resample="step", lr=0.05):
    trainable = [p for p in model.parameters() if p.requires_grad]
    inner = torch.optim.SGD(trainable, lr=lr)
    return flatopt.FlatPerturb(
        inner,
        model,
        sigma=sigma,
        schedule="constant",
        seed=seed,
        adapters=adapters,
        resample=resample,
    )


@given(
    kind=st.sampled_from(KINDS),
    dtype=st.sampled_from(DTYPES),
    out=st.integers(1, 12),
    fan_in=st.integers(1, 12),
    rank=st.integers(1, 4),
    sigma=st.floats(0.0, 0.5),
    seed=st.integers(0, 2**63 - 1),
    steps=st.integers(1, 3),
    micro=st.integers(1, 2),
    resample=st.sampled_from(["step", "call"]),
)
def test_round_trip_is_bitwise_exact(
    kind, dtype, out, fan_in, rank, sigma, seed, steps, micro, resample, device
):
    model, x, adapters = build(kind, dtype, out, fan_in, rank, seed % 1000, device)
    frozen = frozen_names(model)
    start = snapshot(model)
    opt = _wrap(model, adapters, sigma, seed, resample)
    for _ in range(steps):
        before = snapshot(model)
        for _ in range(micro):  # gradient accumulation: several perturbed micro-batches
            opt.perturb()
            output = model(x)
            assert_untouched(model, before)  # state_dict is clean mid-step
            output.float().square().mean().backward()
            assert_untouched(model, before)
            opt.restore()
            assert_untouched(model, before)
        opt.step()
        opt.zero_grad()
    assert_untouched(model, start, frozen)
    assert _top_hooks() is None


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_weights_stay_what_they_were(dtype, device):
    model, x, _ = build("lora", dtype, 6, 5, 2, seed=0, device=device)
    base = model[0].base.weight
    with torch.no_grad():
        base[0, 0], base[1, 1], base[2, 2] = float("nan"), float("inf"), -0.0
    before = snapshot(model)
    opt = _wrap(model, [], sigma=0.1, seed=1)
    with opt.perturbed():
        model(x).float().sum().backward()
    assert_untouched(model, before)
    assert torch.isnan(base[0, 0]) and torch.isinf(base[1, 1])
    assert torch.signbit(base[2, 2])


class Boom(Exception):
    pass


def boom(*args):
    raise Boom


class Raising(nn.Module):
    def __init__(self, where):
        super().__init__()
        self.where = where

    def forward(self, x):
        if self.where == "forward":
            raise Boom
        if self.where == "backward":
            x.register_hook(boom)
        return x


@pytest.mark.parametrize("where", ["forward", "backward", "inside_target", "hook"])
def test_an_exception_leaves_nothing_perturbed(where, device):
    model, x, _ = build("lora", torch.float32, 6, 5, 2, seed=0, device=device)
    model.append(Raising(where))
    base = model[0].base
    if where == "hook":
        model[1].register_forward_hook(boom)
    if where == "inside_target":
        x = torch.randn(3, 7, device=device)  # a shape the target layer rejects in its forward
    before = snapshot(model)
    original = base.weight
    opt = _wrap(model, [], sigma=0.2, seed=3)
    with pytest.raises((Boom, RuntimeError)), opt.perturbed():
        model(x).sum().backward()
    assert not opt.is_perturbed
    assert base._parameters["weight"] is original  # the Parameter object itself is back
    assert not find_slot(base).swaps  # flatopt's hooks on the layer are inert again
    assert _top_hooks() is None
    assert_untouched(model, before)
    # The wrapper is still usable, and perturbs again.
    clean = model[0](torch.ones(2, 5, device=device))
    with opt.perturbed():
        noisy = model[0](torch.ones(2, 5, device=device))
        noisy.sum().backward()
    opt.step()
    assert not torch.equal(clean, noisy)
    assert_untouched(model, before, frozen_names(model))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch_dims", [(), (2, 3)])
def test_perturbed_weight_is_freed_after_forward(kind, dtype, batch_dims, device):
    model, x, adapters = build(kind, dtype, 16, 12, 4, seed=0, device=device)
    if kind != "conv":
        x = x.expand(*batch_dims, *x.shape).clone()
    x.requires_grad_(True)  # so that autograd must save every target's weight for backward
    seen = []
    # Registered before FlatPerturb's own hooks, so these run while W + ε is swapped in.
    for _, target in find_targets(model, adapters):
        name = target.param_name
        target.module.register_forward_hook(
            lambda m, a, o, name=name: seen.append(weakref.ref(getattr(m, name)))
        )
    opt = _wrap(model, adapters, sigma=0.1, seed=0)
    with opt.perturbed():
        output = model(x)
        assert len(seen) == len(opt.targets)
        assert all(ref() is None for ref in seen), "autograd kept W + eps alive"
        output.float().sum().backward()
    assert all(p.grad is not None for p in opt.param_groups[0]["params"])
    assert x.grad is not None


def test_trainable_dense_weight_is_freed_and_never_written(device):
    layer = nn.Linear(32, 16, device=device)
    seen = []
    layer.register_forward_hook(lambda m, a, o: seen.append(weakref.ref(m.weight)))
    opt = flatopt.FlatPerturb(
        torch.optim.SGD(layer.parameters(), lr=0.1),
        layer,
        sigma=0.1,
        schedule="constant",
        seed=0,
        adapters=[lambda m: flatopt.Target(m, "weight") if m is layer else None],
    )
    before = snapshot(layer)
    with opt.perturbed():
        output = layer(torch.randn(4, 32, device=device, requires_grad=True))
        assert seen[0]() is None
        output.sum().backward()
    assert_untouched(layer, before)
    assert layer.weight.grad is not None


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(12, 12), nn.GELU(), nn.Linear(12, 12))

    def forward(self, x, mode):
        if mode is None:
            return self.inner(x)
        return checkpoint(self.inner, x, use_reentrant=mode == "reentrant")


@pytest.mark.parametrize("dense_head", [False, True])
def test_activation_checkpointing_recomputes_under_the_same_noise(dense_head, device):
    torch.manual_seed(0)
    stem, block, head = nn.Linear(6, 12), Block(), nn.Linear(12, 2)
    model = nn.ModuleList([stem, block, head])
    add_lora(model, ["0", "inner.0", "inner.2"], rank=3)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            nn.init.normal_(m.lora_B, std=0.2)
    head.requires_grad_(True)
    model.to(device)
    adapters = [lambda m: flatopt.Target(m, "weight") if m is head else None] if dense_head else []
    opt = _wrap(model, adapters, sigma=0.3, seed=5)
    x = torch.randn(4, 6).to(device)
    results = {}
    for mode in (None, "reentrant", "non_reentrant"):
        opt.zero_grad()
        before = snapshot(model)
        with opt.perturbed():
            y = head(model[1](model[0](x), mode))
            y.square().mean().backward()
        assert_untouched(model, before)
        results[mode] = (y.detach(), [p.grad.clone() for p in opt.param_groups[0]["params"]])
    reference_out, reference_grads = results[None]
    for mode in ("reentrant", "non_reentrant"):
        out, grads = results[mode]
        assert bits_equal(out, reference_out)
        for got, want in zip(grads, reference_grads):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_weight_version_does_not_move_during_a_perturbed_step(device):
    model, x, _ = build("lora", torch.float32, 8, 8, 2, seed=0, device=device)
    weight = model[0].base.weight
    version = weight._version
    opt = _wrap(model, [], sigma=0.1, seed=0)
    opt.perturb()
    model(x).sum().backward()
    assert weight._version == version
    opt.restore()
    opt.step()
    assert weight._version == version
