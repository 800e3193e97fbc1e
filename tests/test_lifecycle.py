"""One owner per model, no stale state, nothing left behind: the lifecycle of what flatopt puts
on a model, and the seeds and row norms it computes afresh.

- a model belongs to one live FlatPerturb: every explicit/auto combination of a second one;
- the row norms follow the law after any change of W (writes through ``.data``, replaced
  Parameters), with no cache to go stale;
- a target called inside its own forward sees one W + ε; two threads on one armed target are
  refused; a KeyboardInterrupt leaves nothing behind (tests/test_robustness.py);
- CPU block seeds are distinct within a draw by construction and use 64 bits;
- the quantized output-side path with an input of another dtype than the layer computes in.
"""

import math
import threading

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_nothing_armed, bits_equal, record_reads, tiny_lora, toy_batches
from torch import nn

import flatopt
from flatopt.lora import add_lora
from flatopt.noise import (
    BLOCK_ELEMENTS,
    TARGET_STRIDE,
    block_seed,
    blocks,
    seed_block,
    seed_of_target,
    step_seed,
)


def _wrap(model, auto=False, seed=3, **kwargs):
    trainable = [p for p in model.parameters() if p.requires_grad]
    options = {"sigma": 0.1, "schedule": "constant", "seed": seed, "auto": auto, **kwargs}
    return flatopt.FlatPerturb(torch.optim.SGD(trainable, lr=0.05), model, **options)


def _one_step(opt, model, batch):
    x, y = batch
    if opt.auto:
        F.mse_loss(model(x), y).backward()
    else:
        with opt.perturbed():
            F.mse_loss(model(x), y).backward()
    opt.step()
    opt.zero_grad()


MODES = [False, True]
MODE_IDS = ["explicit", "auto"]


# -- one owner ----------------------------------------------------------------------------------


@pytest.mark.parametrize("second_auto", MODES, ids=[f"then-{m}" for m in MODE_IDS])
@pytest.mark.parametrize("first_auto", MODES, ids=MODE_IDS)
def test_a_second_wrapper_takes_the_model_over_and_the_first_one_raises(
    first_auto, second_auto, one_thread
):
    """The first trained a step; the second takes over with a warning naming it. The first
    then raises at perturb()/step() naming the second, and the second trains on exactly the
    noise a lone wrapper with its seed gives (it is not stuck and not silenced)."""
    batches = toy_batches(3)
    model = tiny_lora()
    first = _wrap(model, auto=first_auto, seed=3)
    _one_step(first, model, batches[0])
    with pytest.warns(UserWarning, match=rf"FlatPerturb\(seed=3, num_steps=1, auto={first_auto}"):
        second = _wrap(model, auto=second_auto, seed=4)
    named = rf"FlatPerturb\(seed=4, num_steps=0, auto={second_auto}\).*took it over"
    with pytest.raises(RuntimeError, match=named):
        first.step()
    if not first_auto:
        with pytest.raises(RuntimeError, match=named):
            first.perturb()
    assert_nothing_armed(model)

    # The second one's run is the run of a lone wrapper on an identical model.
    lone_model = tiny_lora()
    lone_model.load_state_dict(model.state_dict())
    lone = _wrap(lone_model, auto=second_auto, seed=4)
    seen, lone_seen = record_reads(model[0].base), record_reads(lone_model[0].base)
    for batch in batches[1:]:
        _one_step(second, model, batch)
        _one_step(lone, lone_model, batch)
    assert len(seen) == len(lone_seen) == 2
    assert all(bits_equal(a, b) for a, b in zip(seen, lone_seen))
    assert not torch.equal(seen[0], seen[1])  # a fresh ε per step
    assert not torch.equal(seen[0], model[0].base.weight)
    assert all(
        bits_equal(a.detach(), b.detach())
        for a, b in zip(model.parameters(), lone_model.parameters())
    )


@pytest.mark.parametrize("second_auto", MODES, ids=[f"then-{m}" for m in MODE_IDS])
def test_a_wrapper_built_while_another_is_between_perturb_and_restore_is_refused(second_auto):
    model = tiny_lora()
    first = _wrap(model, seed=3)
    ((x, y),) = toy_batches(1)
    with first.perturbed():
        with pytest.raises(RuntimeError, match=r"perturbed by FlatPerturb\(seed=3.*restore\(\)"):
            _wrap(model, auto=second_auto, seed=4)
        F.mse_loss(model(x), y).backward()
    first.step()  # the first one was left as it was
    assert first.num_steps == 1


