"""The contract checks every integration test runs on its library's layers.

- `check_round_trip`: several perturbed steps; every parameter and buffer is bitwise, version-
  and storage-identical mid-step, and the frozen ones after the steps; the ``state_dict`` keys
  never change; the perturbation is real.
- `assert_law`: ε read off the forward pass follows σ·‖W'_i‖/√n per row, W' taken from the
  library's *own* merge (``get_delta_weight``, ``merge()``, ``.eval()``, ...), never from the
  adapter under test.
- `check_reference`: outputs and LoRA gradients against a slow reference that builds W + ε
  by hand from that W' and runs the model on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from helpers import assert_untouched, frozen_names, snapshot
from torch import Tensor, nn
from torch.func import functional_call

import flatopt
from flatopt.noise import derive_seed, draw_noise

DTYPES = [torch.float32, torch.bfloat16]

# The law is checked on OUT x FAN_IN weights; statistics as in tests/test_noise.py: the per-row
# RMS of n = 512 draws has relative standard error 1/√(2n) ≈ 0.031 (6 of them: 0.19 per row);
# the mean of the 64 row ratios 0.0039 (0.023). bf16 adds rounding slack, derived there.
Z = 6.0
OUT, FAN_IN, RANK = 64, 512, 4
ROW_TOL = Z / math.sqrt(2 * FAN_IN)
MEAN_TOL = Z / math.sqrt(2 * FAN_IN * OUT)
SLACK = {torch.float32: (0.0, 0.0), torch.bfloat16: (0.01, 0.005)}

# Fast path and reference round W + ε once each to the weight's dtype, and the fast path takes
# its row norms from the low-rank identity, the reference from the dense W': a few ulps apart.
TOLERANCE = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.bfloat16: {"rtol": 5e-2, "atol": 5e-2},
}


def merged_case(out: int = OUT, fan_in: int = FAN_IN, rank: int = RANK, seed: int = 0):
    """W, B, A (fp64) with ‖W_i‖ ≈ 1 and ‖(B@A)_i‖ ≈ c_i, c_i from 0 to 4 along the rows.

    So ‖W'_i‖ / ‖W_i‖ runs from 1 to ≈ 4.1, and the law can tell the merged norm from the base.
    """
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, fan_in, generator=g, dtype=torch.float64) / math.sqrt(fan_in)
    A = torch.randn(rank, fan_in, generator=g, dtype=torch.float64) / math.sqrt(fan_in)
    c = torch.linspace(0, 4, out, dtype=torch.float64)[:, None]
    B = torch.randn(out, rank, generator=g, dtype=torch.float64) / math.sqrt(rank) * c
    return W, B, A


def randomize(module: nn.Module, names: Callable[[str], bool], scale: float, seed: int) -> None:
    """Fill the parameters whose name passes ``names`` with N(0, scale²), from a private RNG."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if names(name):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * scale)


def wrap(model: nn.Module, sigma: float = 0.1, seed: int = 0, **kwargs) -> flatopt.FlatPerturb:
    trainable = [p for p in model.parameters() if p.requires_grad]
    inner = torch.optim.SGD(trainable, lr=0.05)
    kwargs = {"schedule": "constant", **kwargs}
    return flatopt.FlatPerturb(inner, model, sigma=sigma, seed=seed, **kwargs)


def _output(value) -> Tensor:
    value = value.logits if hasattr(value, "logits") else value
    return value[0] if isinstance(value, tuple) else value


def check_round_trip(model: nn.Module, forward: Callable[[], object], steps: int = 3):
    """Train ``steps`` perturbed steps; the exactness contract holds all along."""
    keys = list(model.state_dict())
    start, frozen = snapshot(model), frozen_names(model)
    opt = wrap(model, sigma=0.2, seed=11)
    assert list(model.state_dict()) == keys, "wrapping changed the state_dict keys"
    for _ in range(steps):
        before = snapshot(model)
        with torch.no_grad():
            clean = _output(forward()).detach().clone()
        opt.perturb()
        output = _output(forward())
        assert list(model.state_dict()) == keys
        assert_untouched(model, before)  # the state_dict is clean mid-step
        if output.requires_grad:  # a merged layer trains nothing
            output.float().square().mean().backward()
            assert_untouched(model, before)
        opt.restore()
        assert_untouched(model, before)
        assert not torch.equal(output.detach(), clean), "the forward did not see any noise"
        opt.step()
        opt.zero_grad()
    assert_untouched(model, start, frozen)
    assert list(model.state_dict()) == keys
    return opt


def read_output_noise(opt, module: nn.Module, call: Callable[[], object]) -> Tensor:
    """``module``'s output under the noise minus its clean output, for the same ``call()``.

    With identity inputs and no bias, that output is the weight itself, so this is ε.
    """
    outputs = []
    handle = module.register_forward_hook(lambda m, a, o: outputs.append(o.detach().clone()))
    try:
        with torch.no_grad():
            call()
            with opt.perturbed():
                call()
    finally:
        handle.remove()
    clean, noisy = outputs
    return noisy.double() - clean.double()


