"""Trainable full-rank targets through ``flatopt.dense``: Linear, Conv2d and Embedding.

a dense target has ΔW = 0, so its forward sees W + ε with
ε_ij = σ·‖W_i‖/√n·z_ij and its gradient is taken at W + ε; §3: W is never written, though it
is trainable. An ``nn.Embedding`` is read as the linear map from a one-hot token: its logical
rows are the embedding dims and n is the number of embeddings.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_untouched, reference_forward, reference_weights, snapshot
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

import flatopt
from flatopt.lora import add_lora

KINDS = ("linear", "conv", "embedding")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# As in test_reference: both paths round W + ε once to W's dtype, so they may differ by an ulp
# of W + ε; a few ulps after a small network.
TOLERANCE = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.bfloat16: {"rtol": 5e-2, "atol": 5e-2},
}
Z = 6.0  # a 6-sigma bound: the fixed-seed checks below are far from flaky


def _layer(kind: str, rows: int, fan_in: int, generator: torch.Generator, dtype) -> nn.Module:
    """A trainable layer with ``rows`` logical rows of ``fan_in`` entries each.

    The rows get norms spread over two decades, so a per-row law is told apart from a global
    one. Conv: ``fan_in = channels · 3 · 3``; Embedding: ``fan_in`` tokens of dim ``rows``.
    """
    if kind == "linear":
        layer = nn.Linear(fan_in, rows)
    elif kind == "conv":
        layer = nn.Conv2d(max(1, fan_in // 9), rows, 3)
    elif kind == "embedding":
        layer = nn.Embedding(fan_in, rows)
    else:
        raise ValueError(kind)
    scales = torch.logspace(-1, 1, rows)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
            if name == "weight":
                view = p.transpose(0, 1) if kind == "embedding" else p  # logical rows first
                view.mul_(scales.view(-1, *[1] * (p.ndim - 1)))
    return layer.to(dtype)


def _input(kind: str, layer: nn.Module, batch: int, generator: torch.Generator) -> Tensor:
    """An input drawn on the CPU from ``generator``, moved to the layer's device."""
    weight = layer.weight
    if kind == "linear":
        x = torch.randn(batch, layer.in_features, generator=generator).to(weight.dtype)
    elif kind == "conv":
        shape = (batch, layer.in_channels, 5, 5)
        x = torch.randn(shape, generator=generator).to(weight.dtype)
    else:
        x = torch.randint(0, layer.num_embeddings, (batch, 3), generator=generator)
    return x.to(weight.device)


