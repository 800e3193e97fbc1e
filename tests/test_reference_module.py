"""`flatopt.reference`, the slow and obvious reference: its Flat-LoRA law against `flatopt.noise`
given the same z, its forward against FlatPerturb's, and its Bi-LoRA pieces against the paper's
equations (the clip, the gradients of the auxiliary factors, one step)."""

import copy
import math

import pytest
import torch
from helpers import bits_equal, build
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import flatopt
from flatopt.lora import add_lora
from flatopt.noise import LowRank, draw_noise, noise_std
from flatopt.reference import (
    bilora_clip,
    bilora_loss,
    bilora_step,
    flat_lora_noise,
    flat_lora_perturbations,
    lora_targets,
    low_rank_perturbations,
    merged_weight,
    perturbed_forward,
    perturbed_loss,
    seeded_z,
)

# The reference builds W' densely in fp32 (fp64 for fp64 W); flatopt.noise may use the row-norm
# identity for large weights: the two agree to a few ulps of the std's dtype. For bf16 weights
# flatopt.noise builds W' in bf16 (tensor cores): see BF16_ROUNDING.
LAW_TOLERANCE = {
    torch.float64: {"rtol": 1e-11, "atol": 1e-13},
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.float16: {"rtol": 1e-5, "atol": 1e-6},  # built in fp32 a row chunk at a time
}
# Rounding W' = W + Σ s·B·A to bf16 errs by up to 2⁻⁸ of the magnitudes |W| + Σ |s|·|B|·|A| of
# its terms (twice 2⁻⁹: the scaled factors and the sum are each rounded once): when the terms
# cancel, that is more than 2⁻⁹ of W' itself.
BF16_ROUNDING = 2.0**-8
# As in test_reference.py: W + ε is rounded once to W's dtype on both paths.
FORWARD_TOLERANCE = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-12},
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.bfloat16: {"rtol": 5e-2, "atol": 5e-2},
}


def _loss(output, target):
    return (output - target).square().mean()


# -- the Flat-LoRA law ----------------------------------------------------------------------------


@st.composite
def weights_and_deltas(draw):
    """A weight in some layout, its ΔW in one of the forms adapters return, and a z seed."""
    dtype = draw(st.sampled_from(list(LAW_TOLERANCE)))
    layout = draw(st.sampled_from(["linear", "transposed", "conv", "transposed_conv"]))
    out, fan_in, rank = draw(st.integers(1, 9)), draw(st.integers(1, 9)), draw(st.integers(1, 3))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if layout == "linear":
        shape, logical_in = (out, fan_in), fan_in
    elif layout == "transposed":
        shape, logical_in = (fan_in, out), fan_in
    elif layout == "conv":
        shape, logical_in = (out, fan_in, 2, 3), fan_in * 6
    else:  # (in, out, *kernel), as nn.ConvTranspose2d stores it
        shape, logical_in = (fan_in, out, 2, 2), fan_in * 4
    weight = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    transposed = layout.startswith("transposed")
    kind = draw(st.sampled_from(["none", "low_rank", "two_adapters", "tensor"]))

    def factor():
        B = torch.randn(out, rank, generator=g, dtype=torch.float64).to(dtype)
        A = torch.randn(rank, logical_in, generator=g, dtype=torch.float64).to(dtype)
        return LowRank(B, A, scale=draw(st.floats(0.1, 4.0)))

    delta = {
        "none": lambda: None,
        "low_rank": factor,
        "two_adapters": lambda: [factor(), factor()],
        "tensor": lambda: 0.3 * torch.randn(shape, generator=g, dtype=torch.float64).to(dtype),
    }[kind]()
    return weight, delta, transposed, draw(st.integers(0, 2**40))


@given(case=weights_and_deltas(), sigma=st.floats(0.0, 0.5))
def test_flat_lora_noise_matches_the_noise_module_given_the_same_z(case, sigma):
    weight, delta, transposed, seed = case
    generator = torch.Generator()
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    rows = weight.shape[0]
    z = draw_noise(weight, torch.ones(rows, dtype=acc), generator=generator, seed=seed)
    std = noise_std(weight, delta, sigma, transposed=transposed)
    fast = draw_noise(weight, std, transposed=transposed, generator=generator, seed=seed)
    slow = flat_lora_noise(weight, delta, sigma, z, transposed=transposed)
    assert slow.dtype == fast.dtype and slow.shape == weight.shape
    if weight.dtype == torch.bfloat16:
        bound = flat_lora_noise(
            weight.abs(), _magnitudes(delta), sigma, z.abs(), transposed=transposed
        )
        assert ((slow - fast).abs() <= BF16_ROUNDING * bound + 1e-6).all()
    else:
        torch.testing.assert_close(slow, fast, **LAW_TOLERANCE[weight.dtype])


