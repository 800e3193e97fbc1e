"""Correctness at the edges: one test (or a few) per defect found by review of the hooks.

W + ε is never left behind, autograd's in-place check still fires, dense() reads the rows of
every stored layout, the output-side path sees keyword calls, half-precision row norms do not
overflow, sharpness() leaves the model exactly as it found it, saved tensors that are not plain
strided tensors pass through, the hooks can be taken off, and LBFGS's closure evaluations get
the noise the docs promise.
"""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    assert_nothing_armed,
    assert_untouched,
    bits_equal,
    build,
    lora_forward,
    record_reads,
    snapshot,
)
from torch import nn

import flatopt
from flatopt.lora import LoRALinear, add_lora
from flatopt.noise import LowRank, derive_seed, draw_noise, noise_std, perturbed_weight

pytestmark = pytest.mark.usefixtures("one_thread")


def _lora(seed=0):
    """``LoRALinear(6, 8) -> Tanh -> LoRALinear(8, 3)`` and an input batch."""
    model, x, _ = build("lora", torch.float32, 8, 6, 2, seed)
    return model, x


def _wrap(model, adapters=(), params=None, **kwargs):
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    params = params or [nn.Parameter(torch.ones(1))]  # a model with nothing to train
    kwargs.setdefault("sigma", 0.3)
    kwargs.setdefault("schedule", "constant")
    kwargs.setdefault("seed", 7)
    return flatopt.FlatPerturb(torch.optim.SGD(params, lr=0.05), model, adapters=adapters, **kwargs)


def _expected(weight, sigma, seed, transposed=False, index=0, delta=None):
    """W + ε of target ``index`` at step 0, from the public law functions."""
    std = noise_std(weight.detach(), delta, sigma, transposed=transposed)
    return perturbed_weight(
        weight.detach(),
        std,
        transposed=transposed,
        generator=torch.Generator(),
        seed=derive_seed(seed, 0, 0, index, 0),
    )


# -- 1. an exception can never leave W + ε in the model --------------------------------------


@pytest.mark.parametrize("auto", [False, True])
def test_a_failure_entering_the_saved_tensor_hooks_leaves_w_in_the_module(auto):
    model, x = _lora()
    opt = _wrap(model, auto=True) if auto else _wrap(model)
    base = model[0].base
    original = base.weight
    before = snapshot(model)
    refuse = torch.autograd.graph.disable_saved_tensors_hooks("no saved-tensor hooks here")
    with pytest.raises(RuntimeError, match="no saved-tensor hooks here"), refuse:
        if auto:
            model(x)
        else:
            with opt.perturbed():
                model(x)
    assert base._parameters["weight"] is original
    assert bits_equal(model.state_dict()["0.base.weight"], before["0.base.weight"][0])
    assert_untouched(model, before)
    if not auto:
        assert_nothing_armed(model)
    # Usable afterwards: the next perturbed forward sees W + ε again.
    seen = record_reads(base)
    if auto:
        model(x)
    else:
        with opt.perturbed():
            model(x)
    assert not torch.equal(seen[-1], original)
    assert base._parameters["weight"] is original


# -- 2. autograd's check for in-place changes ----------------------------------------------------


def test_a_weight_modified_in_place_between_forward_and_backward_raises_like_autograd():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, generator=g, requires_grad=True)
    plain = nn.Linear(5, 3)
    out = plain(x)
    with torch.no_grad():
        plain.weight.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()  # what torch does without flatopt

    layer = nn.Linear(5, 3)
    opt = _wrap(layer, adapters=[flatopt.dense(layer)])
    with opt.perturbed():
        out = layer(x)
        with torch.no_grad():
            layer.weight.mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()
    assert_nothing_armed(layer)


# -- 3. dense() reads the rows of every stored layout ----------------------------------------


class Conv1D(nn.Module):
    """transformers' GPT-2 ``Conv1D``: weight stored ``(nx, nf)``, y = x @ W + b."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)


class Projection(nn.Module):
    """A user's layer storing its weight as ``(fan_in, out)``."""

    def __init__(self, fan_in, out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(fan_in, out))

    def forward(self, x):
        return x @ self.weight


