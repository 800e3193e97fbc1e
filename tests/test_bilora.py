"""BiLoRA against the slow reference (`flatopt.reference.bilora_loss`, `bilora_step`,
`bilora_clip`): outputs, gradients, ascent, the clip, exactness, checkpoints and errors."""

import copy
import io
import math
import zipfile

import pytest
import torch
from helpers import assert_untouched, bits_equal, build, frozen_names, snapshot
from hypothesis import given
from hypothesis import strategies as st

import flatopt
from flatopt.bilora import clip_, low_rank_norm_sq
from flatopt.noise import LowRank
from flatopt.reference import (
    bilora_clip,
    bilora_loss,
    bilora_step,
    lora_targets,
    low_rank_perturbations,
    perturbed_forward,
)

# W + B₂A₂ is rounded once on both paths, but the fast path adds B₂A₂ inside one addmm and
# the reference after a matmul: they agree to a few ulps (fp64), a few e-6 relative (fp32).
TOLERANCE = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-12},
    torch.float32: {"rtol": 2e-5, "atol": 2e-6},
}


def _loss(output, target):
    return (output - target).square().mean()


def _problem(kind="lora", dtype=torch.float64, seed=0):
    model, x, adapters = build(kind, dtype, 6, 8, 2, seed)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        y = torch.randn(model(x).shape, generator=g, dtype=torch.float64).to(dtype)
    return model, x, y, adapters


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _wrap(model, adapters, inner="sgd", **kwargs):
    params = _trainable(model)
    if inner == "sgd":
        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    else:
        opt = torch.optim.AdamW(params, lr=1e-2)
    kwargs.setdefault("seed", 0)
    kwargs.setdefault("rank", 3)
    return flatopt.BiLoRA(opt, model, adapters=adapters, **kwargs)


def _randomise(opt, seed=5, scale=0.05):
    """Nonzero B₂ (LoRA's init has B₂ = 0, which would hide B₂A₂ from the forward)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for factor in opt.aux_factors.values():
            factor.B.copy_(torch.randn(factor.B.shape, generator=g, dtype=torch.float64) * scale)


def _by_tensor_name(model, opt, adapters):
    """The wrapper's auxiliary modules keyed as the reference keys them (the same order)."""
    return dict(zip(lora_targets(model, adapters), opt.aux_factors.values()))


