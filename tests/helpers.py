"""Models, adapters and a slow reference shared by the tests.

The custom LoRA classes here are what a user would write: they are reached only through
adapters passed to ``FlatPerturb(adapters=[...])``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import flatopt
from flatopt.lora import LoRALinear, add_lora
from flatopt.noise import LowRank, derive_seed, draw_noise

INT_VIEW = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
}


def bits_equal(a: Tensor, b: Tensor) -> bool:
    """Bitwise equality: same dtype and shape, and the same bits (NaN and -0.0 included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype in INT_VIEW:
        return torch.equal(a.view(INT_VIEW[a.dtype]), b.view(INT_VIEW[b.dtype]))
    return torch.equal(a, b)


class TransposedLoRA(nn.Module):
    """A user's LoRA layer storing its base weight as ``(fan_in, out)`` under ``kernel``."""

    def __init__(self, fan_in: int, out: int, rank: int, generator: torch.Generator, dtype):
        super().__init__()
        self.kernel = nn.Parameter(
            torch.randn(fan_in, out, generator=generator).to(dtype), requires_grad=False
        )
        self.shift = nn.Parameter(torch.randn(out, generator=generator).to(dtype))
        self.shift.requires_grad_(False)
        self.down = nn.Parameter(torch.randn(rank, fan_in, generator=generator).to(dtype) * 0.3)
        self.up = nn.Parameter(torch.randn(out, rank, generator=generator).to(dtype) * 0.3)
        self.scale = 2.0 / rank

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.kernel + self.shift + self.scale * (x @ self.down.t()) @ self.up.t()


def transposed_adapter(module: nn.Module):
    if isinstance(module, TransposedLoRA):
        return flatopt.Target(
            module, "kernel", lambda: LowRank(module.up, module.down, module.scale), True
        )
    return None


class LoRAConv2d(nn.Module):
    """A user's LoRA around ``nn.Conv2d``: ΔW = scale · B @ A reshaped to the kernel."""

    def __init__(self, base: nn.Conv2d, rank: int, generator: torch.Generator):
        super().__init__()
        self.base = base
        fan_in = base.weight[0].numel()
        dtype = base.weight.dtype
        self.A = nn.Parameter(torch.randn(rank, fan_in, generator=generator).to(dtype) * 0.3)
        self.B = nn.Parameter(torch.randn(base.out_channels, rank, generator=generator).to(dtype))
        self.scale = 1.0 / rank

    def forward(self, x: Tensor) -> Tensor:
        b = self.base
        delta = (self.scale * self.B @ self.A).view_as(b.weight)
        return b(x) + F.conv2d(x, delta, None, b.stride, b.padding, b.dilation, b.groups)


def conv_adapter(module: nn.Module):
    if isinstance(module, LoRAConv2d):
        return flatopt.Target(
            module.base, "weight", lambda: LowRank(module.B, module.A, module.scale)
        )
    return None


def dense_delta_adapter(module: nn.Module):
    """flatopt's own LoRA, but handing ΔW over as a dense tensor instead of factors."""
    if isinstance(module, LoRALinear):
        return flatopt.Target(module.base, "weight", lambda: module.low_rank().dense())
    return None


KINDS = ("lora", "transposed", "conv", "dense_delta")


def build(kind: str, dtype: torch.dtype, out: int, fan_in: int, rank: int, seed: int, device="cpu"):
    """Return ``(model, input, adapters)`` for one model kind, all drawn from ``seed``.

    Everything is drawn on the CPU, then moved to ``device``: the same values on every device.
    """
    model, x, adapters = _build_on_cpu(kind, dtype, out, fan_in, rank, seed)
    return model.to(device), x.to(device), adapters


def _build_on_cpu(kind: str, dtype: torch.dtype, out: int, fan_in: int, rank: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    if kind in ("lora", "dense_delta"):
        torch_layers = [nn.Linear(fan_in, out), nn.Tanh(), nn.Linear(out, 3)]
        model = nn.Sequential(*torch_layers)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
        model = add_lora(model, ["0", "2"], rank=rank, alpha=2 * rank).to(dtype)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, LoRALinear):  # drawn from g: builds must not use global RNG
                    m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) * 0.3)
                    m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.3)
        x = torch.randn(5, fan_in, generator=g).to(dtype)
        adapters = [dense_delta_adapter] if kind == "dense_delta" else []
        return model, x, adapters
    if kind == "transposed":
        model = nn.Sequential(TransposedLoRA(fan_in, out, rank, g, dtype), nn.Tanh())
        return model, torch.randn(5, fan_in, generator=g).to(dtype), [transposed_adapter]
    if kind == "conv":
        channels = max(1, fan_in // 4)
        groups = 2 if channels % 2 == 0 and out % 2 == 0 else 1
        conv = nn.Conv2d(channels, out, 3, padding=1, groups=groups)
        with torch.no_grad():
            for p in conv.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        conv.requires_grad_(False)
        model = nn.Sequential(LoRAConv2d(conv, rank, g), nn.Tanh()).to(dtype)
        return model, torch.randn(2, channels, 5, 5, generator=g).to(dtype), [conv_adapter]
    raise ValueError(kind)


def snapshot(model: nn.Module) -> dict[str, tuple[Tensor, int, int]]:
    """Every parameter and buffer: a copy of its value, its version and its storage address."""
    return {
        name: (t.detach().clone(), t._version, t.data_ptr())
        for name, t in model.state_dict(keep_vars=True).items()
    }


def assert_untouched(model: nn.Module, before: dict, names=None) -> None:
    """Each listed tensor is bitwise, version- and storage-identical to ``before``."""
    now = model.state_dict(keep_vars=True)
    assert set(now) == set(before)
    for name in names if names is not None else before:
        value, version, ptr = before[name]
        tensor = now[name]
        assert bits_equal(tensor.detach(), value), f"{name} changed"
        assert tensor._version == version, f"{name}: version {version} -> {tensor._version}"
        assert tensor.data_ptr() == ptr, f"{name} moved to new storage"


def frozen_names(model: nn.Module) -> list[str]:
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return [n for n in model.state_dict() if n not in trainable]


def reference_weights(opt: flatopt.FlatPerturb, model: nn.Module) -> dict[str, Tensor]:
    """W + ε for every target, built by hand from the law: the slow, explicit reference."""
    names = {id(p): n for n, p in model.named_parameters()}
    sigma, replaced = opt.sigma, {}
    for site in opt._sites:
        weight = site.target.weight
        generator = torch.Generator(device=weight.device)
        delta = site.target.delta() if site.target.delta else None
        std = flatopt.noise.noise_std(weight, delta, sigma, transposed=site.target.transposed)
        seed = derive_seed(opt.seed, opt.num_steps, 0, site.index, 0)
        eps = draw_noise(
            weight, std, transposed=site.target.transposed, generator=generator, seed=seed
        )
        replaced[names[id(weight)]] = (weight.to(eps.dtype) + eps).to(weight.dtype)
    return replaced


def reference_forward(model: nn.Module, replaced: dict[str, Tensor], x: Tensor) -> Tensor:
    params = dict(model.named_parameters())
    return functional_call(model, {**params, **replaced}, (x,))


# -- what a forward reads, and a model with nothing armed ---------------------------------------


def record_reads(module: nn.Module, name: str = "weight") -> list[Tensor]:
    """Clone the tensor ``module`` reads at each call: W + ε while the noise is armed.

    Registered after FlatPerturb is built, the pre-hook runs after flatopt's and sees what the
    forward reads.
    """
    seen: list[Tensor] = []

    def hook(module, args):
        seen.append(getattr(module, name).detach().clone())

    module.register_forward_pre_hook(hook)
    return seen


def lora_forward(model: nn.Sequential, x: Tensor) -> Tensor:
    """The forward of a Sequential of `LoRALinear` and plain layers, by hand: no hook runs."""
    for layer in model:
        if isinstance(layer, LoRALinear):
            update = x @ layer.lora_A.t() @ layer.lora_B.t()
            x = F.linear(x, layer.base.weight, layer.base.bias) + layer.scaling * update
        else:
            x = layer(x)
    return x


def assert_nothing_armed(model: nn.Module) -> None:
    """No flatopt swap armed and no call in flight on any module, no saved-tensor hooks left."""
    from flatopt._arming import find_slot

    for name, module in model.named_modules():
        slot = find_slot(module)
        if slot is not None:
            assert not slot.swaps, f"{name!r} is still armed"
            assert not slot.frames, f"{name!r} has a call in flight"
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None


def tiny_lora(seed: int = 0) -> nn.Module:
    """``LoRALinear(6, 8) -> Tanh -> LoRALinear(8, 3)``, drawn from ``seed``."""
    return build("lora", torch.float32, 8, 6, 2, seed)[0]


def toy_batches(count: int, rows: int = 4, seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    """``count`` (input, target) pairs for `tiny_lora`, drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(rows, 6, generator=g), torch.randn(rows, 3, generator=g)) for _ in range(count)
    ]
