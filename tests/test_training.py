"""FlatPerturb inside real training loops: gradient accumulation, autocast and GradScaler, mixed
dtypes, activation checkpointing, LR schedulers, framework-style wrappers, failures mid-step and
long runs. Every test runs the real torch machinery on each device of the ``device`` fixture
(autocast and GradScaler on that device); DDP is in test_ddp.py."""

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    assert_untouched,
    bits_equal,
    build,
    frozen_names,
    reference_forward,
    reference_weights,
    snapshot,
)
from torch import nn
from torch.optim import lr_scheduler
from torch.utils.checkpoint import checkpoint

import flatopt
from flatopt.lora import LoRALinear, add_lora

pytestmark = pytest.mark.usefixtures("one_thread")


def _top_hooks():
    return torch._C._autograd._top_saved_tensors_default_hooks(False)


def _model(dtype=torch.float32, seed=0, out=8, fan_in=6, device="cpu"):
    """``LoRALinear(fan_in, out) -> Tanh -> LoRALinear(out, 3)``, all drawn from ``seed``."""
    return build("lora", dtype, out, fan_in, 2, seed, device)[0]


def _batch(rows, fan_in=6, seed=1, dtype=torch.float32, device="cpu"):
    """Inputs and targets drawn on the CPU from ``seed``, moved to ``device``."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(rows, fan_in, generator=g), torch.randn(rows, 3, generator=g)
    return x.to(device, dtype), y.to(device, dtype)


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _wrap(model, inner="sgd", lr=0.05, adapters=(), **kwargs):
    if inner == "sgd":
        optimizer = torch.optim.SGD(_trainable(model), lr=lr)
    else:
        optimizer = torch.optim.AdamW(_trainable(model), lr=lr)
    kwargs.setdefault("sigma", 0.2)
    kwargs.setdefault("schedule", "constant")
    kwargs.setdefault("seed", 3)
    return flatopt.FlatPerturb(optimizer, model, adapters=adapters, **kwargs)


def _record(module):
    """Clone the weight ``module`` reads at each of its calls: W + ε while the noise is armed.

    Prepended, the hook runs before any other forward hook, so before flatopt swaps W back.
    """
    seen = []

    def hook(module, args, output):
        seen.append(module.weight.detach().clone())

    module.register_forward_hook(hook, prepend=True)
    return seen


def _grads(opt):
    return [p.grad.detach().clone() for group in opt.param_groups for p in group["params"]]


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _cosine(step, total):
    return 0.5 * (1 - math.cos(math.pi * min(step, total) / total))


# -- gradient accumulation ----------------------------------------------------------------------


@pytest.mark.parametrize("resample", ["step", "call"])
def test_micro_batches_of_one_step_share_the_noise_only_under_step_resampling(resample, device):
    model = _model(device=device)
    opt = _wrap(model, resample=resample)
    seen = _record(model[0].base)
    x, y = _batch(12, device=device)
    for _ in range(2):  # two optimizer steps of three micro-batches each
        for xb, yb in zip(x.split(4), y.split(4)):
            with opt.perturbed():
                (F.mse_loss(model(xb), yb) / 3).backward()
        opt.step()
        opt.zero_grad()
    assert len(seen) == 6
    assert not any(torch.equal(w, model[0].base.weight) for w in seen)  # the noise is real
    for step in (0, 1):
        first, *rest = seen[3 * step : 3 * step + 3]
        assert [bits_equal(first, other) for other in rest] == [resample == "step"] * 2
    assert not torch.equal(seen[0], seen[3])  # the next step draws a new ε either way


@pytest.mark.parametrize("micro", [2, 4])
def test_k_micro_batches_accumulate_the_gradient_of_one_batch_of_k_b_at_the_same_noise(
    micro, device
):
    x, y = _batch(3 * micro, device=device)
    grads = {}
    for mode in ("one batch", "step", "call"):
        model = _model(device=device)
        opt = _wrap(model, resample="call" if mode == "call" else "step")
        if mode == "one batch":
            with opt.perturbed():
                F.mse_loss(model(x), y).backward()
        else:
            for xb, yb in zip(x.split(3), y.split(3)):
                with opt.perturbed():
                    (F.mse_loss(model(xb), yb) / micro).backward()
        grads[mode] = _grads(opt)
    # Only the summation order differs: fp32 round-off.
    for got, want in zip(grads["step"], grads["one batch"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # Fresh noise per micro-batch estimates the expectation differently: the check can tell.
    assert not all(
        torch.allclose(got, want, rtol=1e-3, atol=1e-4)
        for got, want in zip(grads["call"], grads["one batch"])
    )


@pytest.mark.parametrize("resample", ["step", "call"])
def test_the_schedule_and_the_noise_count_optimizer_steps_not_micro_batches(resample, device):
    sigma, total, steps = 0.2, 4, 6
    runs = {}
    for micro in (1, 3):
        model = _model(device=device)
        # lr=0 keeps the LoRA factors, so ε depends only on (seed, step, draw).
        opt = _wrap(
            model, lr=0.0, sigma=sigma, schedule="cosine", total_steps=total, resample=resample
        )
        seen = _record(model[0].base)
        x, y = _batch(6, device=device)
        sigmas = []
        for _ in range(steps):
            sigmas.append(opt.sigma)
            for xb, yb in zip(x.split(6 // micro), y.split(6 // micro)):
                with opt.perturbed():
                    F.mse_loss(model(xb), yb).backward()
            opt.step()
            opt.zero_grad()
        assert opt.num_steps == steps
        assert sigmas == pytest.approx([sigma * _cosine(t, total) for t in range(steps)])
        runs[micro] = seen
    assert len(runs[1]) == steps and len(runs[3]) == 3 * steps
    # The first micro-batch of step t sees the ε of step t, however many micro-batches there are.
    assert all(bits_equal(runs[3][3 * t], runs[1][t]) for t in range(steps))
    assert torch.equal(runs[1][0], model[0].base.weight)  # σ_0 = 0 on the cosine ramp
    assert not torch.equal(runs[1][1], model[0].base.weight)


# -- mixed precision --------------------------------------------------------------------------

DTYPE_MIXES = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32),  # bf16 base, fp32 LoRA: the usual memory-saving mix
    (torch.float32, torch.bfloat16),
]


@pytest.mark.parametrize(("base_dtype", "lora_dtype"), DTYPE_MIXES)
def test_a_bf16_autocast_step_matches_the_reference_for_every_dtype_mix(
    base_dtype, lora_dtype, device
):
    model = _model(out=16, fan_in=12, device=device)
    model.append(nn.Linear(3, 2))  # a new, fully trained head, added as a dense target
    model.to(device, base_dtype)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.lora_A = nn.Parameter(m.lora_A.detach().to(lora_dtype))
            m.lora_B = nn.Parameter(m.lora_B.detach().to(lora_dtype))
    head = model[3]
    opt = _wrap(model, adapters=[flatopt.dense(head)], sigma=0.2)
    seen = _record(model[0].base)
    x, y = _batch(8, fan_in=12, device=device)
    start = snapshot(model)
    frozen = frozen_names(model)
    with torch.autocast(device, dtype=torch.bfloat16):
        clean = model(x)
    with opt.perturbed():
        with torch.autocast(device, dtype=torch.bfloat16):
            fast = model(x)
        F.mse_loss(fast.float(), y[:, :2]).backward()
    assert_untouched(model, start)
    fast_grads = _grads(opt)
    opt.zero_grad()
    replaced = reference_weights(opt, model)
    with torch.autocast(device, dtype=torch.bfloat16):
        slow = reference_forward(model, replaced, x)
    F.mse_loss(slow.float(), y[:, :2]).backward()
    slow_grads = _grads(opt)

    assert seen[-1].dtype == base_dtype  # W + ε in W's dtype; autocast casts it for the matmul
    # W + ε: the fused addcmul and the reference's fp32 ε may round one ulp apart.
    torch.testing.assert_close(seen[-1], replaced["0.base.weight"], rtol=1e-2, atol=1e-3)
    assert fast.dtype == torch.bfloat16
    assert not torch.equal(fast, clean)
    # bf16 matmuls: a few bf16 ulps after three layers.
    torch.testing.assert_close(fast, slow, rtol=3e-2, atol=3e-2)
    for got, want, param in zip(fast_grads, slow_grads, _trainable(model)):
        assert got.dtype == param.dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=5e-2, atol=5e-2)
    opt.step()
    assert [p.dtype for p in _trainable(model)] == [g.dtype for g in fast_grads]
    assert_untouched(model, start, frozen)


def _amp_step(model, opt, scaler, x, y):
    """One fp16 GradScaler step, the documented way: backward inside, scaler.step outside."""
    with opt.perturbed():
        with torch.autocast(x.device.type, dtype=torch.float16):
            loss = F.mse_loss(model(x).float(), y)
        scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    return loss


def test_grad_scaler_unscales_through_the_wrapper_and_gives_the_plain_gradients(device):
    scaled_model, plain_model = _model(device=device), _model(device=device)
    scaled = _wrap(scaled_model, inner="adamw", lr=1e-2)
    plain = _wrap(plain_model, inner="adamw", lr=1e-2)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**12, growth_interval=2)
    start = snapshot(scaled_model)
    x, y = _batch(8, device=device)
    for _ in range(5):
        with scaled.perturbed():
            with torch.autocast(device, dtype=torch.float16):
                loss = F.mse_loss(scaled_model(x).float(), y)
            scaler.scale(loss).backward()
        scaler.unscale_(scaled)  # unscales the inner optimizer's gradients, via param_groups
        unscaled = _grads(scaled)
        scaler.step(scaled)
        scaler.update()
        scaled.zero_grad()
        with plain.perturbed():
            with torch.autocast(device, dtype=torch.float16):
                plain_loss = F.mse_loss(plain_model(x).float(), y)
            plain_loss.backward()
        for got, want in zip(unscaled, _grads(plain)):
            # fp16 backward at two different scales: a few fp16 ulps.
            torch.testing.assert_close(got, want, rtol=5e-3, atol=1e-5)
        plain.step()
        plain.zero_grad()
    assert scaler.get_scale() > 2.0**12  # no step was skipped, so the scale grew
    assert scaled.num_steps == plain.num_steps == 5
    assert not scaled.is_perturbed
    assert_untouched(scaled_model, start, frozen_names(scaled_model))
    for a, b in zip(scaled_model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("poison", [float("inf"), float("nan")])
def test_a_step_the_grad_scaler_skips_does_not_advance_and_leaves_nothing_perturbed(poison, device):
    batches = [_batch(4, seed=s, device=device) for s in range(5)]
    runs = {}
    for poisoned in (False, True):
        model = _model(device=device)
        opt = _wrap(model, inner="adamw", lr=1e-2, schedule="linear", total_steps=4)
        scaler = torch.amp.GradScaler(device, init_scale=2.0**8, growth_interval=10**6)
        seen = _record(model[0].base)
        start = snapshot(model)
        for index, (x, y) in enumerate(batches):
            if poisoned and index == 2:
                bad = x.clone()
                bad[0, 0] = poison
                before, steps, scale = _params(model), opt.num_steps, scaler.get_scale()
                loss = _amp_step(model, opt, scaler, bad, y)
                assert not torch.isfinite(loss)
                assert scaler.get_scale() == scale / 2  # the scaler saw inf/NaN and skipped
                assert opt.num_steps == steps  # so the schedule did not advance
                assert not opt.is_perturbed
                assert all(bits_equal(a, b) for a, b in zip(before, _params(model)))
                assert_untouched(model, start, frozen_names(model))
            _amp_step(model, opt, scaler, x, y)
        assert opt.num_steps == len(batches)
        assert_untouched(model, start, frozen_names(model))
        runs[poisoned] = (seen, _params(model))
    (clean_seen, clean_params), (seen, params) = runs[False], runs[True]
    # The retried step sees the skipped step's ε: same step count, same LoRA factors.
    assert len(seen) == len(clean_seen) + 1
    assert bits_equal(seen[2], seen[3]) and bits_equal(seen[3], clean_seen[2])
    # Afterwards the run is the one that never met the bad batch, up to fp16 rounding of
    # gradients taken at a halved scale.
    for a, b in zip(params, clean_params):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# -- activation checkpointing -----------------------------------------------------------------


class CheckpointedMLP(nn.Module):
    def __init__(self, mode, device="cpu"):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.mode = mode
        self.stem = nn.Linear(6, 12)
        self.block = nn.Sequential(nn.Linear(12, 12), nn.GELU(), nn.Linear(12, 12))
        self.head = nn.Linear(12, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)
        add_lora(self, ["stem", "block.0", "block.2", "head"], rank=2)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, LoRALinear):
                    m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) * 0.3)
                    m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.3)
        self.to(device)

    def forward(self, x):
        h = self.stem(x)
        if self.mode is None:
            h = self.block(h)
        else:
            h = checkpoint(self.block, h, use_reentrant=self.mode == "reentrant")
        return self.head(h)


@pytest.mark.parametrize("amp", [False, True])
@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
def test_a_recomputed_forward_sees_the_noise_of_its_own_perturb_call(mode, amp, device):
    x, y = _batch(8, device=device)
    results = {}
    for run_mode in (None, mode):
        model = CheckpointedMLP(run_mode, device=device)
        opt = _wrap(model, resample="call", sigma=0.3)  # a fresh ε at every perturb()
        seen = _record(model.block[0].base)
        start = snapshot(model)
        for xb, yb in zip(x.split(4), y.split(4)):  # two micro-batches, accumulated
            with opt.perturbed():
                with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
                    out = model(xb)
                F.mse_loss(out.float(), yb).backward()
        assert_untouched(model, start)
        results[run_mode] = (seen, _grads(opt))
    (plain_seen, plain_grads), (seen, grads) = results[None], results[mode]
    # Forward, recompute in backward, forward, recompute: each pair sees one ε.
    assert len(plain_seen) == 2 and len(seen) == 4
    assert bits_equal(seen[0], seen[1]) and bits_equal(seen[2], seen[3])
    assert not torch.equal(seen[0], seen[2])
    assert bits_equal(seen[0], plain_seen[0]) and bits_equal(seen[2], plain_seen[1])
    for got, want in zip(grads, plain_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# -- LR schedulers and frameworks ---------------------------------------------------------------

SCHEDULERS = {
    "OneCycleLR": lambda opt: lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=8),
    "SequentialLR": lambda opt: lr_scheduler.SequentialLR(
        opt,
        [
            lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=3),
            lr_scheduler.CosineAnnealingLR(opt, T_max=5),
        ],
        milestones=[3],
    ),
    "ReduceLROnPlateau": lambda opt: lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=1),
}


def _hyperparameters(optimizer):
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


@pytest.mark.parametrize("name", SCHEDULERS)
def test_lr_schedulers_on_the_wrapper_drive_the_inner_optimizer(name, device):
    flat_model, bare_model = _model(device=device), _model(device=device)
    opt = _wrap(flat_model, inner="adamw", lr=0.01, sigma=0.1, schedule="cosine", total_steps=8)
    bare = torch.optim.AdamW(_trainable(bare_model), lr=0.01)
    flat_scheduler, bare_scheduler = SCHEDULERS[name](opt), SCHEDULERS[name](bare)
    plateau = [1.0, 0.9] + [0.95] * 6  # improves once, then stalls
    x, y = _batch(8, device=device)
    flat_history, bare_history = [], []
    with warnings.catch_warnings():
        # The scheduler must see the wrapper's step() as the optimizer's step().
        warnings.filterwarnings("error", message=r"Detected call of `lr_scheduler\.step\(\)`")
        for step in range(8):
            with opt.perturbed():
                F.mse_loss(flat_model(x), y).backward()
            opt.step()
            opt.zero_grad()
            F.mse_loss(bare_model(x), y).backward()
            bare.step()
            bare.zero_grad()
            if name == "ReduceLROnPlateau":
                flat_scheduler.step(plateau[step])
                bare_scheduler.step(plateau[step])
            else:
                flat_scheduler.step()
                bare_scheduler.step()
            flat_history.append(_hyperparameters(opt.optimizer))
            bare_history.append(_hyperparameters(bare))
    assert flat_history == bare_history  # lr (and OneCycle's betas) reach the inner optimizer
    assert len({h[0]["lr"] for h in flat_history}) > 2
    assert opt.num_steps == 8


def test_frozen_and_gradless_parameters_handed_to_the_optimizer_are_never_written(device):
    model = _model(device=device)
    # Every parameter, frozen ones included, and weight decay that would move any it touched.
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    opt = flatopt.FlatPerturb(inner, model, sigma=0.2, schedule="constant", seed=0)
    start = snapshot(model)
    x, _ = _batch(4, device=device)
    second = [model[2].lora_A, model[2].lora_B]
    for step in range(4):
        before = [p.detach().clone() for p in second]
        with opt.perturbed():
            # On odd steps the second layer is not used, so its LoRA factors get grad=None.
            out = model[:2](x) if step % 2 else model(x)
            out.square().mean().backward()
        assert (second[0].grad is None) == bool(step % 2)
        opt.step()
        opt.zero_grad()
        moved = [not torch.equal(a, b) for a, b in zip(before, second)]
        assert moved == [not step % 2] * 2
    assert_untouched(model, start, frozen_names(model))
    assert not torch.equal(model[0].lora_B, start["0.lora_B"][0])


class LightningStyleOptimizer:
    """What Lightning's ``LightningOptimizer`` does to an optimizer: a dynamic subclass of both
    classes so that ``isinstance`` checks pass, attribute access forwarded to the wrapped one,
    and ``step(closure)`` handed through."""

    def __init__(self, optimizer):
        self._optimizer = optimizer
        self.__class__ = type(
            "Lightning" + optimizer.__class__.__name__, (self.__class__, optimizer.__class__), {}
        )

    @property
    def optimizer(self):
        return self._optimizer

    def step(self, closure=None, **kwargs):
        return self._optimizer.step(closure, **kwargs)

    def __getattr__(self, item):
        return getattr(self._optimizer, item)


def test_a_lightning_style_wrapper_accepts_it_and_its_closure_runs_perturbed(device):
    model, twin = _model(device=device), _model(device=device)
    opt, twin_opt = _wrap(model, inner="adamw", lr=1e-2), _wrap(twin, inner="adamw", lr=1e-2)
    wrapped = LightningStyleOptimizer(opt)
    assert isinstance(opt, torch.optim.Optimizer)
    assert isinstance(wrapped, torch.optim.Optimizer) and isinstance(wrapped, flatopt.FlatPerturb)
    assert wrapped.param_groups is opt.optimizer.param_groups
    scheduler = lr_scheduler.StepLR(wrapped, step_size=1, gamma=0.5)
    twin_scheduler = lr_scheduler.StepLR(twin_opt, step_size=1, gamma=0.5)
    calls = []
    opt.register_step_post_hook(lambda optimizer, args, kwargs: calls.append(optimizer))
    x, y = _batch(4, device=device)
    armed = []

    def closure():  # what Lightning's automatic optimization hands to step()
        armed.append(opt.is_perturbed)
        wrapped.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    start = snapshot(model)
    losses = []
    for _ in range(3):
        losses.append(wrapped.step(closure).item())
        scheduler.step()
        with twin_opt.perturbed():
            twin_loss = F.mse_loss(twin(x), y)
            twin_loss.backward()
        twin_opt.step()
        twin_opt.zero_grad()
        twin_scheduler.step()
        assert losses[-1] == twin_loss.item()
    assert armed == [True] * 3 and not opt.is_perturbed
    assert calls == [opt] * 3 and opt.num_steps == 3
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 / 8)
    assert wrapped.state_dict()["flatopt"]["num_steps"] == 3
    assert_untouched(model, start, frozen_names(model))


def test_a_bare_optimizer_checkpoint_restores_its_state_and_the_noise_starts_at_the_resume(device):
    x, y = _batch(8, device=device)
    model = _model(device=device)
    bare = torch.optim.AdamW(_trainable(model), lr=1e-2)
    for _ in range(3):  # plain LoRA, no flatopt
        F.mse_loss(model(x), y).backward()
        bare.step()
        bare.zero_grad()
    model_state = copy.deepcopy(model.state_dict())
    bare_state = copy.deepcopy(bare.state_dict())
    F.mse_loss(model(x), y).backward()
    bare.step()  # the uninterrupted plain run's next step
    expected = _params(model)

    results = {}
    for load in (True, False):
        resumed = _model(seed=9, device=device)
        resumed.load_state_dict(model_state)
        opt = _wrap(resumed, inner="adamw", lr=1e-2, sigma=0.1, schedule="cosine", total_steps=10)
        if load:
            with pytest.warns(UserWarning, match="no 'flatopt' entry"):
                opt.load_state_dict(bare_state)
            for got, want in zip(opt.state.values(), bare_state["state"].values()):
                assert all(bits_equal(got[k], want[k]) for k in ("step", "exp_avg", "exp_avg_sq"))
        assert opt.num_steps == 0 and opt.sigma == 0.0  # the ramp starts at the resume
        with opt.perturbed():
            F.mse_loss(resumed(x), y).backward()
        opt.step()
        results[load] = _params(resumed)
        assert opt.num_steps == 1
        assert opt.sigma == pytest.approx(0.1 * _cosine(1, 10))
    # σ_0 = 0, so the first resumed step is exactly the bare optimizer's next step...
    assert all(bits_equal(a, b) for a, b in zip(results[True], expected))
    # ...which a resume without the inner state (fresh Adam moments) is not.
    assert not all(torch.equal(a, b) for a, b in zip(results[False], expected))


def test_resume_with_accumulation_scheduler_and_scaler_continues_bit_identically(device):
    batches = [_batch(8, seed=s, device=device) for s in range(6)]

    def build_run():
        model = _model(device=device)
        opt = _wrap(model, inner="adamw", lr=1e-2, sigma=0.1, schedule="cosine", total_steps=6)
        scheduler = lr_scheduler.OneCycleLR(opt, max_lr=0.02, total_steps=6)
        scaler = torch.amp.GradScaler(device, init_scale=2.0**10, growth_interval=2)
        return model, opt, scheduler, scaler

    def train(run, steps):
        model, opt, scheduler, scaler = run
        for x, y in steps:
            for xb, yb in zip(x.split(4), y.split(4)):
                with opt.perturbed():
                    with torch.autocast(device, dtype=torch.bfloat16):
                        loss = F.mse_loss(model(xb).float(), yb) / 2
                    scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            scheduler.step()

    straight = build_run()
    train(straight, batches)
    first = build_run()
    train(first, batches[:3])
    checkpoint_ = copy.deepcopy(
        {
            "model": first[0].state_dict(),
            "opt": first[1].state_dict(),
            "scheduler": first[2].state_dict(),
            "scaler": first[3].state_dict(),
        }
    )
    resumed = build_run()
    resumed[0].load_state_dict(checkpoint_["model"])
    resumed[1].load_state_dict(checkpoint_["opt"])
    resumed[2].load_state_dict(checkpoint_["scheduler"])
    resumed[3].load_state_dict(checkpoint_["scaler"])
    assert resumed[1].num_steps == 3
    train(resumed, batches[3:])
    assert resumed[1].num_steps == straight[1].num_steps == 6
    assert all(bits_equal(a, b) for a, b in zip(_params(resumed[0]), _params(straight[0])))


# -- nothing lost when things go wrong ------------------------------------------------------------


class Boom(Exception):
    pass


class Interrupt(BaseException):
    """Like KeyboardInterrupt: not an Exception, so nn.Module's always-call forward hooks, which
    flatopt uses to put W back after a failed forward, do not run."""


def _raise(error):
    def hook(*args):
        raise error

    return hook


class Recomputed(nn.Module):
    """Runs a LoRA layer under non-reentrant checkpointing and raises ``error`` inside the
    target's forward when the backward re-runs it."""

    def __init__(self, layer, error):
        super().__init__()
        self.layer = layer
        self.error = error
        self.calls = 0
        self.handle = None

    def forward(self, x):
        def run(h):
            self.calls += 1
            if self.calls == 1:  # registered after flatopt's pre-hook: runs once W + ε is in
                self.handle = self.layer.base.register_forward_pre_hook(self.fail)
            # tanh saves its output, so the recompute must run the whole layer to rebuild it.
            return torch.tanh(self.layer(h))

        return checkpoint(run, x, use_reentrant=False)

    def fail(self, module, args):
        if self.calls == 2:
            raise self.error