def _magnitudes(delta):
    """ΔW's terms by their magnitudes: |B|, |A| and |s| for factors, |ΔW| for a tensor."""
    if delta is None or isinstance(delta, torch.Tensor):
        return None if delta is None else delta.abs()
    factors = [delta] if isinstance(delta, LowRank) else delta
    return [LowRank(f.B.abs(), f.A.abs(), abs(f.scale)) for f in factors]


def test_flat_lora_noise_is_the_law_by_hand():
    W = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0]], dtype=torch.float64)
    delta = LowRank(torch.tensor([[1.0], [0.0]]), torch.tensor([[0.0, 0.0, 12.0]]), scale=0.5)
    z = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.0, -1.0]], dtype=torch.float64)
    # W' = [[3, 4, 6], [0, 0, 2]]: row norms √61 and 2, n = 3.
    want = 0.1 / math.sqrt(3) * torch.tensor([[61**0.5], [2.0]], dtype=torch.float64) * z
    torch.testing.assert_close(flat_lora_noise(W, delta, 0.1, z), want, rtol=1e-15, atol=0)
    # The same matrix stored transposed: its rows are now columns, and so is the noise.
    stored = flat_lora_noise(W.t().contiguous(), delta, 0.1, z.t().contiguous(), transposed=True)
    torch.testing.assert_close(stored, want.t(), rtol=1e-15, atol=0)
    torch.testing.assert_close(
        merged_weight(W, delta), torch.tensor([[3.0, 4, 6], [0, 0, 2]], dtype=torch.float64)
    )


def test_a_generator_gives_the_z_it_draws():
    W = torch.randn(4, 6)
    from_generator = flat_lora_noise(W, None, 0.2, torch.Generator().manual_seed(3))
    z = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))
    assert bits_equal(from_generator, flat_lora_noise(W, None, 0.2, z))


@pytest.mark.parametrize("delta", [None, "low_rank"])
def test_the_law_holds_on_a_weight_past_the_dense_row_norm_size(delta):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(300, 400, generator=g)  # 120k elements: the row-norm identity's side
    if delta:
        delta = LowRank(torch.randn(300, 4, generator=g), torch.randn(4, 400, generator=g), 0.5)
    z = draw_noise(W, torch.ones(300), generator=g, seed=11)
    fast = draw_noise(W, noise_std(W, delta, 0.1), generator=g, seed=11)
    torch.testing.assert_close(flat_lora_noise(W, delta, 0.1, z), fast, rtol=2e-5, atol=1e-7)


# -- the forward at W + ε: tests/test_reference.py compares it with FlatPerturb's --------------


def test_an_embeddings_padding_row_gets_no_noise_as_in_flat_perturb():
    torch.manual_seed(0)
    embed = nn.Embedding(6, 4, padding_idx=2)
    tokens = torch.tensor([[0, 2, 5, 2]])
    opt = flatopt.FlatPerturb(
        torch.optim.SGD(embed.parameters(), lr=0.1),
        embed,
        sigma=0.3,
        schedule="constant",
        seed=5,
        adapters=[flatopt.dense(embed)],
    )
    with opt.perturbed():
        fast = embed(tokens)
    eps = flat_lora_perturbations(embed, opt.sigma, seeded_z(opt.seed, 0), [flatopt.dense(embed)])
    assert bits_equal(eps["weight"][2], torch.zeros(4)) and eps["weight"][0].abs().sum() > 0
    torch.testing.assert_close(perturbed_forward(embed, eps, tokens), fast)


def test_targets_are_named_once_in_flatopts_order():
    model = add_lora(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), ["0", "2"])
    assert list(lora_targets(model)) == ["0.base.weight", "2.base.weight"]
    shared = nn.Linear(3, 3)
    tied = nn.Sequential(shared, nn.ReLU(), shared)  # one weight read twice: one target
    names = lora_targets(tied, [flatopt.dense(shared)])
    assert list(names) == ["0.weight"]


def test_perturbed_forward_equals_the_model_with_w_plus_p_written_in():
    model, x, _ = build("lora", torch.float32, 5, 6, 2, seed=1)
    g = torch.Generator().manual_seed(2)
    perturbations = {
        name: 0.1 * torch.randn(target.weight.shape, generator=g)
        for name, target in lora_targets(model).items()
    }
    written = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in written.named_parameters():
            if name in perturbations:
                p.add_(perturbations[name])
    assert bits_equal(perturbed_forward(model, perturbations, x).detach(), written(x).detach())
    batch = (x, torch.zeros(x.shape[0], 3))
    assert bits_equal(
        perturbed_loss(model, _loss, batch, perturbations).detach(),
        _loss(written(x), batch[1]).detach(),
    )


