"""flatopt.sharpness: the expected loss increase under the noise law."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_untouched, bits_equal, snapshot
from torch import nn

import flatopt
from flatopt.lora import LoRALinear, add_lora


def _regression(seed=0, out=4, fan_in=16, rows=256):
    g = torch.Generator().manual_seed(seed)
    model = add_lora(nn.Sequential(nn.Linear(fan_in, out, bias=False)), ["0"], rank=2)
    layer = model[0]
    with torch.no_grad():
        layer.base.weight.copy_(torch.randn(out, fan_in, generator=g))
        layer.lora_A.copy_(torch.randn(2, fan_in, generator=g))
        layer.lora_B.copy_(torch.randn(out, 2, generator=g))
    x = torch.randn(rows, fan_in, generator=g)
    y = torch.randn(rows, out, generator=g)
    return model, x, y


def test_the_increase_matches_the_closed_form_for_a_linear_model():
    # For y = (W' + ε)x and MSE, E[L(W'+ε)] − L(W') = mean_i,b σ²‖W'_i‖²‖x_b‖²/n exactly.
    model, x, y = _regression()
    sigma, samples = 0.2, 400
    result = flatopt.sharpness(
        model, lambda b: F.mse_loss(model(b[0]), b[1]), [(x, y)], sigma=sigma, samples=samples
    )
    merged = model[0].merged_weight().detach()
    n = merged.shape[1]
    expected = (sigma**2 * merged.square().sum(1).mean() * x.square().sum(1).mean() / n).item()
    # The sample mean is within 4 standard errors of its expectation (fails ~1 in 16,000).
    assert abs(result.mean - expected) < 4 * result.stderr
    assert result.stderr == pytest.approx(result.std / math.sqrt(samples))
    assert len(result.increases) == samples and result.sigma == sigma
    torch.testing.assert_close(result.clean_loss, F.mse_loss(model(x), y).item())


def test_zero_sigma_gives_zero_and_the_model_is_untouched():
    model, x, y = _regression()
    before = snapshot(model)
    result = flatopt.sharpness(
        model, lambda b: F.mse_loss(model(b[0]), b[1]), [(x, y)], sigma=0.0, samples=3
    )
    assert result.increases == (0.0, 0.0, 0.0) and result.mean == 0.0
    assert_untouched(model, before)


def test_it_is_deterministic_in_its_seed_and_leaves_modes_and_rng_alone():
    model, x, y = _regression()
    model.train()
    model[0].dropout.train()
    state = torch.get_rng_state()

    def loss(batch):
        return F.mse_loss(model(batch[0]), batch[1])

    a = flatopt.sharpness(model, loss, [(x, y)], sigma=0.1, samples=4, seed=1)
    b = flatopt.sharpness(model, loss, [(x, y)], sigma=0.1, samples=4, seed=1)
    c = flatopt.sharpness(model, loss, [(x, y)], sigma=0.1, samples=4, seed=2)
    assert a == b and a != c
    assert model.training and all(m.training for m in model.modules())
    assert bits_equal(state, torch.get_rng_state())
    assert "σ=0.1, n=4" in str(a)


def test_a_sharper_model_measures_sharper():
    # Scaling the inputs by 3 scales the noise's effect on the output by 3, the increase by 9.
    model, x, y = _regression()

    def loss(scale):
        return lambda b: F.mse_loss(model(scale * b[0]), scale * b[1])

    flat = flatopt.sharpness(model, loss(1.0), [(x, y)], sigma=0.1, samples=6)
    sharp = flatopt.sharpness(model, loss(3.0), [(x, y)], sigma=0.1, samples=6)
    torch.testing.assert_close(sharp.mean, 9 * flat.mean, rtol=1e-4, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"sigma": -1.0}, ValueError, r"Invalid sigma: -1\.0"),
        ({"sigma": "0.1"}, TypeError, r"Invalid sigma: '0\.1'"),
        ({"samples": 0}, ValueError, r"Invalid samples: 0"),
        ({"batches": []}, ValueError, "batches is empty"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    model, x, y = _regression()
    arguments = {"batches": [(x, y)], **kwargs}
    with pytest.raises(error, match=match):
        flatopt.sharpness(model, lambda b: F.mse_loss(model(b[0]), b[1]), **arguments)


def test_it_finds_targets_like_flatperturb():
    plain = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="No adapter recognised"):
        flatopt.sharpness(plain, lambda b: plain(b).sum(), [torch.ones(1, 3)])
    assert isinstance(add_lora(nn.Sequential(nn.Linear(3, 3)), None)[0], LoRALinear)


def _loss(model, x, y):
    return lambda batch: F.mse_loss(model(batch[0]), batch[1])


def test_several_sigmas_in_one_call_are_the_single_calls():
    # Each σ meets the same draws of z as its own call: the same numbers, bit for bit.
    model, x, y = _regression()
    curve = flatopt.sharpness(model, _loss(model, x, y), [(x, y)], sigma=(0.3, 0.1), samples=3)
    singles = [
        flatopt.sharpness(model, _loss(model, x, y), [(x, y)], sigma=s, samples=3)
        for s in (0.3, 0.1)
    ]
    assert isinstance(curve, list) and curve == singles
    assert [r.sigma for r in curve] == [0.3, 0.1] and curve[0].mean > curve[1].mean > 0


def test_the_interval_is_students_t_and_covers_at_its_level():
    model, x, y = _regression()
    merged = model[0].merged_weight().detach()
    sigma, samples, runs = 0.2, 10, 100
    expected = (sigma**2 * merged.square().sum(1).mean() * x.square().sum(1).mean() / 16).item()
    covered = 0
    for seed in range(runs):
        result = flatopt.sharpness(
            model, _loss(model, x, y), [(x, y)], sigma=sigma, samples=samples, seed=seed
        )
        low, high = result.ci()
        covered += low <= expected <= high
        assert result.seed == seed
    # 2.262 is Student's t at 97.5% with 9 degrees of freedom (printed tables).
    torch.testing.assert_close(high - result.mean, 2.262 * result.stderr, rtol=2e-4, atol=0)
    # Binomial: the coverage is within 4 standard deviations of 0.95 (fails ~1 in 16,000).
    tolerance = 4 * math.sqrt(0.95 * 0.05 / runs)
    assert abs(covered / runs - 0.95) < tolerance


@pytest.mark.parametrize(
    ("level", "df", "table"),
    [
        (0.95, 1, 12.706),
        (0.95, 2, 4.303),
        (0.99, 4, 4.604),
        (0.90, 29, 1.699),
        (0.95, 120, 1.980),
    ],
)
def test_the_t_quantile_matches_printed_tables(level, df, table):
    increases = tuple(float(i % 2) for i in range(df + 1))
    result = flatopt.Sharpness(0.0, 1.0, 1.0, 0.0, increases, sigma=0.1)
    low, high = result.ci(level)
    assert low == -high and abs(high - table) < 5e-4


def test_one_sample_has_no_interval_and_a_bad_level_is_refused():
    result = flatopt.Sharpness(0.1, 0.0, 0.0, 1.0, (0.1,), sigma=0.1)
    assert result.ci() == (-math.inf, math.inf)
    with pytest.raises(ValueError, match=r"Invalid level: 1\.5"):
        result.ci(1.5)


def test_a_generator_of_modules_is_measured_in_eval_mode():
    # The iterable is read once: the search for targets must not use it up before eval().
    model, x, y = _regression()
    model[0].dropout = nn.Dropout(0.5)
    model.train()
    state = torch.get_rng_state()
    result = flatopt.sharpness(
        (m for m in [model]), _loss(model, x, y), [(x, y)], sigma=0.0, samples=3
    )
    assert result.increases == (0.0, 0.0, 0.0)  # dropout was off: every loss is the clean one
    assert bits_equal(state, torch.get_rng_state())
    assert all(m.training for m in model.modules())


class _CallsForward(nn.Module):
    """A LoRA layer that runs its base through ``base.forward(x)``, which skips its hooks."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        layer = self.layer
        return layer.base.forward(x) + layer.scaling * (x @ layer.lora_A.t() @ layer.lora_B.t())