def _interrupt_in_a_target_forward(opt, model, x, failing):
    with opt.perturbed():
        # Registered after flatopt's pre-hook, so it runs once W + ε is swapped in.
        handle = model[0].base.register_forward_pre_hook(_raise(Interrupt))
        try:
            model(x).sum().backward()
        finally:
            handle.remove()


def _in_a_recomputed_target_forward(error):
    def fail(opt, model, x, failing):
        wrapper = model[2] = Recomputed(model[2], error)
        try:
            with opt.perturbed():
                model(x).sum().backward()
        finally:
            model[2] = wrapper.layer
            wrapper.handle.remove()

    return fail


def _exception_in_a_target_backward_hook(opt, model, x, failing):
    handle = model[2].register_full_backward_hook(_raise(Boom))
    try:
        with opt.perturbed():
            model(x).sum().backward()
    finally:
        handle.remove()


def _exception_in_the_closure(opt, model, x, failing):
    def closure():
        model(x).sum().backward()
        raise Boom

    opt.step(closure)


def _exception_in_the_row_norms(opt, model, x, failing):
    # The std is computed at a target's first forward of the step, from what it reads.
    failing[0] = True
    try:
        with opt.perturbed():
            model(x)
    finally:
        failing[0] = False


def _manual_perturb_exception_then_restore(opt, model, x, failing):
    before = snapshot(model)
    opt.perturb()
    handle = model[1].register_forward_hook(_raise(Boom))
    try:
        model(x)
    except Boom:
        assert_untouched(model, before)  # clean already, before restore()
        opt.restore()
        raise
    finally:
        handle.remove()