BAD_INPUTS = [
    (
        lambda m, x: perturbed_forward(m, {"nope": torch.zeros(1)}, x),
        ValueError,
        r"perturbations names 'nope', which is not a parameter or buffer",
    ),
    (
        lambda m, x: perturbed_forward(m, {"0.base.weight": torch.zeros(2, 2)}, x),
        ValueError,
        r"perturbations\['0\.base\.weight'\] has shape \(2, 2\), the tensor \(5, 6\)",
    ),
    (
        lambda m, x: flat_lora_noise(torch.zeros(2, 3), None, 0.1, torch.zeros(3, 2)),
        ValueError,
        r"z has shape \(3, 2\) but the weight has \(2, 3\)",
    ),
    (
        lambda m, x: flat_lora_noise(torch.zeros(2, 3), None, 0.1, 7),
        TypeError,
        r"z must be a tensor of standard normals.*got int",
    ),
    (
        lambda m, x: low_rank_perturbations(m, {"0.lora_A": LowRank(torch.ones(1), torch.ones(1))}),
        ValueError,
        r"aux_factors names '0\.lora_A', which is not a target.*\['0\.base\.weight'",
    ),
    (
        lambda m, x: bilora_clip([torch.ones(2)], 0.1),
        TypeError,
        r"aux_factors holds Tensor; pass LowRank\(B2, A2\) values or \(B2, A2\) pairs",
    ),
]


@pytest.mark.parametrize(("call", "error", "match"), BAD_INPUTS)
def test_bad_inputs_raise_naming_the_value_and_fix(call, error, match):
    model, x, _ = build("lora", torch.float32, 5, 6, 2, seed=0)
    with pytest.raises(error, match=match):
        call(model, x)


# -- Bi-LoRA ------------------------------------------------------------------------------------


@st.composite
def aux_modules(draw):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    count = draw(st.integers(1, 4))
    factors = []
    for _ in range(count):
        out, fan_in, rank = (
            draw(st.integers(1, 8)),
            draw(st.integers(1, 8)),
            draw(st.integers(1, 4)),
        )
        size = draw(st.floats(1e-3, 2.0))
        B = size * torch.randn(out, rank, generator=g, dtype=torch.float64)
        A = torch.randn(rank, fan_in, generator=g, dtype=torch.float64)
        factors.append((B, A))
    return factors


def _global_norm(factors):
    return torch.cat([(B @ A).flatten() for B, A in factors]).norm()