def test_no_target_forward_raises_instead_of_returning_zero():
    model, x, y = _regression()
    wrapper = _CallsForward(model[0])
    with pytest.raises(RuntimeError, match=r"none of the 1 target layers ran.*module\(x\)"):
        flatopt.sharpness(wrapper, _loss(wrapper, x, y), [(x, y)], sigma=0.1, samples=2)


def test_a_model_compiled_before_the_hooks_existed_raises():
    torch._dynamo.reset()
    model, x, y = _regression()
    compiled = torch.compile(model, backend="aot_eager")
    model.eval()
    with torch.no_grad():
        compiled(x)  # compiled, in the mode sharpness measures in, before any flatopt hook
    hooks = (dict(model[0].base._forward_pre_hooks), dict(model[0].base._forward_hooks))
    with pytest.raises(RuntimeError, match="build the FlatPerturb before compiling"):
        flatopt.sharpness(model, _loss(compiled, x, y), [(x, y)], sigma=0.1, samples=2)
    # The model is left as it was found: no hook added, its modes as they were.
    assert (dict(model[0].base._forward_pre_hooks), dict(model[0].base._forward_hooks)) == hooks
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize(
    ("loss_fn", "error", "match"),
    [
        (
            lambda model, b: (model(b[0]) - b[1]).square(),
            ValueError,
            r"loss_fn returned a tensor of shape \(256, 4\).*scalar.*loss\.mean\(\)",
        ),
        (
            lambda model, b: {"loss": F.mse_loss(model(b[0]), b[1])},
            TypeError,
            r"loss_fn returned dict.*scalar.*\.loss",
        ),
    ],
    ids=["per_element_loss", "a_dict"],
)
def test_a_loss_that_is_not_one_number_names_loss_fn_its_shape_and_the_fix(loss_fn, error, match):
    model, x, y = _regression()
    model.train()
    before = snapshot(model)
    hooks = dict(model[0].base._forward_pre_hooks)
    with pytest.raises(error, match=match):
        flatopt.sharpness(model, lambda b: loss_fn(model, b), [(x, y)], sigma=0.1, samples=2)
    assert_untouched(model, before)
    assert dict(model[0].base._forward_pre_hooks) == hooks and model.training


def test_a_one_element_loss_is_a_scalar_loss():
    model, x, y = _regression()
    scalar = flatopt.sharpness(model, _loss(model, x, y), [(x, y)], sigma=0.1, samples=2)
    shaped = flatopt.sharpness(
        model, lambda b: _loss(model, x, y)(b).reshape(1, 1), [(x, y)], sigma=0.1, samples=2
    )
    assert shaped == scalar