FAILURES = {
    "interrupt in a target's forward": _interrupt_in_a_target_forward,
    "exception in a target's forward recomputed by backward": _in_a_recomputed_target_forward(Boom),
    "interrupt in a target's forward recomputed by backward": _in_a_recomputed_target_forward(
        Interrupt
    ),
    "exception in a target's backward hook": _exception_in_a_target_backward_hook,
    "exception in step(closure)": _exception_in_the_closure,
    "exception in the row norms": _exception_in_the_row_norms,
    "manual perturb(), exception, restore()": _manual_perturb_exception_then_restore,
}


@pytest.mark.parametrize("where", FAILURES)
def test_a_failure_anywhere_in_a_step_leaves_the_model_clean_and_the_wrapper_usable(where, device):
    model = _model(out=8, fan_in=6, device=device)
    failing = [False]

    def adapter(module):  # flatopt's own LoRA, with a delta() that can be made to fail
        if isinstance(module, LoRALinear):

            def delta():
                if failing[0]:
                    raise Boom
                return module.low_rank()

            return flatopt.Target(module.base, "weight", delta)
        return None

    opt = _wrap(model, adapters=[adapter], sigma=0.3, schedule="linear", total_steps=2)
    x, y = _batch(4, device=device)
    with opt.perturbed():
        F.mse_loss(model(x), y).backward()
    opt.step()  # one step in, so σ_t > 0
    opt.zero_grad()
    targets = [model[0].base, model[2].base]
    originals = [m._parameters["weight"] for m in targets]
    before = snapshot(model)
    clean = model(x)
    with pytest.raises((Boom, Interrupt)):
        FAILURES[where](opt, model, x, failing)
    assert not opt.is_perturbed and opt.num_steps == 1
    assert all(m._parameters["weight"] is w for m, w in zip(targets, originals))
    assert _top_hooks() is None
    assert_untouched(model, before)
    assert bits_equal(model(x), clean)  # nothing is left armed: the forward reads W again
    # Still usable: the next step perturbs and trains.
    opt.zero_grad()
    with opt.perturbed():
        noisy = model(x)
        F.mse_loss(noisy, y).backward()
    opt.step()
    assert not torch.equal(clean, noisy) and opt.num_steps == 2
    assert_untouched(model, before, frozen_names(model))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_base_weight_spoils_the_outputs_it_spoils_without_flatopt(value, device):
    model = _model(out=8, fan_in=6, device=device)
    with torch.no_grad():
        model[0].base.weight[2, 3] = value
    opt = _wrap(model, sigma=0.2)
    x, _ = _batch(5, device=device)
    start = snapshot(model)
    keep = [i for i in range(8) if i != 2]
    clean = model[0](x)
    with opt.perturbed():
        noisy = model[0](x)
        noisy[:, keep].square().mean().backward()  # a loss that does not read output 2
        assert_untouched(model, start)
    factors = [model[0].lora_A, model[0].lora_B]
    flat_grads = [p.grad.clone() for p in factors]
    opt.zero_grad()
    clean[:, keep].square().mean().backward()
    bare_grads = [p.grad.clone() for p in factors]
    # Neither hidden nor spread: the same outputs are non-finite, the rest are finite and noisy.
    assert torch.equal(torch.isfinite(noisy), torch.isfinite(clean))
    assert not torch.isfinite(noisy[:, 2]).any()
    assert not torch.equal(noisy[:, keep], clean[:, keep])
    for flat, bare in zip(flat_grads, bare_grads):
        assert torch.equal(torch.isfinite(flat), torch.isfinite(bare))
    assert all(torch.isfinite(g).all() for g in flat_grads)
    assert_untouched(model, start)
    with opt.perturbed():
        assert not torch.isfinite(model(x).square().mean())  # a loss reading output 2
    assert_untouched(model, start)