def _layouts():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 10, (4, 3), generator=g)
    return {
        "Conv1D": (Conv1D(4, 64), torch.randn(3, 64, generator=g), None, (4, 64), True),
        "ConvTranspose2d": (
            nn.ConvTranspose2d(3, 5, 2),
            torch.randn(2, 3, 4, 4, generator=g),
            None,
            (5, 12),
            True,
        ),
        "EmbeddingBag": (nn.EmbeddingBag(10, 6), tokens, None, (6, 10), True),
        "user layout": (Projection(7, 2), torch.randn(3, 7, generator=g), True, (2, 7), True),
        "Conv1D, transposed=False": (
            Conv1D(4, 64),
            torch.randn(3, 64, generator=g),
            False,
            (64, 4),
            False,
        ),
    }


@pytest.mark.parametrize("name", list(_layouts()))
def test_dense_reads_the_output_rows_of_each_layout(name):
    layer, x, transposed, logical, stored_transposed = _layouts()[name]
    for p in layer.parameters():
        p.requires_grad_(False)
    dense = (
        flatopt.dense(layer) if transposed is None else flatopt.dense(layer, transposed=transposed)
    )
    opt = _wrap(layer, adapters=[dense], params=[])
    assert opt.targets == [("", logical)]
    seen = record_reads(layer)
    with opt.perturbed():
        layer(x)
    expected = _expected(layer.weight, 0.3, 7, transposed=stored_transposed)
    assert bits_equal(seen[0], expected)
    assert not torch.equal(seen[0], layer.weight)


def test_dense_refuses_a_grouped_transposed_convolution_and_a_bad_transposed():
    with pytest.raises(ValueError, match="groups=2"):
        flatopt.dense(nn.ConvTranspose2d(4, 4, 2, groups=2))
    with pytest.raises(TypeError, match="transposed"):
        flatopt.dense(nn.Linear(2, 2), transposed="yes")


# -- 4. the output-side path (quantized weights) ---------------------------------------------


