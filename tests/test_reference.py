"""The fast path (ε regenerated from a seed inside hooks) against the slow reference,
`flatopt.reference`, which builds W + ε by hand from the same z and runs the model on it with
``torch.func.functional_call``."""

import pytest
import torch
from helpers import KINDS, bits_equal, build, reference_forward, reference_weights, snapshot
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import flatopt
from flatopt.reference import flat_lora_perturbations, perturbed_forward, seeded_z

# The fast path fuses W + z·std in one addcmul; the reference adds an fp32 ε: both round once
# to W's dtype, so they may differ by one ulp of W + ε. The tolerances allow a few ulps after
# a small network.
TOLERANCE = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-12},
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.bfloat16: {"rtol": 5e-2, "atol": 5e-2},
}


def _run_both(kind, dtype, out, fan_in, rank, sigma, seed, steps=1, device="cpu"):
    model, x, adapters = build(kind, dtype, out, fan_in, rank, seed, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = flatopt.FlatPerturb(
        torch.optim.SGD(trainable, lr=0.05),
        model,
        sigma=sigma,
        schedule="linear",
        total_steps=4,
        seed=seed,
        adapters=adapters,
    )
    for _ in range(steps):  # move along the schedule, and move the LoRA factors
        with opt.perturbed():
            model(x).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
    with opt.perturbed():
        fast = model(x)
        fast.float().square().mean().backward()
    fast_grads = [p.grad.clone() for p in trainable]
    opt.zero_grad()
    before = snapshot(model)
    eps = flat_lora_perturbations(model, opt.sigma, seeded_z(opt.seed, opt.num_steps), adapters)
    slow = perturbed_forward(model, eps, x)
    slow.float().square().mean().backward()
    slow_grads = [p.grad.clone() for p in trainable]
    for name, (value, version, _) in before.items():  # functional_call wrote nothing
        tensor = model.state_dict(keep_vars=True)[name]
        assert tensor._version == version and bits_equal(tensor.detach(), value), name
    return fast, slow, fast_grads, slow_grads, model(x)


@given(
    kind=st.sampled_from(KINDS),
    dtype=st.sampled_from(list(TOLERANCE)),
    out=st.integers(1, 10),
    fan_in=st.integers(4, 10),
    rank=st.integers(1, 3),
    sigma=st.floats(0.01, 0.3),
    seed=st.integers(0, 1000),
    steps=st.integers(1, 3),
)
def test_outputs_and_lora_gradients_match_the_explicit_reference(
    kind, dtype, out, fan_in, rank, sigma, seed, steps, device
):
    fast, slow, fast_grads, slow_grads, _ = _run_both(
        kind, dtype, out, fan_in, rank, sigma, seed, steps, device
    )
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(fast, slow, **tol)
    for got, want in zip(fast_grads, slow_grads):
        torch.testing.assert_close(got.float(), want.float(), **tol)


@pytest.mark.parametrize("kind", KINDS)
def test_the_perturbation_is_real(kind, device):
    fast, slow, _, _, clean = _run_both(
        kind, torch.float32, 8, 8, 2, sigma=0.2, seed=1, steps=2, device=device
    )
    assert not torch.allclose(fast, clean, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(fast, slow, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_trainable_dense_target_gets_the_gradient_at_w_plus_eps(dtype, device):
    torch.manual_seed(0)
    head = nn.Linear(6, 3).to(device, dtype)
    x = torch.randn(5, 6, dtype=dtype).to(device).requires_grad_()
    opt = flatopt.FlatPerturb(
        torch.optim.SGD(head.parameters(), lr=0.1),
        head,
        sigma=0.2,
        schedule="constant",
        seed=4,
        adapters=[lambda m: flatopt.Target(m, "weight") if m is head else None],
    )
    with opt.perturbed():
        head(x).float().square().sum().backward()
    fast = (head.weight.grad.clone(), head.bias.grad.clone(), x.grad.clone())
    head.zero_grad()
    x.grad = None
    replaced = reference_weights(opt, head)
    reference_forward(head, replaced, x).float().square().sum().backward()
    slow = (head.weight.grad, head.bias.grad, x.grad)
    for got, want in zip(fast, slow):
        torch.testing.assert_close(got.float(), want.float(), **TOLERANCE[dtype])
