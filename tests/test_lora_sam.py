"""LoRASAM (SAM on the LoRA factors) against the slow reference `flatopt.reference.lora_sam_step`,
its exact restore, the gradient its inner step uses, its errors and checkpoints."""

import copy
import io
import pickle
import warnings

import pytest
import torch
from helpers import assert_untouched, bits_equal, build, frozen_names, snapshot
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import flatopt
from flatopt.reference import lora_sam_step, perturbed_loss
from flatopt.sam import LoRASAM, sam_perturbation

# The fast path sums per-parameter norms, the reference one flat vector: the global norm may
# differ in its last bit, so ε and everything after it agree to a few ulps of the dtype.
TOLERANCE = {
    torch.float64: {"rtol": 1e-9, "atol": 1e-12},
    torch.float32: {"rtol": 2e-4, "atol": 2e-5},
}


def _loss(output, target):
    return (output - target).square().mean()


def _problem(kind="lora", dtype=torch.float64, out=6, fan_in=5, rank=2, seed=0, device="cpu"):
    """A model with frozen bases and LoRA factors, its input, a target, and its adapters."""
    model, x, adapters = build(kind, dtype, out, fan_in, rank, seed, device)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        shape = model(x).shape
        y = torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype)
    return model, x, y, adapters


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _named_trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _inner(name, params):
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)
    return torch.optim.AdamW(params, lr=1e-2)


def _closure(model, opt, x, y, record=None):
    def closure():
        if record is not None:
            record.append([p.detach().clone() for p in _trainable(model)])
        loss = _loss(model(x), y)
        loss.backward()
        return loss

    return closure


class _Seen:
    """An inner-optimizer step pre-hook: what the parameters and gradients are at its step."""

    def __init__(self, params):
        self.params = params
        self.values = []
        self.grads = []

    def __call__(self, optimizer, args, kwargs):
        self.values.append([p.detach().clone() for p in self.params])
        self.grads.append([p.grad.clone() for p in self.params])


# -- against the reference --------------------------------------------------------------------


@given(
    kind=st.sampled_from(["lora", "transposed", "conv"]),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    out=st.integers(1, 8),
    fan_in=st.integers(4, 8),
    rank=st.integers(1, 3),
    rho=st.floats(1e-3, 0.5),
    seed=st.integers(0, 10_000),
    steps=st.integers(1, 3),
    inner=st.sampled_from(["sgd", "adamw"]),
    adaptive=st.booleans(),
)
def test_lora_sam_matches_the_reference_step(
    kind, dtype, out, fan_in, rank, rho, seed, steps, inner, adaptive
):
    fast_model, x, y, _ = _problem(kind, dtype, out, fan_in, rank, seed)
    slow_model = copy.deepcopy(fast_model)
    opt = LoRASAM(_inner(inner, _trainable(fast_model)), fast_model, rho=rho, adaptive=adaptive)
    slow_inner = _inner(inner, _trainable(slow_model))
    for _ in range(steps):
        fast_loss = opt.step(_closure(fast_model, opt, x, y))
        opt.zero_grad()
        slow_loss = lora_sam_step(slow_model, _loss, (x, y), slow_inner, rho=rho, adaptive=adaptive)
        torch.testing.assert_close(fast_loss.detach(), slow_loss, **TOLERANCE[dtype])
    for (name, got), want in zip(fast_model.named_parameters(), slow_model.parameters()):
        torch.testing.assert_close(got, want, **TOLERANCE[dtype], msg=name)


def test_the_reference_is_textbook_sam_on_a_quadratic():
    # L(θ) = ½‖θ − t‖²: g = θ − t, ε = ρ·g/‖g‖, g' = θ + ε − t, θ ← θ − lr·g'.
    class Identity(nn.Module):
        def __init__(self):
            super().__init__()
            self.theta = nn.Parameter(torch.tensor([3.0, -1.0, 2.0], dtype=torch.float64))

        def forward(self, x):
            return self.theta * x

    model, target, rho, lr = (
        Identity(),
        torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64),
        0.3,
        0.1,
    )
    theta = model.theta.detach().clone()
    g = theta - target
    want = theta - lr * (theta + rho * g / g.norm() - target)
    half_sq = lambda out, t: 0.5 * (out - t).square().sum()  # noqa: E731
    ones = torch.ones(3, dtype=torch.float64)
    lora_sam_step(model, half_sq, (ones, target), torch.optim.SGD(model.parameters(), lr=lr), rho)
    torch.testing.assert_close(model.theta.detach(), want, rtol=1e-15, atol=1e-15)

    model = Identity()  # ASAM: ε = ρ·θ²⊙g/‖|θ|⊙g‖
    want = theta - lr * (theta + rho * theta**2 * g / (theta.abs() * g).norm() - target)
    opt = LoRASAM(torch.optim.SGD(model.parameters(), lr=lr), rho=rho, adaptive=True)

    def closure():
        loss = half_sq(model(ones), target)
        loss.backward()
        return loss

    opt.step(closure)
    torch.testing.assert_close(model.theta.detach(), want, rtol=1e-15, atol=1e-15)