@given(factors=aux_modules(), rho=st.floats(1e-3, 3.0))
def test_the_clip_keeps_the_global_norm_in_the_ball_and_the_directions(factors, rho):
    before = [(B.clone(), A.clone()) for B, A in factors]
    versions = [(B._version, A._version) for B, A in factors]
    norm = _global_norm(before)
    returned = bilora_clip(factors, rho)
    torch.testing.assert_close(returned, norm, rtol=1e-12, atol=0)
    after = _global_norm(factors)
    if norm <= rho:  # inside the ball: untouched, not even rewritten
        for (B, A), (B0, A0), version in zip(factors, before, versions):
            assert bits_equal(B, B0) and bits_equal(A, A0)
            assert (B._version, A._version) == version
        return
    torch.testing.assert_close(after, torch.tensor(rho, dtype=torch.float64), rtol=1e-12, atol=0)
    for (B, A), (B0, A0) in zip(factors, before):  # every product shrinks by the same ρ/c
        torch.testing.assert_close(B @ A, (rho / norm) * (B0 @ A0), rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(B, math.sqrt(rho / norm) * B0, rtol=1e-12, atol=1e-15)


def test_the_clip_is_global_not_per_layer():
    one = (torch.full((1, 1), 3.0), torch.ones(1, 1))  # ‖BA‖ = 3
    two = (torch.full((1, 1), 4.0), torch.ones(1, 1))  # ‖BA‖ = 4: c = 5
    bilora_clip([one, two], rho=1.0)
    torch.testing.assert_close((one[0] @ one[1]).item(), 0.6)  # 3 · 1/5, not 1
    torch.testing.assert_close((two[0] @ two[1]).item(), 0.8)
    scaled = LowRank(torch.ones(1, 1), torch.ones(1, 1), scale=10.0)  # a scale counts
    assert bilora_clip({"w": scaled}, rho=20.0).item() == pytest.approx(10.0)


def _bilora_model(kind, seed=0):
    model, x, adapters = build(kind, torch.float64, 5, 6, 2, seed)
    g = torch.Generator().manual_seed(seed + 100)
    aux = {}
    for name, target in lora_targets(model, adapters).items():
        rows = target.weight.shape[1 if target.transposed else 0]
        fan_in = target.weight.numel() // rows
        B2 = nn.Parameter(0.1 * torch.randn(rows, 3, generator=g, dtype=torch.float64))
        A2 = nn.Parameter(0.1 * torch.randn(3, fan_in, generator=g, dtype=torch.float64))
        aux[name] = LowRank(B2, A2)
    with torch.no_grad():
        y = torch.randn(model(x).shape, generator=g, dtype=torch.float64)
    return model, x, y, adapters, aux


def _merged_gradient(model, batch, aux, adapters):
    """G = ∂L/∂W at W + s·B₁A₁ + B₂A₂, in each target's logical layout, by a leaf P."""
    targets = lora_targets(model, adapters)
    leaves = {
        name: p.detach().requires_grad_()
        for name, p in low_rank_perturbations(model, aux, adapters).items()
    }
    loss = perturbed_loss(model, _loss, batch, leaves)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    out = {}
    for name, grad in zip(leaves, grads):
        g = grad.transpose(0, 1) if targets[name].transposed else grad
        out[name] = g.reshape(g.shape[0], -1)
    return out


@pytest.mark.parametrize("kind", ["lora", "transposed", "conv"])
def test_the_aux_factors_get_the_merged_gradient_through_their_product(kind):
    model, x, y, adapters, aux = _bilora_model(kind)
    G = _merged_gradient(model, (x, y), aux, adapters)
    bilora_loss(model, _loss, (x, y), aux, adapters).backward()
    for name, factor in aux.items():  # ∂L/∂B₂ = G·A₂ᵀ and ∂L/∂A₂ = B₂ᵀ·G (paper, eq. 2)
        torch.testing.assert_close(factor.B.grad, G[name] @ factor.A.detach().t())
        torch.testing.assert_close(factor.A.grad, factor.B.detach().t() @ G[name])


@pytest.mark.parametrize("separate", [True, False])
@pytest.mark.parametrize("rho", [100.0, 0.05])
def test_one_bilora_step_is_the_papers_update_then_the_clip(rho, separate):
    model, x, y, adapters, aux = _bilora_model("lora", seed=3)
    lr = 0.1
    G = _merged_gradient(model, (x, y), aux, adapters)
    layers = {name: t.module for name, t in lora_targets(model, adapters).items()}
    want = {}
    for name, factor in aux.items():  # eq. 9, with the LoRA scaling s on the primary branch
        lora = next(m for m in model.modules() if getattr(m, "base", None) is layers[name])
        s, A1, B1 = lora.scaling, lora.lora_A.detach(), lora.lora_B.detach()
        B2, A2 = factor.B.detach(), factor.A.detach()
        want[name] = {
            "B1": B1 - lr * s * G[name] @ A1.t(),
            "A1": A1 - lr * s * B1.t() @ G[name],
            "B2": B2 + lr * G[name] @ A2.t(),
            "A2": A2 + lr * B2.t() @ G[name],
            "lora": lora,
        }
    norm = _global_norm([(w["B2"], w["A2"]) for w in want.values()])
    shrink = math.sqrt(rho / norm) if norm > rho else 1.0
    main = [p for p in model.parameters() if p.requires_grad]
    ascent = [t for f in aux.values() for t in (f.B, f.A)]
    if separate:
        opt = torch.optim.SGD(main, lr=lr)
        aux_opt = torch.optim.SGD(ascent, lr=lr, maximize=True)
    else:  # one optimizer, the auxiliary factors in a maximize=True group
        opt = torch.optim.SGD([{"params": main}, {"params": ascent, "maximize": True}], lr=lr)
        aux_opt = None
    bilora_step(model, _loss, (x, y), opt, aux, rho, aux_optimizer=aux_opt, adapters=adapters)
    for name, w in want.items():
        torch.testing.assert_close(w["lora"].lora_B.detach(), w["B1"])
        torch.testing.assert_close(w["lora"].lora_A.detach(), w["A1"])
        torch.testing.assert_close(aux[name].B.detach(), shrink * w["B2"])
        torch.testing.assert_close(aux[name].A.detach(), shrink * w["A2"])
    assert _global_norm([(f.B, f.A) for f in aux.values()]) <= rho * (1 + 1e-12)


def test_bilora_step_needs_the_aux_factors_in_an_ascending_group():
    model, x, y, adapters, aux = _bilora_model("lora")
    main = [p for p in model.parameters() if p.requires_grad]
    ascent = [t for f in aux.values() for t in (f.B, f.A)]
    descent = torch.optim.SGD(main + ascent, lr=0.1)
    with pytest.raises(ValueError, match=r"\.B is in param group 0 with maximize=False"):
        bilora_step(model, _loss, (x, y), descent, aux, 0.05, adapters=adapters)
    with pytest.raises(ValueError, match=r"\.B is in no param group of the optimizers"):
        bilora_step(model, _loss, (x, y), torch.optim.SGD(main, lr=0.1), aux, 0.05)
    assert all(p.grad is None for p in main + ascent)  # refused before any backward