def _quantize(weight):
    scales = weight.abs().amax(dim=tuple(range(1, weight.ndim))).double() / 127
    zeros = torch.zeros(weight.shape[0], dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch deprecates its quantized dtypes
        return torch.quantize_per_channel(weight, scales, zeros, 0, torch.qint8)


class QuantLinear(nn.Module):
    def __init__(self, g):
        super().__init__()
        self.register_buffer("weight", _quantize(torch.randn(5, 7, generator=g)))

    def forward(self, input):
        return F.linear(input, self.weight.dequantize())


class QuantConvSame(nn.Conv2d):
    def __init__(self, g):
        super().__init__(3, 4, 3, padding="same", bias=False)
        del self.weight
        self.register_buffer("weight", _quantize(torch.randn(4, 3, 3, 3, generator=g) * 0.3))

    def forward(self, x):
        return F.conv2d(x, self.weight.dequantize(), None, self.stride, self.padding)


def _wrap_quantized(layer):
    def adapter(module):
        return flatopt.Target(module, "weight") if module is layer else None

    return _wrap(layer, adapters=[adapter], params=[])


def test_a_keyword_call_gets_the_output_side_noise():
    g = torch.Generator().manual_seed(2)
    layer = QuantLinear(g)
    opt = _wrap_quantized(layer)
    x = torch.randn(3, 7, generator=g)
    clean = layer(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no "nothing was perturbed" warning
        with opt.perturbed():
            by_keyword = layer(input=x)
            positional = layer(x)
    assert bits_equal(by_keyword, positional)
    assert not torch.allclose(by_keyword, clean, rtol=1e-3, atol=1e-3)


def test_a_same_padded_quantized_conv_gets_its_input_gradient():
    g = torch.Generator().manual_seed(3)
    layer = QuantConvSame(g)
    opt = _wrap_quantized(layer)
    x = torch.randn(2, 3, 6, 6, generator=g, requires_grad=True)
    with opt.perturbed():
        fast = layer(x)
        fast.square().sum().backward()
    fast_grad, x.grad = x.grad, None
    weight = layer.weight.dequantize()
    std = noise_std(weight, None, 0.3)
    seed = derive_seed(7, 0, 0, 0, 0)
    eps = draw_noise(weight, std, generator=torch.Generator(), seed=seed, dtype=x.dtype)
    slow = F.conv2d(x, weight + eps, None, 1, "same")
    slow.square().sum().backward()
    # fp32: conv(x, W) + conv(x, ε) and conv(x, W + ε) round differently.
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_grad, x.grad, rtol=1e-5, atol=1e-5)


class TaggedParameter(nn.Parameter):
    """A floating Parameter subclass, as some libraries tag their weights."""


def test_a_floating_parameter_subclass_is_a_plain_weight():
    layer = nn.Linear(7, 5)
    layer.weight = TaggedParameter(layer.weight.detach(), requires_grad=False)
    opt = _wrap(layer, adapters=[flatopt.dense(layer)], params=[layer.bias])
    seen = record_reads(layer)
    with opt.perturbed():
        layer(torch.randn(3, 7)).sum().backward()
    assert bits_equal(seen[0], _expected(layer.weight, 0.3, 7))  # W + ε, on the weight side
    assert type(layer._parameters["weight"]) is TaggedParameter


# -- 5. half-precision row norms ---------------------------------------------------------------


def test_large_same_sign_fp16_weights_give_finite_row_norms():
    g = torch.Generator().manual_seed(4)
    rows, fan_in = 32, 4096  # above DENSE_ROW_NORMS: the O(m·n·r) identity
    W = (300 + 30 * torch.randn(rows, fan_in, generator=g)).half()
    A = (0.5 + 0.5 * torch.rand(2, fan_in, generator=g)).half()  # W·Aᵀ ≈ 9e5 > fp16 max
    B = torch.rand(rows, 2, generator=g).half()
    norms = flatopt.noise.row_norms(W, LowRank(B, A, 2.0))
    reference = torch.linalg.vector_norm(W.double() + 2.0 * B.double() @ A.double(), dim=1)
    assert norms.dtype == torch.float32
    # fp32 accumulation of 4096 terms: a relative error of a few 1e-6 at most.
    torch.testing.assert_close(norms.double(), reference, rtol=1e-5, atol=0)


def test_an_fp16_lora_layer_with_large_weights_is_perturbed_by_the_law():
    g = torch.Generator().manual_seed(5)
    rows, fan_in, sigma = 32, 4096, 0.1
    layer = LoRALinear(nn.Linear(fan_in, rows, bias=False), rank=2, alpha=2)
    with torch.no_grad():
        layer.base.weight.copy_(300 + 30 * torch.randn(rows, fan_in, generator=g))
        layer.lora_A.copy_(0.5 + 0.5 * torch.rand(2, fan_in, generator=g))
        layer.lora_B.copy_(torch.rand(rows, 2, generator=g))
    model = add_lora(nn.Sequential(layer), ["0"]).half()
    opt = _wrap(model, sigma=sigma)
    seen = record_reads(layer.base)
    with opt.perturbed(), torch.no_grad():
        model(torch.ones(1, fan_in, dtype=torch.half))
    W = layer.base.weight
    assert torch.isfinite(seen[0]).all()
    eps = seen[0].double() - W.double()
    merged = W.double() + layer.scaling * layer.lora_B.double() @ layer.lora_A.double()
    expected = sigma * merged.norm(dim=1) / math.sqrt(fan_in)
    # The RMS of n normals has a relative standard error 1/√(2n) ≈ 0.011; allow 6 of those,
    # plus fp16 rounding of W + ε (an ulp of 300 is 0.25, against ε ≈ 30).
    ratio = eps.square().mean(dim=1).sqrt() / expected
    assert (ratio - 1).abs().max() <= 6 / math.sqrt(2 * fan_in) + 0.01, ratio


# -- 6, 7. sharpness() with an iterator, and with no target that ran --------------------------


def _dropout_model():
    g = torch.Generator().manual_seed(6)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    net = add_lora(net, ["0", "2"], rank=2, dropout=0.5)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g))
    return net, torch.randn(16, 6, generator=g)


def test_sharpness_over_an_iterator_of_modules_puts_them_in_eval_mode():
    net, x = _dropout_model()
    loss = lambda batch: net(batch).square().mean()  # noqa: E731
    by_list = flatopt.sharpness([net], loss, [x], sigma=0.1, samples=3)
    rng = torch.get_rng_state()
    by_iterator = flatopt.sharpness(iter([net]), loss, [x], sigma=0.1, samples=3)
    assert torch.equal(torch.get_rng_state(), rng)  # no dropout mask was drawn
    assert by_iterator == by_list
    assert all(m.training for m in net.modules())  # the modes are put back