def test_sam_perturbation_is_rho_times_the_unit_gradient():
    g = [torch.tensor([3.0, 0.0]), torch.tensor([[4.0]])]
    eps = sam_perturbation([torch.zeros(2), torch.zeros(1, 1)], g, rho=2.0)
    torch.testing.assert_close(eps[0], torch.tensor([1.2, 0.0]))
    torch.testing.assert_close(eps[1], torch.tensor([[1.6]]))
    zero = sam_perturbation([torch.ones(2)], [torch.zeros(2)], rho=2.0)
    assert bits_equal(zero[0], torch.zeros(2))  # ‖g‖ = 0: no perturbation, no NaN


# -- exactness ----------------------------------------------------------------------------------


@given(
    dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]),
    out=st.integers(1, 10),
    fan_in=st.integers(4, 10),
    rank=st.integers(1, 4),
    rho=st.floats(1e-3, 1.0),
    seed=st.integers(0, 10_000),
)
def test_the_factors_are_restored_bitwise_before_the_inner_step(
    dtype, out, fan_in, rank, rho, seed
):
    model, x, y, _ = _problem("lora", dtype, out, fan_in, rank, seed)
    params = _trainable(model)
    inner = torch.optim.SGD(params, lr=0.1)
    seen = _Seen(params)
    inner.register_step_pre_hook(seen)
    before = snapshot(model)
    theta = {n: (p.detach().clone(), p.data_ptr()) for n, p in model.named_parameters()}
    opt = LoRASAM(inner, model, rho=rho)
    passes = []
    opt.step(_closure(model, opt, x, y, record=passes))
    for (name, p), value in zip(model.named_parameters(), seen.values[0]):
        if p.requires_grad:
            assert bits_equal(value, theta[name][0]), f"{name} was not restored exactly"
            assert p.data_ptr() == theta[name][1], f"{name} moved to new storage"
    clean = [theta[name][0] for name, _ in _named_trainable(model)]
    assert all(bits_equal(a, b) for a, b in zip(passes[0], clean)), "the first pass is not at θ"
    assert any(not torch.equal(a, b) for a, b in zip(passes[1], clean)), "never perturbed"
    assert_untouched(model, before, frozen_names(model))  # frozen: same bits, version, storage


def test_the_inner_step_uses_the_gradient_at_theta_plus_epsilon(device):
    model, x, y, _ = _problem("lora", torch.float64, 7, 6, 3, seed=4, device=device)
    twin = copy.deepcopy(model)
    params = _trainable(model)
    inner = torch.optim.SGD(params, lr=0.1)
    seen = _Seen(params)
    inner.register_step_pre_hook(seen)
    rho = 0.2
    LoRASAM(inner, model, rho=rho).step(_closure(model, inner, x, y))

    # The same maths, by hand, on an untouched twin: g at θ, ε = ρ·g/‖g‖, g' at θ + ε.
    names = [n for n, _ in _named_trainable(twin)]
    tensors = [p for _, p in _named_trainable(twin)]
    g = torch.autograd.grad(perturbed_loss(twin, _loss, (x, y), {}), tensors)
    norm = torch.cat([t.flatten() for t in g]).norm()
    epsilon = {n: rho * t / norm for n, t in zip(names, g)}
    want = torch.autograd.grad(perturbed_loss(twin, _loss, (x, y), epsilon), tensors)
    for got, expected in zip(seen.grads[0], want):
        torch.testing.assert_close(got, expected, **TOLERANCE[torch.float64])
    clean = torch.autograd.grad(perturbed_loss(twin, _loss, (x, y), {}), tensors)
    assert not torch.allclose(seen.grads[0][0], clean[0], rtol=1e-6, atol=0)