def _model(kind: str, rows: int, fan_in: int, seed: int, dtype, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    layer = _layer(kind, rows, fan_in, g, dtype).to(device)
    model = nn.Sequential(layer, nn.Tanh())
    return model, layer, _input(kind, layer, 4, g)


def _wrap(model: nn.Module, layer: nn.Module, sigma: float, seed: int, **kwargs):
    return flatopt.FlatPerturb(
        torch.optim.SGD(model.parameters(), lr=0.05),
        model,
        sigma=sigma,
        schedule="constant",
        seed=seed,
        adapters=[flatopt.dense(layer)],
        **kwargs,
    )


# -- exactness --------------------------------------------------------------------------------


@given(
    kind=st.sampled_from(KINDS),
    dtype=st.sampled_from(list(DTYPES.values())),
    rows=st.integers(1, 8),
    fan_in=st.integers(1, 20),
    sigma=st.floats(0.0, 0.5),
    seed=st.integers(0, 2**63 - 1),
    steps=st.integers(1, 3),
    micro=st.integers(1, 2),
)
def test_trainable_dense_target_round_trip_is_bitwise_exact(
    kind, dtype, rows, fan_in, sigma, seed, steps, micro, device
):
    model, layer, x = _model(kind, rows, fan_in, seed % 1000, dtype, device)
    opt = _wrap(model, layer, sigma, seed)
    for _ in range(steps):
        before = snapshot(model)  # the trainable weight included: only step() may move it
        for _ in range(micro):
            opt.perturb()
            output = model(x)
            assert_untouched(model, before)
            output.float().square().mean().backward()
            assert_untouched(model, before)
            opt.restore()
            assert_untouched(model, before)
        opt.step()
        opt.zero_grad()
    assert layer.weight.requires_grad  # a trainable target: only step() writes it


# -- the noise law ----------------------------------------------------------------------------


def _read_noise(kind: str, layer: nn.Module, opt: flatopt.FlatPerturb) -> Tensor:
    """ε in the logical (rows, fan_in) layout, read off the layer's output for one-hot inputs.

    Linear without bias: ``layer(I)`` is Wᵀ; a 3×3 conv on 3×3 one-hot images gives W's
    flattened kernels; an Embedding of every token gives W itself. Each read is exact up to
    the rounding of W + ε.
    """
    like = {"dtype": layer.weight.dtype, "device": layer.weight.device}
    with torch.no_grad():
        if kind == "linear":
            probe = torch.eye(layer.in_features, **like)
        elif kind == "conv":
            n = layer.weight[0].numel()
            probe = torch.eye(n, **like).view(n, *layer.weight.shape[1:])
        else:
            probe = torch.arange(layer.num_embeddings, device=layer.weight.device)
        clean = layer(probe).double()
        with opt.perturbed():
            noisy = layer(probe).double()
    eps = (noisy - clean).flatten(1)  # (fan_in, rows) for linear, conv and embedding alike
    return eps.t()


def _row_rms(eps: Tensor) -> Tensor:
    return eps.square().mean(1).sqrt()


def _logical(kind: str, layer: nn.Module) -> Tensor:
    w = layer.weight.detach().double()
    return w.t() if kind == "embedding" else w.flatten(1)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("kind", KINDS)
def test_dense_noise_follows_the_row_norm_law(kind, dtype, device):
    rows, fan_in, sigma = 16, 1152, 0.1  # conv: 128 channels · 3 · 3 = 1152
    g = torch.Generator().manual_seed(5)
    layer = _layer(kind, rows, fan_in, g, dtype).to(device)
    if kind == "linear":
        layer.bias = None
    opt = _wrap(layer, layer, sigma, seed=11)
    assert opt.targets == [("", (rows, fan_in))]
    eps = _read_noise(kind, layer, opt)
    W = _logical(kind, layer)
    expected = sigma * torch.linalg.vector_norm(W, dim=1) / math.sqrt(fan_in)

    # Per row, the RMS of n = 1152 normals has relative standard error 1/√(2n) ≈ 0.021; the
    # mean of 16 row ratios 0.021/4. bf16 adds the rounding of W + ε to 8 bits of mantissa
    # (an error of up to 2⁻⁸·|W|, comparable to ε itself here): 0.1 more per row, 0.05 on the
    # mean (the fp32 bound is what separates the laws).
    slack = 0.1 if dtype == torch.bfloat16 else 0.0
    ratio = _row_rms(eps) / expected
    assert (ratio - 1).abs().max() <= Z / math.sqrt(2 * fan_in) + slack, ratio
    assert abs(ratio.mean() - 1) <= Z / math.sqrt(2 * fan_in * rows) + slack / 2, ratio.mean()
    # A global scale (the same std for every row) is rejected: the row norms span 100×.
    flat = sigma * torch.linalg.vector_norm(W) / math.sqrt(W.numel())
    assert (_row_rms(eps) / flat - 1).abs().max() > 1
    # Centred and independent of the layout: the standardized entries have mean 0.
    z = (eps / expected[:, None]).flatten()
    assert abs(z.mean()) <= Z / math.sqrt(z.numel()) + slack / 10


def test_embedding_rows_are_the_embedding_dims_not_the_tokens(device):
    """For ``(num_embeddings, dim)`` the std is per column: σ·‖W[:, d]‖/√num_embeddings."""
    g = torch.Generator().manual_seed(3)
    layer = _layer("embedding", 8, 2048, g, torch.float32).to(device)
    opt = _wrap(layer, layer, 0.2, seed=2)
    assert opt.targets == [("", (8, 2048))]
    eps = _read_noise("embedding", layer, opt)  # (dim, tokens)
    per_dim = 0.2 * torch.linalg.vector_norm(layer.weight.double(), dim=0) / math.sqrt(2048)
    ratio = _row_rms(eps) / per_dim
    assert (ratio - 1).abs().max() <= Z / math.sqrt(2 * 2048)
    # The per-token law (rows of the stored matrix) would put a different std on each token.
    per_token = 0.2 * torch.linalg.vector_norm(layer.weight.double(), dim=1) / math.sqrt(8)
    token_ratio = eps.t().square().mean(1).sqrt() / per_token
    assert (token_ratio - 1).abs().max() > 0.5


def test_dense_and_lora_targets_in_one_model_each_follow_their_own_law(device):
    fan_in, rows, rank, sigma = 1024, 16, 2, 0.1
    g = torch.Generator().manual_seed(8)
    body = nn.Linear(fan_in, rows, bias=False)
    head = nn.Linear(fan_in, rows, bias=False)
    model = add_lora(nn.Sequential(body, nn.Identity(), head), ["0"], rank=rank, alpha=rank)
    head.requires_grad_(True)
    lora = model[0]
    with torch.no_grad():
        lora.base.weight.copy_(torch.randn(rows, fan_in, generator=g) * 0.05)
        lora.lora_A.copy_(torch.randn(rank, fan_in, generator=g))
        B = torch.randn(rows, rank, generator=g)
        B[: rows // 2] *= 0.0  # half the rows keep W, half are dominated by ΔW
        lora.lora_B.copy_(B)
        head.weight.copy_(
            torch.randn(rows, fan_in, generator=g) * torch.logspace(-1, 1, rows)[:, None]
        )
    model.to(device)
    opt = _wrap(model, head, sigma, seed=4)
    assert [name for name, _ in opt.targets] == ["0", "2"]

    eye = torch.eye(fan_in, device=device)
    with torch.no_grad():
        clean = (lora.base(eye).double(), head(eye).double())
        with opt.perturbed():
            noisy = (lora.base(eye).double(), head(eye).double())
    eps_lora, eps_head = ((n - c).t() for n, c in zip(noisy, clean))

    merged = (lora.base.weight + lora.scaling * lora.lora_B @ lora.lora_A).detach().double()
    base = lora.base.weight.detach().double()
    want_lora = sigma * torch.linalg.vector_norm(merged, dim=1) / math.sqrt(fan_in)
    want_head = sigma * torch.linalg.vector_norm(head.weight.double(), dim=1) / math.sqrt(fan_in)
    tol = Z / math.sqrt(2 * fan_in)
    assert ((_row_rms(eps_lora) / want_lora) - 1).abs().max() <= tol
    assert ((_row_rms(eps_head) / want_head) - 1).abs().max() <= tol
    # The LoRA layer is scaled by its merged weight, not its base weight...
    base_std = sigma * torch.linalg.vector_norm(base, dim=1) / math.sqrt(fan_in)
    assert ((_row_rms(eps_lora) / base_std) - 1).abs().max() > 10 * tol
    # ...and the two targets draw independent noise (different target index in the seed).
    corr = torch.corrcoef(torch.stack([eps_lora.flatten(), eps_head.flatten()]))[0, 1]
    assert abs(corr) <= Z / math.sqrt(eps_lora.numel())


# -- the gradient at W + ε against the slow reference -----------------------------------------


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("steps", [0, 2])
def test_dense_gradients_match_the_explicit_reference(kind, dtype, steps, device):
    model, layer, x = _model(kind, 6, 18, seed=9, dtype=dtype, device=device)
    opt = _wrap(model, layer, 0.2, seed=13)
    for _ in range(steps):  # move the weight, so the norms are those of the trained W
        with opt.perturbed():
            model(x).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
    with opt.perturbed():
        fast = model(x)
        fast.float().square().mean().backward()
    fast_grads = [p.grad.clone() for p in model.parameters()]
    opt.zero_grad()
    replaced = reference_weights(opt, model)
    assert list(replaced) == ["0.weight"]
    slow = reference_forward(model, replaced, x)
    slow.float().square().mean().backward()
    slow_grads = [p.grad.clone() for p in model.parameters()]

    tol = TOLERANCE[dtype]
    torch.testing.assert_close(fast, slow, **tol)
    for got, want in zip(fast_grads, slow_grads):
        torch.testing.assert_close(got.float(), want.float(), **tol)
    # The perturbation is real: the clean gradient is a different one.
    opt.zero_grad()
    model(x).float().square().mean().backward()
    assert not torch.allclose(layer.weight.grad.float(), fast_grads[0].float(), rtol=1e-3)


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "modules, error, match",
    [
        ((), ValueError, "at least one module"),
        ((nn.LayerNorm(4),), ValueError, "biases and norm layers are never perturbed"),
        ((nn.BatchNorm1d(4),), ValueError, "biases and norm layers are never perturbed"),
        ((nn.Linear(2, 2), nn.GroupNorm(2, 4)), ValueError, "GroupNorm"),
        ((torch.zeros(3, 3),), TypeError, "nn.Module arguments, got Tensor"),
        (("head",), TypeError, "nn.Module arguments, got str"),
    ],
)
def test_dense_errors(modules, error, match):
    with pytest.raises(error, match=match):
        flatopt.dense(*modules)
