"""The noise law: schedules, seeds, row norms, and the law itself.

Statistical tests use fixed seeds, so they are deterministic; each tolerance is derived from the
sample size in a comment next to it (6 standard errors unless said otherwise, i.e. a two-sided
normal tail of 2e-9: a correct implementation passes for essentially every seed, a wrong law
fails by a wide margin).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

import flatopt
from flatopt import FlatPerturb, LowRank
from flatopt.lora import add_lora
from flatopt.noise import (
    derive_seed,
    draw_noise,
    noise_std,
    perturbed_weight,
    row_norms,
    schedule_factor,
)

Z = 6.0  # standard errors allowed by every statistical bound below


def _generator(seed: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def _randn(generator: torch.Generator, *shape: int, dtype=torch.float32, device="cpu") -> Tensor:
    """Drawn on the CPU from ``generator`` and moved to ``device``: the same values anywhere."""
    # Clamped so that property inputs stay bounded whatever the seed.
    z = torch.randn(*shape, generator=generator, dtype=torch.float64).clamp(-4, 4)
    return z.to(device, dtype)


def _noise_generator(device: str, seed: int = 0) -> torch.Generator:
    """A generator on ``device``, for the noise itself (the law draws z where W lives)."""
    return torch.Generator(device=device).manual_seed(seed)


def _row_rms(eps: Tensor) -> Tensor:
    """Per-row RMS of a (rows, n) sample whose mean is known to be 0: the sample std."""
    return eps.double().square().mean(dim=1).sqrt()


def _merged_case(out: int, fan_in: int, rank: int, seed: int, dtype=torch.float32, device="cpu"):
    """W, B, A with ‖W_i‖ ≈ 1 and ‖W'_i‖ ≈ √(1 + c_i²), c_i from 0 to 4 along the rows.

    So the merged norms differ from the base norms by a factor from 1 to ≈ 4.1.
    """
    generator = _generator(seed)
    W = _randn(generator, out, fan_in, dtype=torch.float64) / math.sqrt(fan_in)
    A = _randn(generator, rank, fan_in, dtype=torch.float64) / math.sqrt(fan_in)
    c = torch.linspace(0, 4, out, dtype=torch.float64)[:, None]
    B = _randn(generator, out, rank, dtype=torch.float64) / math.sqrt(rank) * c
    return W.to(device, dtype), B.to(device, dtype), A.to(device, dtype)


def _dense_norms(W: Tensor, factors=()) -> Tensor:
    """The slow reference: ‖W + Σ s·B@A‖ per row of the logical (out, fan_in) matrix, in fp64."""
    merged = W.detach().double().reshape(W.shape[0], -1)
    for f in factors:
        B = f.B.detach().double().reshape(f.B.shape[0], -1)
        A = f.A.detach().double().reshape(f.A.shape[0], -1)
        merged = merged + f.scale * (B @ A)
    return torch.linalg.vector_norm(merged, dim=1)


# -- schedules -------------------------------------------------------------------------------

total_steps = st.integers(1, 10**6)


@given(total=total_steps, beyond=st.integers(0, 10**6))
def test_cosine_is_exactly_zero_at_start_and_exactly_one_from_total_steps_on(total, beyond):
    assert schedule_factor("cosine", 0, total) == 0.0
    assert schedule_factor("cosine", total + beyond, total) == 1.0


@given(data=st.data(), total=total_steps)
def test_cosine_is_half_one_minus_cos_of_pi_t_over_T(data, total):
    step = data.draw(st.integers(0, total))
    # ½(1 − cos θ) = sin²(θ/2): an independent form of the same value, to 1e-12.
    expected = math.sin(math.pi * step / (2 * total)) ** 2
    factor = schedule_factor("cosine", step, total)
    assert abs(factor - expected) <= 1e-12
    assert 0.0 <= factor <= 1.0
    if step < total:
        assert schedule_factor("cosine", step + 1, total) >= factor


@given(total=total_steps, step=st.integers(0, 3 * 10**6))
def test_linear_is_min_t_T_over_T(total, step):
    assert schedule_factor("linear", step, total) == pytest.approx(
        min(step, total) / total, rel=1e-15, abs=0
    )


@given(step=st.integers(0, 10**9), total=st.one_of(st.none(), total_steps))
def test_constant_is_one(step, total):
    assert schedule_factor("constant", step, total) == 1.0


def test_callable_schedule_is_used_as_is():
    seen = []

    def schedule(step):
        seen.append(step)
        return 0.125 * step

    assert [schedule_factor(schedule, t, None) for t in (0, 3, 17)] == [0.0, 0.375, 2.125]
    assert schedule_factor(schedule, 5, 2) == 0.625  # total_steps does not clip a callable
    assert seen == [0, 3, 17, 5]
    assert schedule_factor(lambda step: 2, 0, None) == 2.0


@pytest.mark.parametrize(
    ("schedule", "total", "match"),
    [
        ("cosin", 10, r"Unknown schedule 'cosin'"),
        ("Cosine", 10, r"Unknown schedule 'Cosine'"),
        ("cosine", None, r"schedule='cosine' needs total_steps"),
        ("linear", None, r"schedule='linear' needs total_steps"),
        ("linear", 0, r"schedule='linear' needs total_steps >= 1.*got 0"),
        (lambda step: -0.5, None, r"returned -0\.5.*finite factor >= 0"),
        (lambda step: float("nan"), None, r"returned nan.*finite factor >= 0"),
        (lambda step: float("inf"), 10, r"returned inf.*finite factor >= 0"),
    ],
)
def test_schedule_errors(schedule, total, match):
    with pytest.raises(ValueError, match=match):
        schedule_factor(schedule, 1, total)


# -- derive_seed -----------------------------------------------------------------------------

seed_args = st.tuples(
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**40),
    st.integers(0, 1000),
    st.integers(0, 10**5),
    st.integers(0, 4096),
)


@given(args=seed_args)
def test_derive_seed_is_deterministic_and_fits_in_63_bits(args):
    seed = derive_seed(*args)
    assert isinstance(seed, int)
    assert seed == derive_seed(*args)
    assert 0 <= seed < 2**63


@given(args=seed_args, position=st.integers(1, 4))
def test_derive_seed_differs_for_neighbouring_steps_draws_targets_and_ranks(args, position):
    neighbour = list(args)
    neighbour[position] += 1
    a, b = derive_seed(*args), derive_seed(*neighbour)
    assert a != b
    # torch's CPU generator keeps only the low 32 bits of a seed: they must differ too.
    assert a & 0xFFFFFFFF != b & 0xFFFFFFFF


@given(seed=st.integers(0, 2**63), first=st.integers(0, 100), second=st.integers(0, 100))
def test_derive_seed_depends_on_which_argument_holds_a_value(seed, first, second):
    if first != second:
        assert derive_seed(seed, first, 0, second) != derive_seed(seed, second, 0, first)
    assert derive_seed(seed, 0, 0, 1) != derive_seed(seed, 0, 1, 0)
    assert derive_seed(seed, 0, 0, 0, 1) != derive_seed(seed, 0, 0, 1, 0)


# -- row_norms -------------------------------------------------------------------------------

LAYOUTS = ("linear", "transposed", "conv", "conv_flat_A")
FLOAT_DTYPES = st.sampled_from([torch.float32, torch.float64])


def _build_weight(layout: str, out: int, fan_in: int, kernel: int, generator, dtype, device):
    """Return (the weight as stored, its logical (out, n) view, whether it is transposed)."""
    like = {"dtype": dtype, "device": device}
    if layout.startswith("conv"):
        weight = _randn(generator, out, fan_in, kernel, kernel, **like)
        return weight, weight.reshape(out, -1), False
    if layout == "transposed":
        weight = _randn(generator, fan_in, out, **like)
        return weight, weight.t(), True
    weight = _randn(generator, out, fan_in, **like)
    return weight, weight, False


def _condition(logical: Tensor, factors=()) -> Tensor:
    """S_i = ‖W_i‖ + Σ_q |s|·|B_iq|·‖A_q‖, the size of the terms the identity adds up.

    ΔW_i = Σ_q s·B_iq·A_q can cancel across q (e.g. r > n), so ‖ΔW_i‖ alone understates them.
    """
    size = _dense_norms(logical)
    for f in factors:
        B = f.B.detach().double().reshape(f.B.shape[0], -1)
        A = f.A.detach().double().reshape(f.A.shape[0], -1)
        size = size + abs(f.scale) * (B.abs() @ torch.linalg.vector_norm(A, dim=1))
    return size


def _assert_norms_close(actual: Tensor, expected: Tensor, size: Tensor, terms: int, dtype):
    """``assert_close`` of the norms, and of their squares at the identity's own error scale.

    ‖W_i‖², the cross term and the quadratic term are each sums of at most ``terms`` (n + r)
    products bounded by S_i², so each is off by ≲ terms·eps·S_i² (over 20000 random cases the
    total stayed below 1.4·terms·eps·S_i²); allow 8·terms·eps·max S². A norm is then off by at
    most the square root of that where W'_i cancels to 0 (atol), and by ≲ 8·terms·eps
    relatively elsewhere (rtol).
    """
    eps = torch.finfo(dtype).eps
    square_atol = 8 * terms * eps * float(size.max()) ** 2
    assert actual.dtype == dtype and actual.shape == expected.shape
    torch.testing.assert_close(
        actual, expected.to(dtype), rtol=8 * terms * eps, atol=math.sqrt(square_atol)
    )
    torch.testing.assert_close(
        actual.double().square(), expected.double().square(), rtol=0, atol=square_atol
    )


@given(
    layout=st.sampled_from(LAYOUTS),
    dtype=FLOAT_DTYPES,
    out=st.integers(1, 12),
    fan_in=st.integers(1, 12),
    kernel=st.integers(1, 3),
    ranks=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    scales=st.lists(st.floats(-4, 4, allow_nan=False), min_size=3, max_size=3),
    as_list=st.booleans(),
    b_4d=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_row_norms_low_rank_identity_matches_dense(
    layout, dtype, out, fan_in, kernel, ranks, scales, as_list, b_4d, seed, device
):
    generator = _generator(seed)
    like = {"dtype": dtype, "device": device}
    weight, logical, transposed = _build_weight(layout, out, fan_in, kernel, generator, **like)
    n = logical.shape[1]
    factors = []
    for rank, scale in zip(ranks, scales):
        B = _randn(generator, out, rank, **like)
        if layout.startswith("conv") and b_4d:
            B = B.reshape(out, rank, 1, 1)  # a 1×1 conv as LoRA B
        if layout == "conv":
            A = _randn(generator, rank, fan_in, kernel, kernel, **like)
        else:
            A = _randn(generator, rank, n, **like)
        factors.append(LowRank(B, A, scale))
    delta = factors if as_list or len(factors) > 1 else factors[0]

    actual = row_norms(weight, delta, transposed=transposed)

    expected = _dense_norms(logical, factors)
    assert actual.shape == (out,)
    _assert_norms_close(actual, expected, _condition(logical, factors), n + sum(ranks), dtype)


@given(
    layout=st.sampled_from(("linear", "transposed", "conv")),
    dtype=FLOAT_DTYPES,
    out=st.integers(1, 12),
    fan_in=st.integers(1, 12),
    kernel=st.integers(1, 3),
    scale=st.floats(-4, 4, allow_nan=False),
    seed=st.integers(0, 2**32 - 1),
)
def test_row_norms_tensor_delta_matches_dense(
    layout, dtype, out, fan_in, kernel, scale, seed, device
):
    generator = _generator(seed)
    like = {"dtype": dtype, "device": device}
    weight, logical, transposed = _build_weight(layout, out, fan_in, kernel, generator, **like)
    delta = scale * _randn(generator, *weight.shape, **like)  # in the storage layout
    logical_delta = delta.t() if transposed else delta.reshape(out, -1)

    actual = row_norms(weight, delta, transposed=transposed)

    expected = torch.linalg.vector_norm(logical.double() + logical_delta.double(), dim=1)
    size = torch.linalg.vector_norm(logical.double().abs() + logical_delta.double().abs(), dim=1)
    _assert_norms_close(actual, expected, size, logical.shape[1], dtype)


@given(
    layout=st.sampled_from(LAYOUTS),
    dtype=FLOAT_DTYPES,
    out=st.integers(1, 10),
    fan_in=st.integers(1, 10),
    rank=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
)
def test_row_norms_base_sq_cache_is_equivalent_and_is_used(
    layout, dtype, out, fan_in, rank, seed, device
):
    generator = _generator(seed)
    like = {"dtype": dtype, "device": device}
    weight, logical, transposed = _build_weight(layout, out, fan_in, 2, generator, **like)
    n = logical.shape[1]
    factor = LowRank(_randn(generator, out, rank, **like), _randn(generator, rank, n, **like))
    base_sq = _dense_norms(logical).square().to(dtype)

    cached = row_norms(weight, factor, transposed=transposed, base_sq=base_sq)
    fresh = row_norms(weight, factor, transposed=transposed)
    size = _condition(logical, [factor])
    _assert_norms_close(cached, fresh.double(), size, n + rank, dtype)
    _assert_norms_close(cached, _dense_norms(logical, [factor]), size, n + rank, dtype)

    # The cache is trusted, not recomputed: a cache of 4·‖W_i‖² doubles the norms of W.
    doubled = row_norms(weight, None, transposed=transposed, base_sq=4 * base_sq)
    _assert_norms_close(doubled, 2 * _dense_norms(logical), 2 * _dense_norms(logical), n, dtype)


@pytest.mark.parametrize("delta", [None, []], ids=["None", "empty-list"])
def test_row_norms_without_delta_are_the_base_norms(delta, device):
    W = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, -2.0]], device=device)
    expected = torch.tensor([5.0, 2.0], device=device)
    assert torch.equal(row_norms(W, delta), expected)
    assert torch.equal(row_norms(W.t(), delta, transposed=True), expected)


@given(
    layout=st.sampled_from(LAYOUTS),
    out=st.integers(1, 10),
    fan_in=st.integers(1, 10),
    rank=st.integers(1, 4),
    sigma=st.one_of(st.just(0.0), st.floats(1e-6, 1)),  # no subnormal σ: atol scales with σ
    seed=st.integers(0, 2**32 - 1),
)
def test_noise_std_is_sigma_row_norm_over_sqrt_fan_in_without_gradient(
    layout, out, fan_in, rank, sigma, seed, device
):
    generator = _generator(seed)
    like = {"dtype": torch.float64, "device": device}
    weight, logical, transposed = _build_weight(layout, out, fan_in, 2, generator, **like)
    n = logical.shape[1]
    B = _randn(generator, out, rank, **like).requires_grad_()
    A = _randn(generator, rank, n, **like).requires_grad_()
    factor = LowRank(B, A, 0.5)

    std = noise_std(weight, factor, sigma, transposed=transposed)

    expected = sigma * _dense_norms(logical, [factor]) / math.sqrt(n)
    assert not std.requires_grad  # the row norms are constants
    size = sigma * _condition(logical, [factor]) / math.sqrt(n)
    _assert_norms_close(std, expected, size, n + rank, torch.float64)


# -- the law, statistically ------------------------------------------------------------------

OUT, FAN_IN, RANK, SIGMA = 64, 4096, 4, 0.05
# Per-row RMS over n = 4096 draws: relative standard error 1/√(2n) = 0.011, so each row is
# allowed 6·0.011 ≈ 0.066; the mean of the 64 row ratios has standard error 0.011/8 = 0.0014,
# allowed 6·0.0014 ≈ 0.0083.
ROW_TOL = Z / math.sqrt(2 * FAN_IN)
MEAN_TOL = Z / math.sqrt(2 * FAN_IN * OUT)


def _law_noise(device):
    """ε for the merged case with OUT × FAN_IN weights, plus W and the LoRA factor."""
    W, B, A = _merged_case(OUT, FAN_IN, RANK, seed=11, device=device)
    factor = LowRank(B, A, 1.0)
    std = noise_std(W, factor, SIGMA)
    eps = draw_noise(W, std, generator=_noise_generator(device), seed=derive_seed(0, 0))
    return eps, W, factor


def _assert_row_std(eps: Tensor, expected_std: Tensor, row_tol: float, mean_tol: float):
    ratio = _row_rms(eps) / expected_std.double()
    assert (ratio - 1).abs().max() <= row_tol, ratio
    assert abs(ratio.mean() - 1) <= mean_tol, ratio.mean()


def test_row_std_follows_the_merged_norm_not_the_base_norm(device):
    eps, W, factor = _law_noise(device)
    merged = SIGMA * _dense_norms(W, [factor]) / math.sqrt(FAN_IN)
    base = SIGMA * _dense_norms(W) / math.sqrt(FAN_IN)
    assert (merged / base).max() > 3  # the case really separates the two laws

    _assert_row_std(eps, merged, ROW_TOL, MEAN_TOL)
    # The same check rejects the base-norm law by a wide margin.
    assert (_row_rms(eps) / base - 1).abs().max() > 10 * ROW_TOL


def test_noise_has_mean_zero_and_a_gaussian_shape(device):
    eps, W, factor = _law_noise(device)
    z = (eps.double() / (SIGMA * _dense_norms(W, [factor]) / math.sqrt(FAN_IN))[:, None]).flatten()
    count = z.numel()  # N = 262144
    # Mean of N unit normals: standard error 1/√N ≈ 0.002; per row 1/√n ≈ 0.016.
    assert abs(z.mean()) <= Z / math.sqrt(count)
    assert z.view(OUT, FAN_IN).mean(1).abs().max() <= Z / math.sqrt(FAN_IN)
    # Standardized moments of a normal sample: skewness 0 ± √(6/N) ≈ 0.0048, kurtosis 3 ± √(24/N)
    # ≈ 0.0096 (a uniform law would give 1.8, a Laplace one 6).
    centred = z - z.mean()
    variance = centred.square().mean()
    skewness = centred.pow(3).mean() / variance**1.5
    kurtosis = centred.pow(4).mean() / variance**2
    assert abs(skewness) <= Z * math.sqrt(6 / count)
    assert abs(kurtosis - 3) <= Z * math.sqrt(24 / count)
    # Kolmogorov–Smirnov against N(0, 1): P(√N·D > 2.5) ≈ 2·exp(−2·2.5²) ≈ 7e-6.
    ordered = z.sort().values
    cdf = torch.special.ndtr(ordered)
    ranks = torch.arange(1, count + 1, dtype=torch.float64, device=z.device)
    ks = torch.maximum(ranks / count - cdf, cdf - (ranks - 1) / count).max()
    assert ks * math.sqrt(count) <= 2.5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_weights_follow_the_law(dtype, device):
    W, B, A = _merged_case(OUT, FAN_IN, RANK, seed=12, dtype=dtype, device=device)
    factor = LowRank(B, A, 1.0)
    std = noise_std(W, factor, SIGMA)
    generator = _noise_generator(device)
    perturbed = perturbed_weight(W, std, generator=generator, seed=derive_seed(3, 0))
    assert perturbed.dtype == dtype and perturbed.shape == W.shape
    eps = perturbed.double() - W.double()  # exact: both are low-precision numbers

    expected = SIGMA * _dense_norms(W, [factor]) / math.sqrt(FAN_IN)
    # Looser than fp32: besides the sampling error, W + ε is rounded to bf16/fp16 (an error of
    # up to 2⁻⁸·|W| per entry in bf16, which adds < 0.3% to the variance), z is drawn in the
    # weight's dtype and W·Aᵀ is computed in it. Over 20 seeds these moved the mean ratio by
    # ≤ 0.2%; allow 0.01 more per row and 0.005 more on the mean.
    _assert_row_std(eps, expected, ROW_TOL + 0.01, MEAN_TOL + 0.005)
    assert (_row_rms(eps) / (SIGMA * _dense_norms(W) / math.sqrt(FAN_IN)) - 1).abs().max() > 1


def test_perturbed_weight_and_draw_noise_share_the_same_z(device):
    W, B, A = _merged_case(16, 64, 2, seed=13, device=device)
    std = noise_std(W, LowRank(B, A, 1.0), 0.1)
    eps = draw_noise(W, std, generator=_noise_generator(device), seed=77)
    perturbed = perturbed_weight(W, std, generator=_noise_generator(device), seed=77)
    # W + ε rounded once to fp32: the difference is exact to ulp(|W| + |ε|).
    torch.testing.assert_close(perturbed, W + eps, rtol=0, atol=1e-6)


def test_transposed_layout_scales_the_logical_rows(device):
    W, B, A = _merged_case(OUT, FAN_IN, RANK, seed=14, device=device)
    factor = LowRank(B, A, 1.0)
    stored = W.t().contiguous()  # (fan_in, out), as GPT-2's Conv1D
    std = noise_std(stored, factor, SIGMA, transposed=True)
    eps = draw_noise(stored, std, transposed=True, generator=_noise_generator(device), seed=5)
    assert eps.shape == stored.shape

    expected = SIGMA * _dense_norms(W, [factor]) / math.sqrt(FAN_IN)
    _assert_row_std(eps.t(), expected, ROW_TOL, MEAN_TOL)


def test_conv_layout_scales_the_output_channels(device):
    out, channels, kernel, rank = OUT, 64, 8, 3  # n = 64·8·8 = 4096
    generator = _generator(15)
    weight = _randn(generator, out, channels, kernel, kernel) / math.sqrt(FAN_IN)
    weight = weight * torch.linspace(0.5, 4, out)[:, None, None, None]  # rows of unequal norm
    A = _randn(generator, rank, channels, kernel, kernel) / math.sqrt(FAN_IN)
    B = _randn(generator, out, rank)
    weight, A, B = weight.to(device), A.to(device), B.to(device)
    factor = LowRank(B, A, 0.5)
    std = noise_std(weight, factor, SIGMA)
    eps = draw_noise(weight, std, generator=_noise_generator(device), seed=6)
    assert eps.shape == weight.shape

    expected = SIGMA * _dense_norms(weight, [factor]) / math.sqrt(FAN_IN)
    _assert_row_std(eps.reshape(out, -1), expected, ROW_TOL, MEAN_TOL)


def test_proposition_3_2_output_variance_for_a_fixed_input(device):
    """Var_ε[((W+ε)x)_i] = σ²·‖W_i‖²·‖x‖²/n for a fixed x."""
    out, fan_in, sigma, draws = 32, 64, 0.1, 3000
    generator = _generator(16)
    W = (
        _randn(generator, out, fan_in, dtype=torch.float64)
        * torch.linspace(0.2, 3, out, dtype=torch.float64)[:, None]
    ).to(device)
    x = _randn(generator, fan_in, dtype=torch.float64, device=device)
    std = noise_std(W, None, sigma)
    noise_gen = _noise_generator(device)
    outputs = torch.stack(
        [
            perturbed_weight(W, std, generator=noise_gen, seed=derive_seed(4, k)) @ x
            for k in range(draws)
        ]
    )
    variance = (outputs - W @ x).square().mean(0)  # the mean W·x is known

    expected = sigma**2 * _dense_norms(W).square() * x.square().sum() / fan_in
    # A variance estimated from K = 3000 draws with known mean: relative standard error
    # √(2/K) ≈ 0.026, so 0.155 per row and 0.026/√32 ≈ 0.0046 → 0.028 on the mean ratio.
    ratio = variance / expected
    assert (ratio - 1).abs().max() <= Z * math.sqrt(2 / draws)
    assert abs(ratio.mean() - 1) <= Z * math.sqrt(2 / draws / out)


@pytest.mark.parametrize("fan_in", [8, 256])
def test_proposition_3_2_output_variance_grows_by_one_plus_sigma_squared(fan_in, device):
    """Averaged over x ~ N(0, I): E‖(W+ε)x‖² = (1 + σ²)·E‖Wx‖², whatever n is."""
    out, sigma, draws = 32, 0.5, 2000
    generator = _generator(17 + fan_in)
    W = (_randn(generator, out, fan_in) * torch.linspace(0.2, 3, out)[:, None]).to(device)
    std = noise_std(W, None, sigma)
    noise_gen = _noise_generator(device)
    noisy, clean = [], []
    for k in range(draws):
        x = _randn(generator, fan_in, device=device)
        Wp = perturbed_weight(W, std, generator=noise_gen, seed=derive_seed(5, k, 0, fan_in))
        noisy.append((Wp @ x).double().square().sum())
        clean.append((W @ x).double().square().sum())
    noisy, clean = torch.stack(noisy), torch.stack(clean)
    ratio = noisy.sum() / clean.sum()
    # Standard error of a ratio of means (delta method): std(a − R·b) / (√K · mean(b)).
    stderr = (noisy - ratio * clean).std() / (math.sqrt(draws) * clean.mean())
    assert stderr < 0.03  # small enough to tell 1 + σ² = 1.25 from 1 or from 1 + n·σ²
    assert abs(ratio - (1 + sigma**2)) <= Z * stderr, (ratio, stderr)


def test_same_seed_gives_identical_noise(device):
    W, B, A = _merged_case(32, 128, 2, seed=18, device=device)
    std = noise_std(W, LowRank(B, A, 1.0), SIGMA)
    seed = derive_seed(9, 3, 0, 1)
    first = draw_noise(W, std, generator=_noise_generator(device), seed=seed)
    used = _noise_generator(device, 1234)
    torch.empty(7, device=device).normal_(generator=used)  # a generator in some other state
    again = draw_noise(W, std, generator=used, seed=seed)  # the state is reset by the seed
    assert torch.equal(first, again)
    assert torch.equal(
        perturbed_weight(W, std, generator=_noise_generator(device), seed=seed),
        perturbed_weight(W, std, generator=_noise_generator(device), seed=seed),
    )
    other = draw_noise(W, std, generator=_noise_generator(device), seed=seed + 1)
    assert not torch.equal(first, other)


@pytest.mark.parametrize(
    "other",
    [(1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1)],
    ids=["next-step", "next-draw", "next-target", "next-rank"],
)
def test_noise_of_other_steps_draws_targets_and_ranks_is_uncorrelated(other, device):
    W = torch.ones(OUT, FAN_IN, device=device)  # unit std: ε is z itself
    std = torch.ones(OUT, device=device)
    seed = 2024
    generator = _noise_generator(device)
    first = draw_noise(W, std, generator=generator, seed=derive_seed(seed, 0, 0, 0, 0))
    second = draw_noise(W, std, generator=generator, seed=derive_seed(seed, *other))
    # Sample correlation of N = 262144 independent pairs: standard error 1/√N ≈ 0.002.
    correlation = torch.corrcoef(torch.stack([first.flatten(), second.flatten()]).double())[0, 1]
    assert abs(correlation) <= Z / math.sqrt(first.numel())


# -- through the real wrapper ----------------------------------------------------------------

E2E_OUT, E2E_IN = 64, 512
# Per-row RMS over n = 512 entries: relative standard error 1/√(2·512) ≈ 0.031, so 0.19 per
# row; the mean of the 64 row ratios: 0.031/8 ≈ 0.0039, so 0.023.
E2E_ROW_TOL = Z / math.sqrt(2 * E2E_IN)
E2E_MEAN_TOL = Z / math.sqrt(2 * E2E_IN * E2E_OUT)


def _lora_model(seed: int = 21, dtype: torch.dtype = torch.float32, device="cpu") -> nn.Sequential:
    """One LoRALinear (bias-free base, scaling 1) whose B is nonzero, so that W' ≠ W."""
    W, B, A = _merged_case(E2E_OUT, E2E_IN, RANK, seed=seed, dtype=dtype, device=device)
    base = nn.Linear(E2E_IN, E2E_OUT, bias=False, dtype=dtype, device=device)
    model = add_lora(nn.Sequential(base), ["0"], rank=RANK, alpha=RANK)
    layer = model[0]
    with torch.no_grad():
        layer.base.weight.copy_(W)
        layer.lora_A.copy_(A)
        layer.lora_B.copy_(B)
    return model