def test_a_zero_gradient_is_not_perturbed(device):
    model, x, _, _ = _problem("lora", torch.float32, 5, 4, 2, seed=2, device=device)
    opt = LoRASAM(torch.optim.SGD(_trainable(model), lr=0.1), model, rho=0.1)
    passes = []

    def closure():
        passes.append([p.detach().clone() for p in _trainable(model)])
        loss = 0.0 * model(x).sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert all(bits_equal(a, b) for a, b in zip(passes[0], passes[1]))
    assert all(bits_equal(a, p.detach()) for a, p in zip(passes[0], _trainable(model)))


def test_a_step_without_gradients_changes_nothing(device):
    model, x, _, _ = _problem("lora", torch.float32, 5, 4, 2, seed=2, device=device)
    inner = torch.optim.AdamW(_trainable(model), lr=0.1)
    opt = LoRASAM(inner, model, rho=0.1)
    before = snapshot(model)

    def closure():  # a loss that never reaches backward
        with torch.no_grad():
            return model(x).sum()

    opt.step(closure)
    assert_untouched(model, before)
    assert len(inner.state) == 0


def test_frozen_weights_held_by_the_optimizer_are_left_alone(device):
    model, x, y, _ = _problem("lora", torch.float32, 6, 5, 2, seed=3, device=device)
    before = snapshot(model)
    opt = LoRASAM(torch.optim.SGD(model.parameters(), lr=0.1), model, rho=0.1)  # frozen too
    for _ in range(2):
        opt.step(_closure(model, opt, x, y))
        opt.zero_grad()
    assert_untouched(model, before, frozen_names(model))