def law_std(merged_logical: Tensor, sigma: float) -> Tensor:
    """σ·‖W'_i‖/√n from a dense ``(rows, n)`` W', in fp64."""
    merged = merged_logical.detach().double()
    return sigma * torch.linalg.vector_norm(merged, dim=1) / math.sqrt(merged.shape[1])


def assert_law(eps: Tensor, expected: Tensor, dtype: torch.dtype, wrong: Tensor | None = None):
    """ε ``(rows, n)`` has per-row RMS ``expected``, and a wrong law ``wrong`` is rejected."""
    row_slack, mean_slack = SLACK[dtype]
    rms = eps.double().square().mean(dim=1).sqrt()
    ratio = rms / expected.double()
    assert (ratio - 1).abs().max() <= ROW_TOL + row_slack, ratio
    assert abs(ratio.mean() - 1) <= MEAN_TOL + mean_slack, ratio.mean()
    z = (eps.double() / expected.double()[:, None]).flatten()
    assert abs(z.mean()) <= Z / math.sqrt(z.numel())  # centred
    if wrong is not None:  # the same check rejects the wrong law, by twice its tolerance
        assert (rms / wrong.double() - 1).abs().max() > 2 * (ROW_TOL + row_slack)


def reference_weights(
    opt: flatopt.FlatPerturb, merged: Mapping[nn.Module, Tensor]
) -> dict[nn.Module, Tensor]:
    """W + ε for every target, by hand: std from the dense W' the test computed itself."""
    replaced = {}
    for site in opt._sites:
        target, weight = site.target, site.target.weight
        std = law_std(merged[target.module], opt.sigma).float()
        seed = derive_seed(opt.seed, opt.num_steps, 0, site.index, 0)
        eps = draw_noise(
            weight, std, transposed=target.transposed, generator=torch.Generator(), seed=seed
        )
        replaced[target.module] = (weight.detach().to(eps.dtype) + eps).to(weight.dtype)
    return replaced


def _run_reference(model, forward, opt, replaced, via):
    targets = {site.target.module: site.target for site in opt._sites}
    if via == "functional_call":
        # The whole model runs on W + ε: the parameter is replaced under its qualified name.
        names = {id(p): n for n, p in model.named_parameters()}
        params = {names[id(targets[m].weight)]: w for m, w in replaced.items()}
        return _output(forward(lambda *a, **k: functional_call(model, params, a, k)))
    # Only the target module's own forward sees W + ε (what a Target promises): peft's DoRA
    # reads the base weight outside it, for its norm, and must see the clean W there.
    handles, saved = [], {}
    for module, perturbed in replaced.items():
        name = targets[module].param_name

        def pre(m, args, name=name, perturbed=perturbed):
            saved[m] = m._parameters[name]
            m._parameters[name] = perturbed

        def post(m, args, out, name=name):
            m._parameters[name] = saved.pop(m)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        return _output(forward(model))
    finally:
        for handle in handles:
            handle.remove()


def check_reference(
    model: nn.Module,
    forward: Callable[[Callable], object],
    merged: Callable[[], Mapping[nn.Module, Tensor]],
    dtype: torch.dtype,
    via: str = "functional_call",
    steps: int = 2,
) -> None:
    """Outputs and gradients of the fast path equal the slow reference's, after ``steps`` steps.

    ``forward(call)`` runs the model through ``call`` (the model, or a functional call of it);
    ``merged()`` returns each target module's dense W' in the logical ``(rows, n)`` layout.
    """
    opt = wrap(model, sigma=0.2, seed=5, schedule="linear", total_steps=4)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for _ in range(steps):  # move along the schedule, and move the LoRA factors
        with opt.perturbed():
            _output(forward(model)).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        clean = _output(forward(model)).clone()
    with opt.perturbed():
        fast = _output(forward(model))
        fast.float().square().mean().backward()
    fast_grads = [None if p.grad is None else p.grad.clone() for p in trainable]
    opt.zero_grad()
    with torch.no_grad():
        replaced = reference_weights(opt, merged())
    slow = _run_reference(model, forward, opt, replaced, via)
    slow.float().square().mean().backward()
    slow_grads = [None if p.grad is None else p.grad.clone() for p in trainable]
    opt.zero_grad()

    tol = TOLERANCE[dtype]
    assert not torch.allclose(fast.float(), clean.float(), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(fast.float(), slow.float(), **tol)
    assert [g is None for g in fast_grads] == [g is None for g in slow_grads]
    assert any(g is not None for g in fast_grads), "no LoRA parameter got a gradient"
    for got, want in zip(fast_grads, slow_grads):
        if got is not None:
            # fp32 round-off in W + ε (fused addcmul against a separate add) reaches a
            # gradient entry through sums of terms as large as the gradient's largest: the
            # absolute tolerance is taken relative to that scale.
            scale = max(1.0, float(want.abs().max()))
            atol = tol["atol"] * scale
            torch.testing.assert_close(got.float(), want.float(), rtol=tol["rtol"], atol=atol)