def test_a_nan_loss_propagates_as_without_flatopt_and_the_restore_stays_exact(device):
    model = _model(device=device)
    opt = _wrap(model, sigma=0.2)
    x, y = _batch(4, device=device)
    bad = x.clone()
    bad[1, 0] = float("nan")
    start = snapshot(model)
    with opt.perturbed():
        loss = F.mse_loss(model(bad), y)
        loss.backward()
    flat_grads = _grads(opt)
    opt.zero_grad()
    F.mse_loss(model(bad), y).backward()
    bare_grads = _grads(opt)
    assert torch.isnan(loss)
    for flat, bare in zip(flat_grads, bare_grads):
        assert torch.equal(torch.isfinite(flat), torch.isfinite(bare))
    assert_untouched(model, start)
    with opt.perturbed():
        F.mse_loss(model(bad), y).backward()
    opt.step()  # a plain optimizer writes the NaN gradient into the LoRA factors...
    assert all(torch.isnan(p).any() for p in _trainable(model))
    with opt.perturbed():
        noisy = model(x)
    # ...and flatopt neither repairs nor spreads it, and still never writes W.
    assert torch.equal(torch.isfinite(noisy), torch.isfinite(model(x)))
    assert_untouched(model, start, frozen_names(model))


# -- long runs ------------------------------------------------------------------------------------