def test_an_error_in_the_second_pass_restores_theta_and_takes_no_step(device):
    model, x, y, _ = _problem("lora", torch.float32, 6, 5, 2, seed=5, device=device)
    inner = torch.optim.SGD(_trainable(model), lr=0.1, momentum=0.9)
    opt = LoRASAM(inner, model, rho=0.3)
    theta = [p.detach().clone() for p in _trainable(model)]
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise KeyError("the second pass fails")
        loss = _loss(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(KeyError, match="second pass"):
        opt.step(closure)
    assert all(bits_equal(a, p.detach()) for a, p in zip(theta, _trainable(model)))
    assert len(inner.state) == 0  # the inner step never ran


# -- the step's interface ---------------------------------------------------------------------


def test_step_returns_the_loss_at_theta_and_runs_with_grad_under_no_grad():
    model, x, y, _ = _problem("lora", torch.float64, 6, 5, 2, seed=6)
    opt = LoRASAM(torch.optim.SGD(_trainable(model), lr=0.1), model, rho=0.2)
    with torch.no_grad():
        at_theta = _loss(model(x), y)
    losses = []

    def closure():
        loss = _loss(model(x), y)
        loss.backward()
        losses.append(loss.detach())
        return loss

    with torch.no_grad():  # the closures still get gradients
        returned = opt.step(closure)
    assert len(losses) == 2
    assert bits_equal(returned.detach(), at_theta)
    assert returned.item() < losses[1].item()  # ε climbs: the loss at θ + ε is higher


def test_step_without_a_closure_raises_naming_the_loops_that_pass_one():
    model, x, y, _ = _problem("lora", torch.float32, 6, 5, 2, seed=7)
    opt = LoRASAM(torch.optim.SGD(_trainable(model), lr=0.1), model)
    _loss(model(x), y).backward()
    theta = [p.detach().clone() for p in _trainable(model)]
    with pytest.raises(RuntimeError, match=r"needs a closure.*Lightning.*HF Trainer"):
        opt.step()
    assert all(bits_equal(a, p.detach()) for a, p in zip(theta, _trainable(model)))


def test_gradients_from_outside_the_closure_warn_once_and_a_plain_loop_does_not():
    model, x, y, _ = _problem("lora", torch.float32, 6, 5, 2, seed=8)
    opt = LoRASAM(torch.optim.SGD(_trainable(model), lr=0.1), model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for zero in (True, False):  # zero_grad each step, or (as Lightning) never
            for _ in range(2):
                opt.step(_closure(model, opt, x, y))
                if zero:
                    opt.zero_grad()
    _loss(model(x), y).backward()  # a micro-batch accumulated outside the closure
    with pytest.warns(UserWarning, match="accumulated outside the closure"):
        opt.step(_closure(model, opt, x, y))
    _loss(model(x), y).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        opt.step(_closure(model, opt, x, y))


BAD_ARGUMENTS = [
    ({"rho": 0.0}, ValueError, r"Invalid rho: 0\.0.*> 0"),
    ({"rho": -0.05}, ValueError, r"Invalid rho: -0\.05"),
    ({"rho": float("nan")}, ValueError, r"Invalid rho: nan.*finite"),
    ({"rho": float("inf")}, ValueError, r"Invalid rho: inf.*finite"),
    ({"rho": "0.05"}, TypeError, r"Invalid rho: '0\.05'.*number"),
    ({"rho": True}, TypeError, r"Invalid rho: True"),
    ({"rho": None}, TypeError, r"Invalid rho: None"),
    ({"adaptive": "yes"}, TypeError, r"Invalid adaptive: 'yes'.*True or False"),
    ({"model": "net"}, TypeError, r"model must be an nn.Module or None, got str"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_ARGUMENTS)
def test_bad_arguments_raise_naming_the_value_and_fix(kwargs, error, match):
    model, _, _, _ = _problem("lora", torch.float32, 4, 4, 1)
    with pytest.raises(error, match=match):
        LoRASAM(torch.optim.SGD(_trainable(model), lr=0.1), **kwargs)


def test_bad_optimizers_are_refused():
    model, _, _, _ = _problem("lora", torch.float32, 4, 4, 1)
    inner = torch.optim.SGD(_trainable(model), lr=0.1)
    with pytest.raises(TypeError, match=r"must be a torch\.optim\.Optimizer, got list"):
        LoRASAM(_trainable(model))
    with pytest.raises(TypeError, match="already a LoRASAM"):
        LoRASAM(LoRASAM(inner))
    flat = flatopt.FlatPerturb(inner, model, schedule="constant", seed=0)
    with pytest.raises(TypeError, match="is a FlatPerturb"):
        LoRASAM(flat)


def test_numpy_rho_is_a_python_float():
    np = pytest.importorskip("numpy")
    model, _, _, _ = _problem("lora", torch.float32, 4, 4, 1)
    opt = LoRASAM(torch.optim.SGD(_trainable(model), lr=0.1), rho=np.float32(0.25))
    assert type(opt.rho) is float and opt.rho == 0.25


def test_an_optimizer_over_another_model_warns():
    model, _, _, _ = _problem("lora", torch.float32, 4, 4, 1)
    other, _, _, _ = _problem("lora", torch.float32, 4, 4, 1, seed=1)
    with pytest.warns(UserWarning, match="holds none of the model's trainable parameters"):
        LoRASAM(torch.optim.SGD(_trainable(other), lr=0.1), model)


# -- as a torch optimizer -----------------------------------------------------------------------


def test_it_is_an_optimizer_sharing_the_inner_state_and_lr():
    model, x, y, _ = _problem("lora", torch.float32, 6, 5, 2)
    inner = torch.optim.AdamW(_trainable(model), lr=1e-2)
    opt = LoRASAM(inner, model, rho=0.1)
    assert isinstance(opt, torch.optim.Optimizer) and opt.optimizer is inner
    assert opt.param_groups is inner.param_groups and opt.defaults is inner.defaults
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step(_closure(model, opt, x, y))
    scheduler.step()
    assert inner.param_groups[0]["lr"] == pytest.approx(5e-3)
    assert opt.state is inner.state and len(opt.state) > 0
    opt.load_state_dict(opt.state_dict())
    assert opt.param_groups is inner.param_groups and opt.state is inner.state
    extra = nn.Parameter(torch.zeros(2))
    opt.add_param_group({"params": [extra]})
    assert inner.param_groups[-1]["params"] == [extra]
    text = repr(opt)
    assert text.startswith("LoRASAM (") and "rho: 0.1" in text and "AdamW" in text


def test_step_hooks_on_the_wrapper_run_once_per_step():
    model, x, y, _ = _problem("lora", torch.float32, 6, 5, 2)
    opt = LoRASAM(torch.optim.SGD(_trainable(model), lr=0.1), model)
    calls = []
    opt.register_step_pre_hook(lambda *_: calls.append("pre"))
    opt.register_step_post_hook(lambda *_: calls.append("post"))
    opt.step(_closure(model, opt, x, y))
    assert calls == ["pre", "post"]


def test_the_state_dict_holds_rho_and_adaptive():
    model, _, _, _ = _problem("lora", torch.float32, 4, 4, 1)
    sd = LoRASAM(torch.optim.SGD(_trainable(model), lr=0.1), rho=0.2, adaptive=True).state_dict()
    assert sd["lora_sam"] == {"rho": 0.2, "adaptive": True}
    assert {"state", "param_groups"} <= set(sd)


@pytest.mark.parametrize("inner_name", ["sgd", "adamw"])
def test_resume_from_a_checkpoint_continues_bit_for_bit(inner_name, device):
    def fresh():
        model, x, y, _ = _problem("lora", torch.float32, 8, 6, 2, seed=9, device=device)
        return model, x, y, LoRASAM(_inner(inner_name, _trainable(model)), model, rho=0.1)

    model, x, y, opt = fresh()
    for _ in range(5):
        opt.step(_closure(model, opt, x, y))
        opt.zero_grad()
    straight = [p.detach().clone() for p in model.parameters()]

    model, x, y, opt = fresh()
    for _ in range(3):
        opt.step(_closure(model, opt, x, y))
        opt.zero_grad()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    model, x, y, _ = fresh()
    model.load_state_dict(checkpoint["model"])
    opt = LoRASAM(_inner(inner_name, _trainable(model)), model, rho=0.3)
    with pytest.warns(UserWarning, match=r"rho: this LoRASAM's 0\.3, the checkpoint's 0\.1"):
        opt.load_state_dict(checkpoint["optimizer"])
    assert opt.rho == 0.1
    for _ in range(2):
        opt.step(_closure(model, opt, x, y))
        opt.zero_grad()
    for got, want in zip(model.parameters(), straight):
        assert bits_equal(got.detach(), want)


BAD_CHECKPOINTS = [
    ({"rho": -1.0, "adaptive": False}, ValueError, r"state_dict\['lora_sam'\]\['rho'\]: -1\.0"),
    ({"rho": 0.1}, ValueError, r"no 'adaptive' entry.*Nothing was loaded"),
    ({"rho": 0.1, "adaptive": "no"}, TypeError, r"\['adaptive'\]: 'no'"),
    (3, TypeError, r"state_dict\['lora_sam'\] must be a dict, got int"),
]


@pytest.mark.parametrize(("own", "error", "match"), BAD_CHECKPOINTS)
def test_a_bad_checkpoint_is_refused_and_changes_nothing(own, error, match):
    model, x, y, _ = _problem("lora", torch.float32, 6, 5, 2)
    inner = torch.optim.AdamW(_trainable(model), lr=1e-2)
    opt = LoRASAM(inner, model, rho=0.1)
    opt.step(_closure(model, opt, x, y))
    before = copy.deepcopy(inner.state_dict())
    sd = opt.state_dict()
    sd["lora_sam"] = own
    sd["param_groups"][0]["lr"] = 1.0  # would change the inner optimizer if it were loaded
    with pytest.raises(error, match=match):
        opt.load_state_dict(sd)
    assert opt.rho == 0.1 and inner.param_groups[0]["lr"] == before["param_groups"][0]["lr"]
    with pytest.raises(TypeError, match="state_dict must be a dict, got list"):
        opt.load_state_dict([])


def test_a_bare_optimizer_checkpoint_loads_with_a_warning():
    model, _, _, _ = _problem("lora", torch.float32, 4, 4, 1)
    inner = torch.optim.SGD(_trainable(model), lr=0.1)
    opt = LoRASAM(inner, rho=0.2)
    bare = copy.deepcopy(inner.state_dict())
    bare["param_groups"][0]["lr"] = 0.5
    with pytest.warns(UserWarning, match="no 'lora_sam' entry.*rho stays 0.2"):
        opt.load_state_dict(bare)
    assert inner.param_groups[0]["lr"] == 0.5 and opt.rho == 0.2


def test_a_deep_copy_with_its_model_is_independent_and_it_pickles():
    model, x, y, _ = _problem("lora", torch.float32, 6, 5, 2)
    opt = LoRASAM(torch.optim.AdamW(_trainable(model), lr=1e-2), model, rho=0.1, adaptive=True)
    opt.step(_closure(model, opt, x, y))
    twin, twin_opt = copy.deepcopy((model, opt))
    assert twin_opt.rho == 0.1 and twin_opt.adaptive is True
    held = {id(p) for group in twin_opt.param_groups for p in group["params"]}
    assert held == {id(p) for p in _trainable(twin)}
    original = [p.detach().clone() for p in model.parameters()]
    twin_opt.step(_closure(twin, twin_opt, x, y))
    assert all(bits_equal(a, p.detach()) for a, p in zip(original, model.parameters()))
    assert any(not torch.equal(a, p) for a, p in zip(original, twin.parameters()))
    restored = pickle.loads(pickle.dumps(opt))
    assert isinstance(restored, LoRASAM) and restored.rho == 0.1
    assert restored.state_dict()["lora_sam"] == opt.state_dict()["lora_sam"]