@pytest.mark.parametrize("kind", ["lora", "transposed", "conv"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_outputs_and_gradients_match_the_reference(kind, dtype):
    model, x, y, adapters = _problem(kind, dtype)
    opt = _wrap(model, adapters)
    _randomise(opt)
    aux = _by_tensor_name(model, opt, adapters)
    factors = [t for f in aux.values() for t in (f.B, f.A)]
    params = _trainable(model) + factors

    expected_out = perturbed_forward(model, low_rank_perturbations(model, aux, adapters), x)
    expected = torch.autograd.grad(bilora_loss(model, _loss, (x, y), aux, adapters), params)
    with opt.perturbed():
        out = model(x)
        grads = torch.autograd.grad(_loss(out, y), params)
    torch.testing.assert_close(out, expected_out, **TOLERANCE[dtype])
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, **TOLERANCE[dtype])


@pytest.mark.parametrize("inner", ["sgd", "adamw"])
def test_steps_match_the_reference_step(inner):
    model, x, y, adapters = _problem()
    ref_model = copy.deepcopy(model)
    opt = _wrap(model, adapters, inner=inner, rho=0.02)
    ref_aux = {
        name: LowRank(f.B.detach().clone().requires_grad_(), f.A.detach().clone().requires_grad_())
        for name, f in _by_tensor_name(model, opt, adapters).items()
    }
    aux_params = [t for f in ref_aux.values() for t in (f.B, f.A)]
    main = _trainable(ref_model)
    if inner == "sgd":
        groups = [{"params": main}, {"params": aux_params, "maximize": True}]
        ref_opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    else:
        groups = [{"params": main}, {"params": aux_params, "maximize": True, "weight_decay": 0}]
        ref_opt = torch.optim.AdamW(groups, lr=1e-2)
    for _ in range(4):
        with opt.perturbed():
            _loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        bilora_step(ref_model, _loss, (x, y), ref_opt, ref_aux, rho=0.02, adapters=adapters)
    for got, want in zip(_trainable(model), _trainable(ref_model)):
        torch.testing.assert_close(got, want, **TOLERANCE[torch.float64])
    for got, want in zip(opt.aux_factors.values(), ref_aux.values()):
        torch.testing.assert_close(got.B, want.B, **TOLERANCE[torch.float64])
        torch.testing.assert_close(got.A, want.A, **TOLERANCE[torch.float64])
    assert float(opt.aux_norm()) == pytest.approx(0.02, rel=1e-9)  # the clip engaged


def test_a_zero_b2_gets_a_nonzero_ascent_gradient_and_ascends():
    model, x, y, adapters = _problem()
    opt = flatopt.BiLoRA(torch.optim.SGD(_trainable(model), lr=0.1), model, adapters=adapters)
    factors = list(opt.aux_factors.values())
    assert all(torch.count_nonzero(f.B) == 0 for f in factors)  # LoRA's init
    assert all(torch.count_nonzero(f.A) > 0 for f in factors)
    with opt.perturbed():
        _loss(model(x), y).backward()
    for f in factors:
        assert torch.count_nonzero(f.B.grad) > 0  # G·A₂ᵀ ≠ 0
        assert torch.count_nonzero(f.A.grad) == 0  # B₂ᵀ·G = 0 while B₂ = 0
    grads = [f.B.grad.clone() for f in factors]
    A = [f.A.detach().clone() for f in factors]
    opt.step()
    # Ascent: B₂ = +lr·G·A₂ᵀ, then the global clip by √(ρ/c) when c > ρ (A₂ shrinks alike).
    c = math.sqrt(
        sum(float(torch.linalg.matrix_norm(0.1 * g @ a).square()) for g, a in zip(grads, A))
    )
    shrink = min(1.0, math.sqrt(0.05 / c))
    for f, grad, a in zip(factors, grads, A):
        torch.testing.assert_close(f.B, 0.1 * shrink * grad, **TOLERANCE[torch.float64])
        torch.testing.assert_close(f.A, shrink * a, **TOLERANCE[torch.float64])


def test_ascent_raises_the_loss_at_the_perturbed_weight():
    model, x, y, adapters = _problem()
    opt = flatopt.BiLoRA(
        torch.optim.SGD(_trainable(model), lr=0.0), model, adapters=adapters, lr=0.05, seed=1
    )
    aux = _by_tensor_name(model, opt, adapters)
    losses = []
    for _ in range(3):
        with torch.no_grad():
            losses.append(float(bilora_loss(model, _loss, (x, y), aux, adapters)))
        with opt.perturbed():
            _loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    assert losses[0] < losses[1] < losses[2]  # B₁A₁ frozen by lr 0: only the adversary moves


@given(
    shapes=st.lists(
        st.tuples(st.integers(1, 6), st.integers(1, 4), st.integers(1, 6)), max_size=4, min_size=1
    ),
    rho=st.floats(1e-3, 10.0),
    scale=st.floats(1e-3, 3.0),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.float64, torch.float32]),
)
def test_the_clip_matches_the_reference(shapes, rho, scale, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    pairs = [
        (torch.randn(m, r, generator=g, dtype=dtype) * scale, torch.randn(r, n, generator=g,
         dtype=dtype))
        for m, r, n in shapes
    ]  # fmt: skip
    ref = [(B.clone(), A.clone()) for B, A in pairs]
    norm = clip_(pairs, rho)
    ref_norm = bilora_clip(ref, rho)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(norm.to(dtype), ref_norm, **tol)
    for (B, A), (rB, rA) in zip(pairs, ref):
        torch.testing.assert_close(B, rB, **tol)
        torch.testing.assert_close(A, rA, **tol)
    after = math.sqrt(sum(float(low_rank_norm_sq(B, A)) for B, A in pairs))
    assert after <= rho * (1 + 1e-5) or float(ref_norm) <= rho


def test_the_clip_leaves_a_module_inside_the_ball_bitwise_as_it_was():
    B, A = torch.full((3, 2), 0.01), torch.full((2, 4), 0.01)
    before = (B.clone(), A.clone())
    clip_([(B, A)], rho=1.0)
    assert bits_equal(B, before[0]) and bits_equal(A, before[1])


@pytest.mark.parametrize("auto", [False, True])
def test_frozen_weights_are_bitwise_untouched(auto):
    model, x, y, adapters = _problem()
    opt = _wrap(model, adapters, auto=auto)
    _randomise(opt)
    before = snapshot(model)
    for _ in range(3):
        if auto:
            _loss(model(x), y).backward()
        else:
            with opt.perturbed():
                state = model.state_dict()
                _loss(model(x), y).backward()
            assert all(bits_equal(state[n], before[n][0]) for n in frozen_names(model))
        opt.step()
        opt.zero_grad()
    assert_untouched(model, before, frozen_names(model))


def test_auto_mode_gives_the_explicit_run_bit_for_bit():
    runs = []
    for auto in (False, True):
        model, x, y, adapters = _problem()
        opt = _wrap(model, adapters, inner="adamw", auto=auto)
        for _ in range(3):
            if auto:
                _loss(model(x), y).backward()
            else:
                with opt.perturbed():
                    _loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        runs.append([p.detach().clone() for p in _trainable(model)] + [
            t.detach().clone() for f in opt.aux_factors.values() for t in (f.B, f.A)])  # fmt: skip
    assert all(bits_equal(a, b) for a, b in zip(*runs))


def test_step_closure_and_accumulation_see_one_aux_module():
    model, x, y, adapters = _problem()
    twin = copy.deepcopy(model)
    opt = _wrap(model, adapters)
    _randomise(opt)
    other = _wrap(twin, adapters)
    _randomise(other)

    def closure():
        loss = _loss(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    with other.perturbed():  # the same batch as two half micro-batches
        for half in (slice(0, 2), slice(2, 5)):
            (_loss(twin(x[half]), y[half]) * (half.stop - half.start) / 5).backward()
    other.step()
    for a, b in zip(_trainable(model), _trainable(twin)):
        torch.testing.assert_close(a, b, **TOLERANCE[torch.float64])


def test_eval_mode_forwards_see_no_auxiliary_module():
    model, x, _, adapters = _problem()
    opt = _wrap(model, adapters)
    _randomise(opt, scale=0.5)
    model.eval()
    clean = model(x)
    with opt.perturbed():
        assert bits_equal(model(x), clean)
        model.train()
        assert not torch.allclose(model(x), clean)


def test_auxiliary_factors_are_not_in_the_model_its_state_dict_or_its_pickle():
    model, x, y, adapters = _problem()
    keys = list(model.state_dict())
    opt = _wrap(model, adapters)
    _randomise(opt)
    with opt.perturbed():
        _loss(model(x), y).backward()
    opt.step()
    assert list(model.state_dict()) == keys
    aux = {id(t) for f in opt.aux_factors.values() for t in (f.B, f.A)}
    assert not aux & {id(t) for t in model.parameters()}
    buffer = io.BytesIO()
    torch.save(model, buffer)
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as archive:
        storages = [n for n in archive.namelist() if "/data/" in n and not n.endswith("/")]
    assert len(storages) == len(keys)  # one storage per model tensor, none for B₂, A₂
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert list(loaded.state_dict()) == keys


@pytest.mark.parametrize("inner", ["sgd", "adamw"])
def test_resume_from_a_state_dict_is_bit_for_bit(inner):
    model, x, y, adapters = _problem()
    fresh_model = copy.deepcopy(model)
    opt = _wrap(model, adapters, inner=inner, rho=0.01)

    def run(opt, model, steps):
        for _ in range(steps):
            with opt.perturbed():
                _loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()

    run(opt, model, 2)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    run(opt, model, 3)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh_model.load_state_dict(saved["model"])
    fresh = _wrap(fresh_model, adapters, inner=inner, rho=0.01, seed=123)  # another init
    with pytest.warns(UserWarning, match="seed"):  # the checkpoint's factors replace the init
        fresh.load_state_dict(saved["opt"])
    run(fresh, fresh_model, 3)
    for a, b in zip(_trainable(model), _trainable(fresh_model)):
        assert bits_equal(a, b)
    for a, b in zip(opt.aux_factors.values(), fresh.aux_factors.values()):
        assert bits_equal(a.B, b.B) and bits_equal(a.A, b.A)
    assert fresh.num_steps == opt.num_steps == 5


def test_a_deep_copy_is_an_independent_pair():
    model, x, y, adapters = _problem()
    opt = _wrap(model, adapters)
    model2, opt2 = copy.deepcopy((model, opt))
    for pair in ((model, opt), (model2, opt2)):
        with pair[1].perturbed():
            _loss(pair[0](x), y).backward()
        pair[1].step()
    for a, b in zip(opt.aux_factors.values(), opt2.aux_factors.values()):
        assert bits_equal(a.B, b.B) and a.B is not b.B
    group = opt2.param_groups[-1]
    assert {id(t) for t in group["params"]} == {
        id(t) for f in opt2.aux_factors.values() for t in (f.B, f.A)
    }


def test_a_bad_checkpoint_changes_nothing():
    model, _, _, adapters = _problem()
    opt = _wrap(model, adapters)
    sd = opt.state_dict()
    sd["bilora"]["factors"]["0"]["B"] = torch.zeros(1, 1)
    before = [f.B.clone() for f in opt.aux_factors.values()]
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(sd)
    assert all(bits_equal(a, f.B) for a, f in zip(before, opt.aux_factors.values()))
    with pytest.raises(ValueError, match="'bilora'"):
        opt.load_state_dict({k: v for k, v in opt.state_dict().items() if k != "bilora"})
    other = _wrap(copy.deepcopy(model), adapters, rank=5)
    with pytest.raises(ValueError, match="rank"):
        other.load_state_dict(opt.state_dict())


def _lbfgs(model):
    return torch.optim.LBFGS(_trainable(model))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"rho": 0.0}, ValueError, "rho"),
        ({"rho": -0.1}, ValueError, "rho"),
        ({"rho": float("nan")}, ValueError, "rho"),
        ({"rho": float("inf")}, ValueError, "rho"),
        ({"rho": "0.05"}, TypeError, "rho"),
        ({"rho": True}, TypeError, "rho"),
        ({"rank": 0}, ValueError, "rank"),
        ({"rank": 2.5}, ValueError, "rank"),
        ({"rank": True}, ValueError, "rank"),
        ({"lr": 0.0}, ValueError, "lr"),
        ({"lr": float("nan")}, ValueError, "lr"),
        ({"lr": "1e-3"}, TypeError, "lr"),
        ({"seed": -1}, ValueError, "seed"),
        ({"optimizer": "lbfgs"}, TypeError, "maximize"),
        ({"optimizer": "none"}, TypeError, "Optimizer"),
    ],
)
def test_errors(kwargs, error, match):
    model, _, _, adapters = _problem()
    choice = kwargs.pop("optimizer", "sgd")
    inner = {
        "sgd": lambda: torch.optim.SGD(_trainable(model), lr=0.1),
        "lbfgs": lambda: _lbfgs(model),
        "none": lambda: None,
    }[choice]()
    with pytest.raises(error, match=match):
        flatopt.BiLoRA(inner, model, adapters=adapters, **kwargs)


def test_step_while_armed_raises_and_repr_works():
    model, _, _, adapters = _problem()
    opt = _wrap(model, adapters)
    opt.perturb()
    with pytest.raises(RuntimeError, match="restore"):
        opt.step()
    assert not opt.is_perturbed
    assert "BiLoRA" in repr(opt) and "rho: 0.05" in repr(opt)