def _wrap(model: nn.Module, **kwargs) -> FlatPerturb:
    inner = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    kwargs = {"schedule": "constant", "sigma": 0.1, "seed": 7, **kwargs}
    return FlatPerturb(inner, model, **kwargs)


def _read_noise(opt: FlatPerturb, model: nn.Module) -> Tensor:
    """ε of one perturb(), read off the base layer's output for the identity input.

    With x = I and no bias, ``base(x)`` is Wᵀ exactly, so perturbed minus clean output is εᵀ
    (up to the rounding of W + ε, ≲ 1e-7 relative).
    """
    module = model[0].base
    eye = torch.eye(module.weight.shape[1], dtype=module.weight.dtype, device=module.weight.device)
    outputs = []
    handle = module.register_forward_hook(lambda mod, args, out: outputs.append(out.clone()))
    try:
        with torch.no_grad():
            model(eye)
            with opt.perturbed():
                model(eye)
    finally:
        handle.remove()
    clean, noisy = outputs
    return (noisy.double() - clean.double()).t()


def _merged_std(model: nn.Module, sigma: float) -> Tensor:
    layer = model[0]
    merged = layer.base.weight.detach().double() + layer.scaling * (
        layer.lora_B.detach().double() @ layer.lora_A.detach().double()
    )
    return sigma * torch.linalg.vector_norm(merged, dim=1) / math.sqrt(merged.shape[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_wrapper_noise_row_std_follows_the_merged_weight(dtype, device):
    model = _lora_model(dtype=dtype, device=device)
    opt = _wrap(model, sigma=0.1)
    eps = _read_noise(opt, model)

    expected = _merged_std(model, 0.1)
    # bf16: the rounding slack of test_low_precision_weights_follow_the_law.
    slack = (0.01, 0.005) if dtype == torch.bfloat16 else (0, 0)
    _assert_row_std(eps, expected, E2E_ROW_TOL + slack[0], E2E_MEAN_TOL + slack[1])
    base = 0.1 * torch.linalg.vector_norm(model[0].base.weight.double(), dim=1) / math.sqrt(E2E_IN)
    assert (_row_rms(eps) / base - 1).abs().max() > 10 * E2E_ROW_TOL  # base norms are rejected
    # Centred, with a normal kurtosis (N = 32768: 6/√N ≈ 0.033 and 6·√(24/N) ≈ 0.16).
    z = (eps / expected[:, None]).flatten()
    assert abs(z.mean()) <= Z / math.sqrt(z.numel())
    assert abs((z - z.mean()).pow(4).mean() / z.var() ** 2 - 3) <= Z * math.sqrt(24 / z.numel())


def test_wrapper_noise_is_the_pure_law_of_seed_step_and_target(device):
    """The production path regenerates exactly the reference ε = draw_noise(W, std, seed)."""
    model = _lora_model(device=device)
    opt = _wrap(model, sigma=0.1, seed=31)
    eps = _read_noise(opt, model)

    layer = model[0]
    std = noise_std(layer.base.weight, layer.low_rank(), 0.1)
    reference = draw_noise(
        layer.base.weight, std, generator=_noise_generator(device), seed=derive_seed(31, 0, 0, 0, 0)
    )
    # ε read back as fl(W + ε) − W: off by at most ulp(|W| + |ε|) ≈ 1e-7·4.
    torch.testing.assert_close(eps, reference.double(), rtol=0, atol=1e-6)


def test_cosine_schedule_leaves_step_zero_unperturbed(device):
    model = _lora_model(device=device)
    opt = _wrap(model, schedule="cosine", total_steps=10)
    x = _randn(_generator(22), 8, E2E_IN, device=device)
    with torch.no_grad():
        clean = model(x)
        assert opt.sigma == 0.0
        with opt.perturbed():
            at_start = model(x)
        opt.step()
        with opt.perturbed():
            after_one_step = model(x)
    assert torch.equal(at_start, clean)
    assert not torch.equal(after_one_step, clean)  # the check can see noise when there is some


@pytest.mark.parametrize(
    ("schedule", "factor"),
    [
        ("cosine", lambda t, T: math.sin(math.pi * min(t, T) / (2 * T)) ** 2),
        ("linear", lambda t, T: min(t, T) / T),
        ("constant", lambda t, T: 1.0),
        (lambda t: 1 / (1 + t), lambda t, T: 1 / (1 + t)),
    ],
    ids=["cosine", "linear", "constant", "callable"],
)
def test_sigma_and_the_noise_follow_the_schedule(schedule, factor, device):
    model = _lora_model(device=device)
    total, sigma = 4, 0.2
    opt = _wrap(model, schedule=schedule, total_steps=total, sigma=sigma)
    for t in range(total + 3):
        assert opt.num_steps == t
        assert opt.sigma == pytest.approx(sigma * factor(t, total), rel=1e-12, abs=1e-15)
        if t in (1, total):
            eps = _read_noise(opt, model)
            _assert_row_std(eps, _merged_std(model, opt.sigma), E2E_ROW_TOL, E2E_MEAN_TOL)
        opt.step()  # no gradients: the weights stay, only the schedule advances


def test_resample_step_reuses_the_noise_until_step(device):
    model = _lora_model(device=device)
    opt = _wrap(model, resample="step")
    first, second = _read_noise(opt, model), _read_noise(opt, model)
    assert torch.equal(first, second)
    opt.step()
    assert not torch.equal(first, _read_noise(opt, model))


def test_resample_call_draws_fresh_noise_at_every_perturb(device):
    model = _lora_model(device=device)
    opt = _wrap(model, resample="call")
    first, second = _read_noise(opt, model), _read_noise(opt, model)
    assert not torch.equal(first, second)
    # Fresh and independent, not a rescaled copy (N = 32768 pairs: 6/√N ≈ 0.033).
    correlation = torch.corrcoef(torch.stack([first.flatten(), second.flatten()]))[0, 1]
    assert abs(correlation) <= Z / math.sqrt(first.numel())
    _assert_row_std(second, _merged_std(model, 0.1), E2E_ROW_TOL, E2E_MEAN_TOL)


def _global_rng_states(device: str) -> list[Tensor]:
    """torch's default generators: the CPU one, and the current CUDA device's on CUDA."""
    states = [torch.get_rng_state()]
    if device == "cuda":
        states.append(torch.cuda.get_rng_state())
    return states


@pytest.mark.parametrize("seed", [None, 5], ids=["seed-None", "seed-5"])
def test_global_rng_is_untouched_after_construction(seed, device):
    model = _lora_model(device=device)
    x = _randn(_generator(23), 8, E2E_IN, device=device)
    opt = _wrap(model, schedule="linear", total_steps=3, seed=seed, resample="call")
    states = _global_rng_states(device)
    for _ in range(2):
        opt.perturb()
        model(x).square().mean().backward()
        opt.restore()
        with opt.perturbed():
            model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    opt.step(lambda: model(x).square().mean().backward())
    assert opt.num_steps == 3 and opt.sigma > 0
    assert all(map(torch.equal, _global_rng_states(device), states))


def test_a_fixed_seed_reproduces_the_noise_in_a_fresh_wrapper(device):
    # One wrapper per model (a model belongs to one FlatPerturb), the models built alike.
    models = [_lora_model(device=device) for _ in range(3)]
    first, again, other = (_wrap(m, seed=s) for m, s in zip(models, (123, 123, 124)))
    eps = _read_noise(first, models[0])
    assert torch.equal(eps, _read_noise(again, models[1]))
    assert not torch.equal(eps, _read_noise(other, models[2]))
    first.step()
    again.step()
    assert torch.equal(_read_noise(first, models[0]), _read_noise(again, models[1]))


@pytest.mark.parametrize("rank_noise", [True, False])
def test_rank_noise_decides_whether_ranks_draw_their_own_noise(rank_noise, monkeypatch, device):
    model = _lora_model(device=device)
    opt = _wrap(model, rank_noise=rank_noise)
    on_rank_0 = _read_noise(opt, model)
    monkeypatch.setattr(flatopt._flat, "rank", lambda: 1)
    on_rank_1 = _read_noise(opt, model)
    assert torch.equal(on_rank_0, on_rank_1) is not rank_noise
    _assert_row_std(on_rank_1, _merged_std(model, 0.1), E2E_ROW_TOL, E2E_MEAN_TOL)


class _StoredTransposed(nn.Module):
    """A GPT-2-style layer: ``weight`` is stored (fan_in, out) and read as ``x @ weight``."""

    def __init__(self, weight: Tensor, B: Tensor, A: Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.t().contiguous(), requires_grad=False)
        self.B, self.A = nn.Parameter(B), nn.Parameter(A)

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight + x @ self.A.t() @ self.B.t()


def test_wrapper_scales_the_logical_rows_of_transposed_and_conv_weights(device):
    W, B, A = _merged_case(E2E_OUT, E2E_IN, RANK, seed=24, device=device)
    stored = _StoredTransposed(W, B, A)
    conv = nn.Conv2d(32, E2E_OUT, 4, bias=False)  # n = 32·4·4 = 512
    with torch.no_grad():
        conv.weight.copy_(
            _randn(_generator(25), E2E_OUT, 32, 4, 4)
            * torch.linspace(0.5, 4, E2E_OUT)[:, None, None, None]
        )
    model = nn.ModuleDict({"stored": stored, "conv": conv}).to(device)

    def adapter(module):
        if module is stored:
            return flatopt.Target(module, "weight", lambda: LowRank(module.B, module.A), True)
        if module is conv:
            return flatopt.Target(module, "weight")  # a dense target: ΔW = 0
        return None

    opt = _wrap(model, adapters=[adapter], sigma=0.1)
    assert opt.targets == [("stored", (E2E_OUT, E2E_IN)), ("conv", (E2E_OUT, E2E_IN))]
    eye = torch.eye(E2E_IN, device=device)
    with torch.no_grad():
        clean = (stored(eye), conv(eye.view(E2E_IN, 32, 4, 4)))
        with opt.perturbed():
            noisy = (stored(eye), conv(eye.view(E2E_IN, 32, 4, 4)))
    # x = I reveals the weights: stored(I) is the (fan_in, out) storage, conv(one-hot
    # images) is column j of the flattened (out, 512) kernel.
    eps_stored = (noisy[0].double() - clean[0].double()).t()
    eps_conv = (noisy[1].double() - clean[1].double()).view(E2E_IN, E2E_OUT).t()

    merged = W.double() + B.double() @ A.double()
    expected_stored = 0.1 * torch.linalg.vector_norm(merged, dim=1) / math.sqrt(E2E_IN)
    expected_conv = 0.1 * _dense_norms(conv.weight) / math.sqrt(E2E_IN)
    _assert_row_std(eps_stored, expected_stored, E2E_ROW_TOL, E2E_MEAN_TOL)
    _assert_row_std(eps_conv, expected_conv, E2E_ROW_TOL, E2E_MEAN_TOL)
    correlation = torch.corrcoef(torch.stack([eps_stored.flatten(), eps_conv.flatten()]))[0, 1]
    assert abs(correlation) <= Z / math.sqrt(eps_conv.numel())  # targets draw their own noise