@pytest.mark.parametrize("second_auto", MODES, ids=[f"then-{m}" for m in MODE_IDS])
def test_an_auto_wrapper_armed_between_forwards_is_taken_over_cleanly(second_auto):
    """An auto wrapper stays armed from a step's first forward to step(): a trainer that
    stopped mid-step. The new wrapper disarms it; the model holds W."""
    model = tiny_lora()
    first = _wrap(model, auto=True, seed=3)
    ((x, y),) = toy_batches(1)
    weight = model[0].base.weight
    F.mse_loss(model(x), y).backward()
    assert first.is_perturbed
    with pytest.warns(UserWarning, match="takes it over"):
        second = _wrap(model, auto=second_auto, seed=4)
    assert not first.is_perturbed and not second.is_perturbed
    assert model[0].base._parameters["weight"] is weight
    assert_nothing_armed(model)
    with pytest.raises(RuntimeError, match="took it over"):
        first.step()


def test_an_unused_wrapper_is_handed_over_quietly_and_remove_hooks_releases_a_model():
    import warnings

    model = tiny_lora()
    first = _wrap(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = _wrap(model, seed=4)  # `opt = FlatPerturb(...)` run twice: nothing to say
    with pytest.raises(RuntimeError, match="took it over"):
        first.perturb()
    _one_step(second, model, toy_batches(1)[0])
    flatopt.remove_hooks(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        third = _wrap(model, seed=5)  # released explicitly: no owner to take over from
    _one_step(third, model, toy_batches(1)[0])
    assert third.num_steps == 1


def test_wrappers_on_disjoint_parts_of_a_model_do_not_compete():
    import warnings

    model = nn.Sequential(tiny_lora(0), tiny_lora(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        left, right = _wrap(model[0]), _wrap(model[1], seed=4)
    x = torch.randn(2, 6)
    with left.perturbed(), right.perturbed():
        model[1](model[0](x)[:, :3].repeat(1, 2))
    left.step()
    right.step()


# -- row norms from the current W ---------------------------------------------------------------


def _layer(rows=512, fan_in=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = add_lora(nn.Sequential(nn.Linear(fan_in, rows, bias=False)), ["0"], rank=4, alpha=4)
    with torch.no_grad():
        model[0].base.weight.copy_(torch.randn(rows, fan_in, generator=g))
        model[0].lora_B.copy_(torch.randn(rows, 4, generator=g) * 0.3)
    return model


def _law(layer, sigma):
    W = layer.base.weight.detach().double()
    merged = W + layer.scaling * layer.lora_B.detach().double() @ layer.lora_A.detach().double()
    return sigma * torch.linalg.vector_norm(merged, dim=1) / math.sqrt(W.shape[1])


def _std(opt, model, x):
    with opt.perturbed():
        model(x)
        std = opt._state.stds[0].double()
    opt.step()
    return std


@pytest.mark.parametrize(
    "change",
    ["data_mul", "data_assign", "parameter_twice", "no_grad_copy"],
)
def test_the_std_follows_the_law_after_any_change_of_w(change, one_thread):
    """Writes through ``.data`` bump no version counter, and a replaced Parameter can reuse the
    old one's id and storage: the std is computed from the current W at every step."""
    model = _layer()
    layer = model[0]
    opt = _wrap(model)
    x = torch.randn(2, 512)
    torch.testing.assert_close(_std(opt, model, x), _law(layer, 0.1), rtol=1e-5, atol=0)
    if change == "data_mul":
        layer.base.weight.data.mul_(2)  # what loralib's and peft's merges do
    elif change == "data_assign":
        layer.base.weight.data = layer.base.weight.data * 0.25
    elif change == "parameter_twice":
        for scale in (3.0, 0.5):
            layer.base.weight = nn.Parameter(layer.base.weight.detach() * scale, False)
    else:
        with torch.no_grad():
            layer.base.weight.copy_(layer.base.weight * -1.5)
    for _ in range(2):  # and at the step after
        torch.testing.assert_close(_std(opt, model, x), _law(layer, 0.1), rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_row_norms_are_the_law_within_the_weights_rounding(dtype):
    """bf16 builds W' in bf16 and reduces in fp32; fp16 builds W' in fp32 by row chunks."""
    g = torch.Generator().manual_seed(2)
    rows, fan_in, rank = 256, 1024, 8  # above BLOCK_ELEMENTS: chunked for fp16
    W = torch.randn(rows, fan_in, generator=g).to(dtype)
    B = (torch.randn(rows, rank, generator=g) * 0.2).to(dtype)
    A = torch.randn(rank, fan_in, generator=g).to(dtype)
    norms = flatopt.noise.row_norms(W, flatopt.LowRank(B, A, 0.5))
    assert norms.dtype == torch.float32
    reference = torch.linalg.vector_norm(W.double() + 0.5 * B.double() @ A.double(), dim=1)
    # bf16: W' (and on CPU the product B·A) rounded to 8 bits of mantissa, 2⁻⁹ relative per
    # entry, errors of either sign: the row norm is a few 1e-4 off, finer than the bf16
    # rounding of W + ε itself. fp16: fp32 throughout, a few 1e-6.
    rtol = {torch.bfloat16: 1e-3, torch.float16: 1e-5}[dtype]
    torch.testing.assert_close(norms.double(), reference, rtol=rtol, atol=0)


# -- calls: re-entrancy, threads -----------------------------------------------------------------


class RecursiveCell(nn.Module):
    """Reads its weight before and after calling itself, as a recursive cell does."""

    def __init__(self, size=6):
        super().__init__()
        self.weight = nn.Parameter(
            torch.randn(size, size, generator=torch.Generator().manual_seed(0))
        )
        self.weight.requires_grad_(False)
        self.lora_B = nn.Parameter(torch.zeros(size, 2))
        self.lora_A = nn.Parameter(torch.randn(2, size, generator=torch.Generator().manual_seed(1)))
        self.reads = []

    def forward(self, x, depth=1):
        self.reads.append(self.weight.detach().clone())
        h = torch.tanh(F.linear(x, self.weight))
        if depth:
            h = self(h, depth - 1)
        self.reads.append(self.weight.detach().clone())
        return F.linear(h, self.weight) + x @ self.lora_A.t() @ self.lora_B.t()


def _cell_adapter(module):
    if isinstance(module, RecursiveCell):
        return flatopt.Target(
            module, "weight", lambda: flatopt.LowRank(module.lora_B, module.lora_A)
        )
    return None


@pytest.mark.parametrize("auto", MODES, ids=MODE_IDS)
def test_a_target_called_inside_its_own_forward_sees_one_w_plus_eps(auto):
    cell = RecursiveCell()
    weight = cell.weight
    opt = _wrap(cell, auto=auto, adapters=[_cell_adapter])
    x = torch.randn(3, 6, requires_grad=True)
    if auto:
        cell(x, depth=2).square().sum().backward()
    else:
        with opt.perturbed():
            cell(x, depth=2).square().sum().backward()
    assert len(cell.reads) == 6
    assert all(torch.equal(read, cell.reads[0]) for read in cell.reads)
    assert not torch.equal(cell.reads[0], weight)
    grads = [x.grad.clone(), cell.lora_B.grad.clone()]
    opt.step()
    assert cell._parameters["weight"] is weight
    assert_nothing_armed(cell)
    # The gradients are those at that W + ε: a cell holding W + ε as its weight, by hand.
    reference = RecursiveCell()
    with torch.no_grad():
        reference.weight.copy_(cell.reads[0])
    x_ref = x.detach().clone().requires_grad_(True)
    reference(x_ref, depth=2).square().sum().backward()
    torch.testing.assert_close(grads[0], x_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], reference.lora_B.grad, rtol=1e-5, atol=1e-6)


def test_two_threads_on_one_armed_target_are_refused_and_leave_nothing_behind():
    model = add_lora(nn.Sequential(nn.Linear(4, 4)), ["0"], rank=2)
    target = model[0].base
    entered, release = threading.Event(), threading.Event()

    def wait(module, args):
        if threading.current_thread().name == "first":
            entered.set()
            release.wait(10)

    # Registered after FlatPerturb's hooks, so it runs while W + ε is in the module.
    opt = _wrap(model)
    handle = target.register_forward_pre_hook(wait)
    weight = target.weight
    errors, outputs = [], []

    def first():
        try:
            outputs.append(model(torch.ones(1, 4)))
        except BaseException as error:  # pragma: no cover - would fail the assertions below
            errors.append(error)

    opt.perturb()
    thread = threading.Thread(target=first, name="first")
    thread.start()
    assert entered.wait(10)
    try:
        with pytest.raises(RuntimeError, match="called from two threads at once"):
            model(torch.ones(1, 4))
        assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    finally:
        release.set()
        thread.join(10)
    handle.remove()
    assert errors == [] and len(outputs) == 1
    opt.restore()
    assert target._parameters["weight"] is weight
    assert_nothing_armed(model)
    # Once the first thread's call is over, another thread may run perturbed calls.
    with opt.perturbed():
        result = []
        other = threading.Thread(target=lambda: result.append(model(torch.ones(1, 4))))
        other.start()
        other.join(10)
        assert len(result) == 1
    assert target._parameters["weight"] is weight


# -- CPU seeds ----------------------------------------------------------------------------------


def _draw_block_seeds(prefix, shapes, rank=0):
    seeds = []
    for target, shape in enumerate(shapes):
        rows, cols = shape
        per_block = max(1, BLOCK_ELEMENTS // cols)
        count = -(-rows // per_block) if rows * cols > BLOCK_ELEMENTS else 1
        seed = seed_of_target(prefix, target, rank)
        seeds.extend(block_seed(seed, b) for b in range(count))
    return seeds


def test_the_blocks_of_a_seven_billion_parameter_draw_never_share_a_seed():
    """224 targets of 4096², 57,344 blocks per draw: with 32-bit seeds, ~0.4 pairs of them
    repeated per step. Their low 32 bits are now distinct by construction, in every draw."""
    shapes = [(4096, 4096)] * 224
    for step in range(3):
        seeds = _draw_block_seeds(step_seed(11, step), shapes)
        assert len(seeds) == 57_344
        assert len({s & 0xFFFFFFFF for s in seeds}) == len(seeds)


def test_a_seventy_billion_parameter_draw_never_shares_a_block_seed():
    """80 layers of a 70B-shaped model (8192 wide, 28672 MLP): 1,064,960 blocks per draw."""
    layer = [(8192, 8192), (1024, 8192), (1024, 8192), (8192, 8192)] + [(28672, 8192)] * 2
    shapes = [*layer, (8192, 28672)] * 80
    seeds = _draw_block_seeds(step_seed(5, 0), shapes)
    assert len(seeds) > 1_000_000
    assert len({s & 0xFFFFFFFF for s in seeds}) == len(seeds)
    assert len(shapes) <= 2**32 // TARGET_STRIDE  # the construction's bound on targets


def _corr(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def test_block_draws_use_all_64_bits_and_neighbours_are_uncorrelated():
    """torch's CPU generator keeps 32 bits of a seed: seeds that differ only above bit 32
    would draw the same z. seed_block uses all 64. |corr| of independent N = 65,536 draws is
    ≲ 1/√N; the bound 5/√N fails by chance with probability ~6e-7 per pair."""
    n = BLOCK_ELEMENTS
    bound = 5 / math.sqrt(n)
    g = torch.Generator()

    def z(seed):
        seed_block(g, seed)
        return torch.randn(n, generator=g)

    low = 0x1234ABCD
    same_low = [z(low | (high << 32)) for high in (1, 2)]
    assert abs(_corr(*same_low)) < bound
    plain = torch.Generator()
    plain.manual_seed(low | (1 << 32))
    a = torch.randn(n, generator=plain)
    plain.manual_seed(low | (2 << 32))
    assert torch.equal(a, torch.randn(n, generator=plain))  # what seed_block avoids
    # Neighbouring blocks of one target, and block 0 of neighbouring targets.
    prefix = step_seed(7, 0)
    seed0, seed1 = seed_of_target(prefix, 0), seed_of_target(prefix, 1)
    assert abs(_corr(z(block_seed(seed0, 0)), z(block_seed(seed0, 1)))) < bound
    assert abs(_corr(z(block_seed(seed0, 0)), z(block_seed(seed1, 0)))) < bound
    sample = z(block_seed(seed0, 3))
    assert abs(float(sample.mean())) < 5 / math.sqrt(n)
    assert abs(float(sample.std()) - 1) < 5 * math.sqrt(2 / n)


def test_a_multi_block_weight_draws_the_same_z_by_its_two_paths():
    """perturbed_weight and draw_noise seed their blocks alike (64-bit block seeds)."""
    weight = torch.zeros(512, 256)
    std = torch.ones(512)
    g = torch.Generator()
    seed = seed_of_target(step_seed(1, 2), 3)
    eps = flatopt.noise.draw_noise(weight, std, generator=g, seed=seed)
    assert len(blocks(weight)) == 2
    assert torch.equal(flatopt.noise.perturbed_weight(weight, std, generator=g, seed=seed), eps)


# -- the quantized path with an input of another dtype -------------------------------------------


def _quantize(weight):
    scales = weight.abs().amax(dim=1).double() / 127
    zeros = torch.zeros(weight.shape[0], dtype=torch.long)
    return torch.quantize_per_channel(weight, scales, zeros, 0, torch.qint8)


class Bf16QuantLinear(nn.Module):
    """An int8 base computing in bf16 from an input of any floating dtype (bitsandbytes'
    compute_dtype), plus trainable LoRA factors."""

    def __init__(self, fan_in=8, out=6, rank=2):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("weight", _quantize(torch.randn(out, fan_in, generator=g)))
        self.lora_A = nn.Parameter(torch.randn(rank, fan_in, generator=g) * 0.3)
        self.lora_B = nn.Parameter(torch.randn(out, rank, generator=g) * 0.3)

    def forward(self, x):
        h = x.to(torch.bfloat16)
        base = F.linear(h, self.weight.dequantize().to(torch.bfloat16))
        return base + (h @ self.lora_A.t().to(h.dtype)) @ self.lora_B.t().to(h.dtype)


def _quant_adapter(module):
    if isinstance(module, Bf16QuantLinear):
        return flatopt.Target(
            module, "weight", lambda: flatopt.LowRank(module.lora_B, module.lora_A)
        )
    return None


def test_a_quantized_layer_computing_in_bf16_from_an_fp32_input_is_perturbed():
    layer = Bf16QuantLinear()
    opt = _wrap(layer, adapters=[_quant_adapter])
    x = torch.randn(5, 8, requires_grad=True)
    clean = layer(x).detach()
    with opt.perturbed():
        out = layer(x)
        out.float().square().sum().backward()
    assert out.dtype == torch.bfloat16
    assert x.grad is not None and x.grad.dtype == torch.float32
    assert not torch.equal(out.detach(), clean)
    # f(x; ε) is the explicit ε applied to the bf16 input.
    std = opt._state.stds[0]
    seed = seed_of_target(step_seed(3, 0), 0)
    eps = flatopt.noise.draw_noise(
        torch.empty(6, 8), std, generator=torch.Generator(), seed=seed, dtype=torch.bfloat16
    ).to(torch.bfloat16)
    expected = clean + F.linear(x.detach().to(torch.bfloat16), eps)
    torch.testing.assert_close(out.detach(), expected, rtol=2e-2, atol=2e-2)


# -- counting forwards left clean ---------------------------------------------------------------


def test_step_closure_over_a_ramp_from_zero_does_not_warn_of_clean_forwards():
    """At σ_0 = 0 nothing is armed, so the closure's forwards were counted as clean and the
    next step warned that they ran outside perturb()/restore()."""
    import warnings

    model = tiny_lora()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = flatopt.FlatPerturb(
        torch.optim.SGD(trainable, lr=0.05), model, sigma=0.1, total_steps=4, seed=1
    )
    batches = toy_batches(3)

    def closure(batch):
        def run():
            opt.zero_grad()
            loss = F.mse_loss(model(batch[0]), batch[1])
            loss.backward()
            return loss

        return run

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for batch in batches:
            opt.step(closure(batch))
    # A forward outside any perturbation before step(closure) is still reported (2 targets).
    model(batches[0][0])
    with pytest.warns(UserWarning, match="2 training-mode forwards of target layers ran outside"):
        opt.step(closure(batches[1]))
