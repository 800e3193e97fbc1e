"""Quantized base weights: ε cannot be added to W, so f(x; ε) is added to the layer's output and
regenerated in backward. The quantized weight is never touched.

The layers here hold torch's own per-channel int8 tensors, as a user's quantized LoRA would.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import bits_equal
from torch import nn

import flatopt
from flatopt.noise import LowRank, derive_seed, draw_noise, noise_std

pytestmark = pytest.mark.cpu_only(
    reason="torch's per-channel int8 tensors (quantize_per_channel) are CPU tensors"
)


def _quantize(weight):
    scales = weight.abs().amax(dim=tuple(range(1, weight.ndim))).double() / 127
    zeros = torch.zeros(weight.shape[0], dtype=torch.long)
    return torch.quantize_per_channel(weight, scales, zeros, 0, torch.qint8)


class QuantLoRALinear(nn.Linear):
    """An int8 base weight plus trainable LoRA factors."""

    def __init__(self, fan_in, out, rank, g):
        super().__init__(fan_in, out)
        weight = torch.randn(out, fan_in, generator=g) / fan_in**0.5
        del self.weight
        self.register_buffer("weight", _quantize(weight))
        self.bias.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.randn(rank, fan_in, generator=g) * 0.3)
        self.lora_B = nn.Parameter(torch.randn(out, rank, generator=g) * 0.5)
        self.scale = 2.0 / rank

    def forward(self, x):
        base = F.linear(x, self.weight.dequantize(), self.bias)
        return base + self.scale * (x @ self.lora_A.t()) @ self.lora_B.t()


class QuantLoRAConv(nn.Conv2d):
    def __init__(self, channels, out, rank, g):
        super().__init__(channels, out, 3, padding=1, bias=False)
        weight = torch.randn(out, channels, 3, 3, generator=g) * 0.2
        del self.weight
        self.register_buffer("weight", _quantize(weight))
        self.lora_A = nn.Parameter(torch.randn(rank, channels * 9, generator=g) * 0.3)
        self.lora_B = nn.Parameter(torch.randn(out, rank, generator=g) * 0.3)

    def forward(self, x):
        delta = (self.lora_B @ self.lora_A).view(self.weight.shape)
        return F.conv2d(x, self.weight.dequantize() + delta, None, self.stride, self.padding)


def adapter(module):
    if isinstance(module, (QuantLoRALinear, QuantLoRAConv)):
        scale = getattr(module, "scale", 1.0)
        return flatopt.Target(
            module, "weight", lambda: LowRank(module.lora_B, module.lora_A, scale)
        )
    return None


def _model(kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "linear":
        model = nn.Sequential(
            QuantLoRALinear(12, 10, 3, g), nn.Tanh(), QuantLoRALinear(10, 4, 2, g)
        )
        return model, torch.randn(6, 12, generator=g, requires_grad=True)
    model = nn.Sequential(QuantLoRAConv(3, 5, 2, g), nn.Tanh())
    return model, torch.randn(2, 3, 6, 6, generator=g, requires_grad=True)


def _wrap(model, sigma=0.2, seed=5):
    trainable = [p for p in model.parameters() if p.requires_grad]
    return flatopt.FlatPerturb(
        torch.optim.SGD(trainable, lr=0.05),
        model,
        sigma=sigma,
        schedule="constant",
        seed=seed,
        adapters=[adapter],
    )


def _quantized_state(model):
    return [
        (m.weight.int_repr().clone(), m.weight.q_per_channel_scales().clone())
        for m in model
        if hasattr(m, "lora_A")
    ]


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_the_quantized_weights_are_never_touched_and_the_noise_is_real(kind):
    model, x = _model(kind)
    before = _quantized_state(model)
    opt = _wrap(model)
    clean = model(x).detach()
    for _ in range(3):
        with opt.perturbed():
            out = model(x)
            out.square().mean().backward()
        assert not torch.allclose(out, clean, rtol=1e-3, atol=1e-4)
        opt.step()
        opt.zero_grad()
    for (ints, scales), (ints_now, scales_now) in zip(before, _quantized_state(model)):
        assert torch.equal(ints, ints_now) and bits_equal(scales, scales_now)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_outputs_and_gradients_match_an_explicit_w_plus_eps(kind):
    model, x = _model(kind)
    opt = _wrap(model)
    with opt.perturbed():
        fast = model(x)
        fast.square().mean().backward()
    fast_grads = [p.grad.clone() for p in opt.param_groups[0]["params"]] + [x.grad.clone()]
    opt.zero_grad()
    x.grad = None

    # Reference: every quantized layer replaced by its dequantized weight plus ε, by hand.
    h = x
    for module in model:
        if not hasattr(module, "lora_A"):
            h = module(h)
            continue
        site = next(s for s in opt._sites if s.target.module is module)
        weight = module.weight.dequantize()
        std = noise_std(weight, site.target.delta(), opt.sigma)
        seed = derive_seed(opt.seed, opt.num_steps, 0, site.index, 0)
        eps = draw_noise(weight, std, generator=torch.Generator(), seed=seed, dtype=h.dtype)
        if isinstance(module, QuantLoRAConv):
            delta = (module.lora_B @ module.lora_A).view(weight.shape)
            h = F.conv2d(h, weight + eps + delta, None, module.stride, module.padding)
        else:
            lora = module.scale * (h @ module.lora_A.t()) @ module.lora_B.t()
            h = F.linear(h, weight + eps, module.bias) + lora
    slow = h
    slow.square().mean().backward()
    slow_grads = [p.grad.clone() for p in opt.param_groups[0]["params"]] + [x.grad.clone()]
    # fp32: the output-side sum x·Wᵀ + x·εᵀ and the reference x·(W + ε)ᵀ round differently.
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    for got, want in zip(fast_grads, slow_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_the_output_noise_follows_the_law_of_the_merged_weight():
    g = torch.Generator().manual_seed(1)
    layer = QuantLoRALinear(1024, 8, 2, g)
    with torch.no_grad():
        layer.lora_B.mul_(20.0)  # the merged norms now differ from the base ones by far
    opt = _wrap(layer, sigma=0.1, seed=2)
    eye = torch.eye(1024)
    clean = layer(eye).detach()
    with opt.perturbed(), torch.no_grad():
        eps = (layer(eye) - clean).t()  # row i of εᵀ·I: the noise of output i
    merged = layer.weight.dequantize() + layer.scale * layer.lora_B @ layer.lora_A
    expected = 0.1 * merged.norm(dim=1) / 1024**0.5
    base_only = 0.1 * layer.weight.dequantize().norm(dim=1) / 1024**0.5
    measured = eps.std(dim=1)
    # The std of a sample std over n = 1024 draws is about s/√(2n) ≈ 2.2%; allow 6 of those.
    torch.testing.assert_close(measured, expected, rtol=6 / (2 * 1024) ** 0.5, atol=0)
    assert ((measured - base_only).abs() / base_only).max() > 0.5


def test_a_quantized_weight_in_a_layer_of_unknown_form_is_refused_by_name():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("weight", _quantize(torch.randn(4, 3, 2)))

        def forward(self, x):
            return x

    odd = Odd()
    with pytest.raises(
        ValueError, match=r"Module '': Odd\.weight is a Tensor of dtype torch\.qint8"
    ):
        flatopt.FlatPerturb(
            torch.optim.SGD([nn.Parameter(torch.ones(1))]),
            odd,
            total_steps=3,
            adapters=[lambda m: flatopt.Target(m, "weight") if m is odd else None],
        )


def test_a_quantized_weight_stored_transposed_gets_its_noise_along_the_output_rows():
    g = torch.Generator().manual_seed(3)

    class TransposedQuant(nn.Module):  # stores W as (fan_in, out), like GPT-2's Conv1D
        def __init__(self):
            super().__init__()
            self.register_buffer("weight", _quantize(torch.randn(9, 5, generator=g) * 0.3))

        def forward(self, x):
            return x @ self.weight.dequantize()

    layer = TransposedQuant()
    opt = flatopt.FlatPerturb(
        torch.optim.SGD([nn.Parameter(torch.ones(1))]),
        layer,
        sigma=0.3,
        schedule="constant",
        seed=1,
        adapters=[lambda m: flatopt.Target(m, "weight", None, True) if m is layer else None],
    )
    assert opt.targets == [("", (5, 9))]
    x = torch.randn(4, 9, generator=g, requires_grad=True)
    with opt.perturbed():
        fast = layer(x)
        fast.sum().backward()
    fast_grad, x.grad = x.grad.clone(), None
    weight = layer.weight.dequantize()
    std = noise_std(weight, None, 0.3, transposed=True)
    seed = derive_seed(1, 0, 0, 0, 0)
    eps = draw_noise(weight, std, transposed=True, generator=torch.Generator(), seed=seed)
    slow = x @ (weight + eps)
    slow.sum().backward()
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_grad, x.grad, rtol=1e-5, atol=1e-5)