def test_sharpness_raises_when_no_target_ran():
    model, x = _lora(seed=17)
    before = _hook_tables(model)

    def through_forward(batch):  # by hand, as module.forward(x) would: no hook runs
        return lora_forward(model, batch).square().mean()

    with pytest.raises(RuntimeError, match="none of the 2 target layers ran"):
        flatopt.sharpness(model, through_forward, [x], sigma=0.1, samples=2)
    assert _hook_tables(model) == before
    assert all(m.training for m in model.modules())


# -- 8. an embedding's padding entry ------------------------------------------------------------


@pytest.mark.parametrize("kind", [nn.Embedding, nn.EmbeddingBag])
def test_the_padding_entry_of_an_embedding_is_never_perturbed(kind):
    g = torch.Generator().manual_seed(7)
    pad = 3
    layer = kind(12, 5, padding_idx=pad)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(12, 5, generator=g))  # a nonzero pad row, on purpose
    opt = _wrap(layer, adapters=[flatopt.dense(layer)])
    seen = record_reads(layer)
    tokens = torch.tensor([[1, pad, 4], [pad, 0, 11]])
    with opt.perturbed():
        layer(tokens).sum().backward()
    W = layer.weight.detach()
    assert bits_equal(seen[0][pad], W[pad])
    # Every other entry is as without a padding_idx: the same per-dim norms (the pad row
    # included) and the same z.
    unkept = _expected(W, 0.3, 7, transposed=True)
    assert not torch.equal(unkept[pad], W[pad])
    others = [i for i in range(12) if i != pad]
    assert bits_equal(seen[0][others], unkept[others])
    assert torch.equal(layer.weight.grad[pad], torch.zeros(5))


# -- 9. saved tensors that are not plain strided tensors pass through -------------------------


class SparseGraphConv(nn.Linear):
    """A graph convolution A·(x Wᵀ) with a sparse adjacency, inside the target's forward."""

    def forward(self, x, adjacency):
        return torch.sparse.mm(adjacency, F.linear(x, self.weight, self.bias))


def test_a_sparse_tensor_saved_next_to_the_weight():
    g = torch.Generator().manual_seed(8)
    layer = SparseGraphConv(5, 4)
    opt = _wrap(layer, adapters=[flatopt.dense(layer)])
    adjacency = (torch.rand(6, 6, generator=g) > 0.5).float().to_sparse()
    x = torch.randn(6, 5, generator=g, requires_grad=True)
    seen = record_reads(layer)
    with opt.perturbed():
        layer(x, adjacency).square().sum().backward()
    grads = (x.grad.clone(), layer.weight.grad.clone())
    x.grad = layer.weight.grad = None
    perturbed = seen[0].requires_grad_(True)
    dense = adjacency.to_dense() @ F.linear(x, perturbed, layer.bias)
    dense.square().sum().backward()
    torch.testing.assert_close(grads[0], x.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], perturbed.grad, rtol=1e-5, atol=1e-6)


def test_a_nested_jagged_input():
    g = torch.Generator().manual_seed(9)
    layer = nn.Linear(5, 3)
    opt = _wrap(layer, adapters=[flatopt.dense(layer)])
    pieces = [torch.randn(2, 5, generator=g), torch.randn(3, 5, generator=g)]
    nested = torch.nested.nested_tensor(pieces, layout=torch.jagged, requires_grad=True)
    seen = record_reads(layer)
    with opt.perturbed():
        layer(nested).values().square().sum().backward()
    grad = layer.weight.grad.clone()
    layer.weight.grad = None
    perturbed = seen[0].requires_grad_(True)
    F.linear(torch.cat(pieces), perturbed, layer.bias).square().sum().backward()
    torch.testing.assert_close(grad, perturbed.grad, rtol=1e-5, atol=1e-6)


def _functional_setup():
    model, x = _lora(seed=10)
    opt = _wrap(model)
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    return model, x, opt, params


def _autograd_gradients(model, x, opt):
    model.zero_grad()
    with opt.perturbed():
        model(x).square().mean().backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("transform", ["grad", "jacrev"])
def test_torch_func_transforms_over_the_lora_parameters(transform):
    model, x, opt, params = _functional_setup()
    expected = _autograd_gradients(model, x, opt)

    def loss(p):
        return torch.func.functional_call(model, p, (x,)).square().mean()

    with opt.perturbed():
        if transform == "grad":
            got = torch.func.grad(loss)(params)
        else:
            got = torch.func.jacrev(loss)(params)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6)