LONG_STEPS = 1000


def _long_run_model(device="cpu"):
    """A bf16 MLP, 32 -> 32 -> 4, LoRA rank 4 on both layers, and one fixed batch."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    add_lora(model, ["0", "2"], rank=4, alpha=8)
    model.to(torch.bfloat16)
    with torch.no_grad():
        for m in (model[0], model[2]):
            m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) * 0.2)
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.2)
    x = torch.randn(16, 32, generator=g).to(device, torch.bfloat16)
    y = torch.randn(16, 4, generator=g).to(device, torch.bfloat16)
    return model.to(device), x, y


def _drift(before, after):
    changed = (before != after).float().mean().item()
    relative = ((after.float() - before.float()).norm() / before.float().norm()).item()
    return changed, relative


def test_1000_bf16_steps_at_sigma_0_1_leave_the_frozen_weights_bitwise_unchanged(device):
    model, x, y = _long_run_model(device=device)
    opt = flatopt.FlatPerturb(
        torch.optim.SGD(_trainable(model), lr=1e-2), model, sigma=0.1, schedule="constant", seed=0
    )
    start = snapshot(model)
    frozen = frozen_names(model)
    for step in range(LONG_STEPS):
        with opt.perturbed():
            out = model(x)
            F.mse_loss(out, y).backward()
        if step % 250 == 0:
            assert not torch.equal(out, model(x))  # the noise is really applied
        opt.step()
        opt.zero_grad()
    assert opt.num_steps == LONG_STEPS
    assert_untouched(model, start, frozen)  # bits, ._version and storage
    for name in ("0.base.weight", "2.base.weight"):
        assert _drift(start[name][0], model.state_dict()[name]) == (0.0, 0.0)
    assert not torch.equal(model[0].lora_B, start["0.lora_B"][0])  # while LoRA trained


def test_the_same_run_with_naive_in_place_add_and_subtract_drifts(device):
    model, x, y = _long_run_model(device=device)
    sgd = torch.optim.SGD(_trainable(model), lr=1e-2)
    layers = [model[0], model[2]]
    start = [m.base.weight.detach().clone() for m in layers]
    g = torch.Generator(device=device).manual_seed(0)
    for _ in range(LONG_STEPS):
        noise = []
        with torch.no_grad():  # the paper-style method: W += ε, forward/backward, W -= ε
            for m in layers:
                weight = m.base.weight
                std = flatopt.noise.noise_std(weight, m.low_rank(), 0.1)
                z = torch.randn(weight.shape, generator=g, device=device)
                eps = (z * std[:, None]).to(weight.dtype)
                weight.add_(eps)
                noise.append(eps)
        F.mse_loss(model(x), y).backward()
        with torch.no_grad():
            for m, eps in zip(layers, noise):
                m.base.weight.sub_(eps)
        sgd.step()
        sgd.zero_grad()
    for before, m in zip(start, layers):
        changed, relative = _drift(before, m.base.weight.detach())
        # Measured: about 79% of entries changed, relative drift about 2e-2 (docs/recipes.md).
        assert changed > 0.5
        assert relative > 5e-3