def test_vmap_with_same_randomness_sees_one_noise_for_the_whole_batch():
    model, x = _lora(seed=11)
    opt = _wrap(model)
    with opt.perturbed():
        mapped = torch.func.vmap(model, randomness="same")(x.unsqueeze(1)).squeeze(1)
    with opt.perturbed():
        batched = model(x)
    torch.testing.assert_close(mapped, batched, rtol=1e-6, atol=1e-6)
    assert_nothing_armed(model)


def test_vmap_with_the_default_randomness():
    model, x = _lora(seed=11)
    opt = _wrap(model)
    with opt.perturbed():
        mapped = torch.func.vmap(model)(x.unsqueeze(1)).squeeze(1)
    with opt.perturbed():
        batched = model(x)
    torch.testing.assert_close(mapped, batched, rtol=1e-6, atol=1e-6)


# -- 10. the hooks can be taken off ---------------------------------------------------------------


def _hook_tables(model):
    return {
        name: (list(m._forward_pre_hooks.items()), list(m._forward_hooks.items()))
        for name, m in model.named_modules()
    }


def _flatopt_hooks(model):
    from flatopt._arming import _PostHook, _PreHook

    return [
        hook
        for m in model.modules()
        for hook in (*m._forward_pre_hooks.values(), *m._forward_hooks.values())
        if isinstance(hook, (_PreHook, _PostHook))
    ]


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("hooked", [False, True])
def test_sharpness_leaves_the_hook_tables_as_it_found_them(hooked):
    model, x = _lora(seed=12)
    if hooked:
        opt = _wrap(model)
    before = _hook_tables(model)
    flatopt.sharpness(model, lambda b: model(b).square().mean(), [x], sigma=0.1, samples=2)
    assert _hook_tables(model) == before
    if hooked:  # a FlatPerturb on the model keeps its hooks, and works
        seen = record_reads(model[0].base)
        with opt.perturbed():
            model(x)
        assert not torch.equal(seen[0], model[0].base.weight)
    else:
        scripted = torch.jit.script(model)
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-6, atol=1e-6)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_remove_hooks_takes_them_off_and_a_flatperturb_on_the_model_refuses_to_perturb():
    model, x = _lora(seed=13)
    opt = _wrap(model)
    clean = model(x)
    assert len(_flatopt_hooks(model)) == 4  # a pre-hook and a forward hook on each target
    with opt.perturbed(), pytest.raises(RuntimeError, match="restore"):
        model(x)
        flatopt.remove_hooks(model)  # not while armed
    assert flatopt.remove_hooks(model) == 2
    assert _flatopt_hooks(model) == []
    scripted = torch.jit.script(model)
    assert bits_equal(scripted(x), clean)
    with pytest.raises(RuntimeError, match="remove_hooks"):
        opt.perturb()
    assert not opt.is_perturbed
    assert flatopt.remove_hooks(model) == 0


def test_remove_hooks_under_auto_mode_warns_at_step_and_the_forward_sees_w():
    model, x = _lora(seed=14)
    opt = _wrap(model, auto=True)
    flatopt.remove_hooks(model)
    seen = record_reads(model[0].base)
    model(x).sum().backward()
    assert torch.equal(seen[0], model[0].base.weight)
    with pytest.warns(UserWarning, match="no target layer ran a training-mode forward"):
        opt.step()


def test_an_unarmed_fullgraph_compile_of_a_hooked_model():
    torch._dynamo.reset()
    model, x = _lora(seed=15)
    _wrap(model)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    assert bits_equal(compiled(x), model(x))


# -- 11. LBFGS's closure evaluations ------------------------------------------------------------


@pytest.mark.parametrize("resample", ["step", "call"])
def test_lbfgs_closure_evaluations_share_the_noise_only_under_step_resampling(resample):
    model, x = _lora(seed=16)
    inner = torch.optim.LBFGS(
        [p for p in model.parameters() if p.requires_grad], lr=0.5, max_iter=4
    )
    opt = flatopt.FlatPerturb(
        inner, model, sigma=0.3, schedule="constant", seed=2, resample=resample
    )
    seen = record_reads(model[0].base)

    def closure():
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    opt.step(closure)
    assert len(seen) == 4  # LBFGS evaluated the closure four times
    assert not any(torch.equal(w, model[0].base.weight) for w in seen)
    assert [bits_equal(seen[0], w) for w in seen[1:]] == [resample == "step"] * 3
    assert len({w.sum().item() for w in seen}) == (1 if resample == "step" else 4)
