"""Drop-in mode (``auto=True``) and the warnings that keep flatopt from being silently inactive.

Under ``auto=True`` nobody calls perturb()/restore(): every training-mode forward of a target
between two step() calls sees W + ε of that step, bit for bit as the explicit loop with the same
seed; eval-mode forwards see W. The framework-style wrappers here behave as Lightning's
``LightningOptimizer`` (copies the optimizer's ``__dict__`` into a dynamic subclass) and
Accelerate's ``AcceleratedOptimizer`` (forwards a few methods only) do.
"""

import contextlib
import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    assert_nothing_armed,
    assert_untouched,
    bits_equal,
    frozen_names,
    lora_forward,
    record_reads,
    snapshot,
    tiny_lora,
    toy_batches,
)
from torch import nn
from torch.utils.checkpoint import checkpoint

import flatopt
from flatopt.lora import LoRALinear, add_lora

pytestmark = pytest.mark.usefixtures("one_thread")


def _wrap(model, inner="adamw", **kwargs):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=0.02) if inner == "adamw" else inner(params)
    kwargs.setdefault("sigma", 0.3)
    kwargs.setdefault("schedule", "constant")
    kwargs.setdefault("seed", 3)
    return flatopt.FlatPerturb(optimizer, model, **kwargs)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _same(a, b):
    return len(a) == len(b) and all(bits_equal(x, y) for x, y in zip(a, b))


def _loss(model, x, y):
    return F.mse_loss(model(x), y)


# -- auto=True: what each forward sees ----------------------------------------------------------


def test_training_forwards_see_the_step_noise_and_eval_forwards_see_w():
    ((x, _),) = toy_batches(1)
    explicit_model, auto_model = tiny_lora(), tiny_lora()
    explicit, auto = _wrap(explicit_model), _wrap(auto_model, auto=True)
    want, seen = record_reads(explicit_model[0].base), record_reads(auto_model[0].base)
    with explicit.perturbed():
        explicit_model(x)
    W = auto_model[0].base.weight

    assert not auto.is_perturbed
    auto_model(x)  # training mode: W + ε of step 0
    assert auto.is_perturbed
    auto_model.eval()
    clean = auto_model(x)  # eval mode: W itself
    auto_model.train()
    with torch.no_grad():
        auto_model(x)  # training mode under no_grad (e.g. generation for logging): W + ε
    auto_model(x)
    assert bits_equal(seen[0], want[0]) and not torch.equal(seen[0], W)
    assert bits_equal(seen[1], W)
    assert bits_equal(seen[2], want[0]) and bits_equal(seen[3], want[0])
    assert bits_equal(clean, lora_forward(auto_model, x))
    assert auto_model[0].base._parameters["weight"] is W
    assert bits_equal(auto_model.state_dict()["0.base.weight"], W)  # clean while armed


@pytest.mark.parametrize("micro", [1, 3])
@pytest.mark.parametrize("resample", ["step", "call"])
def test_an_auto_run_is_bitwise_the_explicit_loop(resample, micro):
    """Same seed, same bits: every read, every parameter, with gradient accumulation."""
    runs = {}
    for auto in (False, True):
        model = tiny_lora()
        opt = _wrap(model, auto=auto, resample=resample, schedule="cosine", total_steps=3)
        seen, reads = record_reads(model[0].base), record_reads(model[2].base)
        start = snapshot(model)
        for step in range(4):
            for x, y in toy_batches(micro, seed=step):
                if auto:
                    (_loss(model, x, y) / micro).backward()
                else:
                    with opt.perturbed():
                        (_loss(model, x, y) / micro).backward()
            opt.step()
            opt.zero_grad()
        assert_untouched(model, start, frozen_names(model))
        runs[auto] = (_params(model), seen, reads)
    assert len(runs[True][1]) == 4 * micro
    for got, want in zip(runs[True], runs[False]):
        assert _same(got, want)
    # The noise was real after the cosine ramp's first step, and differs between draws.
    first = runs[True][1]
    assert len({w.sum().item() for w in first}) == (3 if resample == "step" else 3 * micro) + 1


def test_call_resampling_draws_at_each_training_forward_of_the_model():
    ((x, _),) = toy_batches(1)
    explicit_model, auto_model = tiny_lora(), tiny_lora()
    explicit, _auto = (
        _wrap(explicit_model, resample="call"),
        _wrap(auto_model, resample="call", auto=True),
    )
    want, seen = record_reads(explicit_model[0].base), record_reads(auto_model[0].base)
    for _ in range(2):
        with explicit.perturbed():
            explicit_model(x)
    auto_model(x)  # draw 0
    auto_model.eval()
    auto_model(x)  # evaluation: W, and no draw
    auto_model.train()
    auto_model[0](x)  # a submodule called on its own: still draw 0
    auto_model(x)  # draw 1
    W = auto_model[0].base.weight
    assert bits_equal(seen[0], want[0]) and bits_equal(seen[2], want[0])
    assert bits_equal(seen[1], W)
    assert bits_equal(seen[3], want[1]) and not torch.equal(want[0], want[1])


@pytest.mark.parametrize("resample", ["step", "call"])
def test_step_with_a_closure_in_auto_mode_is_the_explicit_closure_step(resample):
    runs = {}
    for auto in (False, True):
        model = tiny_lora()
        opt = _wrap(model, auto=auto, resample=resample)
        seen = record_reads(model[0].base)
        for x, y in toy_batches(3):

            def closure(x=x, y=y, opt=opt, model=model):
                opt.zero_grad()
                loss = _loss(model, x, y)
                loss.backward()
                return loss

            with warnings.catch_warnings():
                warnings.simplefilter("error")
                opt.step(closure)
        assert not opt.is_perturbed
        runs[auto] = (_params(model), seen)
    assert _same(runs[True][0], runs[False][0]) and _same(runs[True][1], runs[False][1])
    assert len(runs[True][1]) == 3


def test_lightning_automatic_accumulation_perturbs_every_micro_batch():
    """accumulate_grad_batches=2: one micro-batch outside step(), one inside step(closure)."""
    runs = {}
    for auto in (False, True):
        model = tiny_lora()
        opt = _wrap(model, auto=auto)
        seen = record_reads(model[0].base)
        batches = toy_batches(6)
        for first, second in zip(batches[::2], batches[1::2]):
            if auto:
                (_loss(model, *first) / 2).backward()  # the accumulating micro-batch
                opt.step(lambda b=second, m=model: (_loss(m, *b) / 2).backward())
            else:
                for batch in (first, second):
                    with opt.perturbed():
                        (_loss(model, *batch) / 2).backward()
                opt.step()
            opt.zero_grad()
        runs[auto] = (_params(model), seen)
    assert len(runs[True][1]) == 6
    assert not any(torch.equal(w, model[0].base.weight) for w in runs[True][1])
    assert bits_equal(runs[True][1][0], runs[True][1][1])  # one ε for the step's micro-batches
    assert _same(runs[True][0], runs[False][0]) and _same(runs[True][1], runs[False][1])


def test_state_dict_works_while_armed_and_load_state_dict_disarms():
    model = tiny_lora()
    # lr = 0: W' stays put, so two reads are equal exactly when their step counts are.
    opt = _wrap(model, inner=lambda params: torch.optim.SGD(params, lr=0.0), auto=True)
    seen = record_reads(model[0].base)
    batches = toy_batches(3)
    start = opt.state_dict()
    for x, y in batches[:2]:
        _loss(model, x, y).backward()
        opt.step()
        opt.zero_grad()
    x, y = batches[2]
    _loss(model, x, y).backward()  # armed with step 2's noise
    assert opt.is_perturbed
    saved = opt.state_dict()  # any moment
    assert saved["flatopt"]["num_steps"] == 2
    assert bits_equal(model.state_dict()["0.base.weight"], model[0].base.weight)
    opt.load_state_dict(start)
    assert not opt.is_perturbed and opt.num_steps == 0
    assert_nothing_armed(model)
    model(x)  # re-arms with the loaded step count: step 0's noise
    assert bits_equal(seen[-1], seen[0]) and not torch.equal(seen[-1], seen[2])
    opt.load_state_dict(saved)
    model(x)
    assert bits_equal(seen[-1], seen[2])


def test_a_step_the_grad_scaler_skips_is_the_explicit_one():
    runs = {}
    for auto in (False, True):
        model = tiny_lora()
        opt = _wrap(model, auto=auto, schedule="linear", total_steps=4)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=10**6)
        seen = record_reads(model[0].base)
        for index, (x, y) in enumerate(toy_batches(5)):
            if index == 2:
                x = x.clone()
                x[0, 0] = float("inf")
            with opt.perturbed() if not auto else contextlib.nullcontext():
                with torch.autocast("cpu", dtype=torch.float16):
                    loss = F.mse_loss(model(x).float(), y)
                scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        assert scaler.get_scale() == 2.0**7  # one step skipped
        assert opt.num_steps == 4
        runs[auto] = (_params(model), seen)
    seen = runs[True][1]
    assert bits_equal(seen[2], seen[3])  # the retried step sees the skipped step's ε
    assert _same(runs[True][0], runs[False][0]) and _same(runs[True][1], runs[False][1])


class CheckpointedMLP(nn.Module):
    def __init__(self, reentrant):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.reentrant = reentrant
        self.stem = nn.Linear(6, 8)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))
        self.head = nn.Linear(8, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)
        add_lora(self, ["stem", "block.0", "block.2", "head"], rank=2)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, LoRALinear):
                    m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) * 0.3)
                    m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.3)

    def forward(self, x):
        h = checkpoint(self.block, self.stem(x), use_reentrant=self.reentrant)
        return self.head(h)


@pytest.mark.parametrize("resample", ["step", "call"])
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_activation_checkpointing_in_auto_mode_is_the_explicit_loop(reentrant, resample):
    runs = {}
    for auto in (False, True):
        model = CheckpointedMLP(reentrant)
        opt = _wrap(model, auto=auto, resample=resample)
        seen = record_reads(model.block[0].base)
        for _ in range(2):
            for x, y in toy_batches(2):
                if auto:
                    _loss(model, x, y).backward()
                else:
                    with opt.perturbed():
                        _loss(model, x, y).backward()
            opt.step()
            opt.zero_grad()
        runs[auto] = (_params(model), seen)
    seen = runs[True][1]
    assert len(seen) == 8  # each forward, and its recomputation in backward
    assert bits_equal(seen[0], seen[1]) and bits_equal(seen[2], seen[3])
    assert bits_equal(seen[0], seen[2]) == (resample == "step")
    assert _same(runs[True][0], runs[False][0]) and _same(runs[True][1], runs[False][1])


def test_a_compiled_model_in_auto_mode_trains_like_the_explicit_loop():
    torch._dynamo.reset()
    runs = {}
    for auto in (False, True):
        model = tiny_lora()
        opt = _wrap(model, auto=auto)
        compiled = torch.compile(model, backend="eager")
        for x, y in toy_batches(3):
            if auto:
                _loss(compiled, x, y).backward()
            else:
                with opt.perturbed():
                    _loss(compiled, x, y).backward()
            opt.step()
            opt.zero_grad()
        compiled.eval()
        ((x, _),) = toy_batches(1)
        assert bits_equal(compiled(x), lora_forward(model, x))  # evaluation sees W
        runs[auto] = _params(model)
    # One compiled graph per mode: the same operations, so the same bits.
    assert _same(runs[True], runs[False])
    assert not _same(runs[True], _params(tiny_lora()))


def test_perturb_and_restore_on_an_auto_wrapper_raise():
    model = tiny_lora()
    opt = _wrap(model, auto=True)
    with pytest.raises(RuntimeError, match="auto=True"):
        opt.perturb()
    with pytest.raises(RuntimeError, match="auto=True"):
        opt.restore()
    with pytest.raises(RuntimeError, match="auto=True"), opt.perturbed():
        pass
    assert not opt.is_perturbed
    assert_nothing_armed(model)


# -- never silent --------------------------------------------------------------------------------


def _warnings_of(action):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        action()
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def test_an_explicit_step_without_perturb_warns_once_per_wrapper_naming_auto():
    model = tiny_lora()
    opt = _wrap(model, schedule="linear", total_steps=4)
    ((x, y),) = toy_batches(1)

    def bare_step():
        _loss(model, x, y).backward()
        opt.step()
        opt.zero_grad()

    assert _warnings_of(bare_step) == []  # σ_0 = 0 under the linear ramp: nothing to miss
    first = _warnings_of(bare_step)
    assert len(first) == 1 and "auto=True" in first[0] and "without perturb()" in first[0]
    assert _warnings_of(bare_step) == []  # once per FlatPerturb
    other = _wrap(model, schedule="constant")
    assert len(_warnings_of(other.step)) == 1


def test_steps_with_perturb_or_a_closure_do_not_warn():
    model = tiny_lora()
    opt = _wrap(model)
    ((x, y),) = toy_batches(1)

    def perturbed_step():
        with opt.perturbed():
            _loss(model, x, y).backward()
        opt.step()

    def closure_step():
        opt.step(lambda: _loss(model, x, y).backward())

    assert _warnings_of(perturbed_step) == []
    assert _warnings_of(closure_step) == []
    assert _warnings_of(perturbed_step) == []


def test_an_auto_step_with_no_perturbed_forward_warns_once():
    model = tiny_lora()
    opt = _wrap(model, auto=True, schedule="linear", total_steps=4)
    ((x, y),) = toy_batches(1)

    def eval_step():
        model.eval()
        _loss(model, x, y).backward()
        model.train()
        opt.step()

    def train_step():
        _loss(model, x, y).backward()
        opt.step()

    assert _warnings_of(eval_step) == []  # σ_0 = 0
    assert _warnings_of(train_step) == []
    first = _warnings_of(eval_step)
    assert len(first) == 1 and "no target layer ran a training-mode forward" in first[0]
    assert _warnings_of(eval_step) == []
    assert _warnings_of(train_step) == []


def test_an_explicit_step_with_micro_batches_outside_perturb_warns_once():
    model = tiny_lora()
    opt = _wrap(model)
    (x, y), (x2, y2) = toy_batches(2)

    def partly_perturbed_step():
        with opt.perturbed():
            F.mse_loss(model(x), y).backward()
        F.mse_loss(model(x2), y2).backward()  # a micro-batch left clean: two target forwards
        model.eval()
        model(x)  # evaluation in between is not training
        model.train()
        opt.step()

    first = _warnings_of(partly_perturbed_step)
    assert len(first) == 1 and first[0].startswith("2 training-mode forwards of target layers")
    assert "auto=True" in first[0]
    assert _warnings_of(partly_perturbed_step) == []  # once per FlatPerturb


def test_explicit_accumulation_with_micro_batches_outside_the_closure_warns_once():
    """Lightning's automatic optimization under explicit mode: only step(closure) perturbs."""
    model = tiny_lora()
    opt = _wrap(model)
    (x, y), (x2, y2) = toy_batches(2)

    def accumulated_step():
        F.mse_loss(model(x), y).backward()  # the accumulating micro-batch: clean
        model.eval()
        model(x)  # evaluation in between is not training
        model.train()
        opt.step(lambda: F.mse_loss(model(x2), y2).backward())

    first = _warnings_of(accumulated_step)
    assert len(first) == 1 and "ran outside perturb()/restore()" in first[0]
    assert first[0].startswith("2 training-mode forwards") and "auto=True" in first[0]
    assert _warnings_of(accumulated_step) == []  # once per FlatPerturb


@pytest.mark.parametrize("resample", ["step", "call"])
def test_a_no_op_closure_after_perturb_neither_warns_nor_arms_again(resample):
    model = tiny_lora()
    opt = _wrap(model, resample=resample)
    ((x, y),) = toy_batches(1)
    calls = []

    def do_nothing():  # what Lightning passes to step() under manual optimization
        calls.append(opt.is_perturbed)

    def manual_step():
        with opt.perturbed():
            _loss(model, x, y).backward()
        opt.step(do_nothing)

    assert _warnings_of(manual_step) == []
    assert calls == [False]
    assert opt.num_steps == 1


# -- framework wrappers -------------------------------------------------------------------------


def _do_nothing_closure():
    return None


class LightningStyleOptimizer:
    """Lightning's LightningOptimizer: the optimizer's ``__dict__`` copied into an instance of a
    dynamic subclass of both classes; ``step`` passes a closure to the real optimizer."""

    def __init__(self, optimizer):
        self.__dict__ = {
            k: v for k, v in optimizer.__dict__.items() if k not in ("step", "__del__")
        }
        self.__class__ = type(
            "Lightning" + optimizer.__class__.__name__, (self.__class__, optimizer.__class__), {}
        )
        self._optimizer = optimizer
        self.closure_results = []

    @property
    def optimizer(self):
        return self._optimizer

    def _wrap_closure(self, closure):
        result = closure()
        self.closure_results.append(result)
        return result

    def step(self, closure=None, **kwargs):
        if closure is None:
            closure = _do_nothing_closure
        return self._optimizer.step(closure=functools.partial(self._wrap_closure, closure))


class AcceleratedStyleOptimizer(torch.optim.Optimizer):
    """Accelerate's AcceleratedOptimizer: forwards step, zero_grad and state_dict only (and
    reloads the state dict at construction, as ``prepare`` does)."""

    def __init__(self, optimizer, reload=True):
        self.optimizer = optimizer
        if reload:
            self.optimizer.load_state_dict(self.optimizer.state_dict())

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    @property
    def defaults(self):
        return self.optimizer.defaults

    def step(self, closure=None):
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return self.optimizer.state_dict()


def test_unwrap_finds_the_flatperturb_inside_framework_wrappers():
    model = tiny_lora()
    opt = _wrap(model)
    lightning = LightningStyleOptimizer(opt)
    accelerated = AcceleratedStyleOptimizer(opt)
    assert not hasattr(accelerated, "perturb") and not hasattr(accelerated, "sigma")
    assert flatopt.unwrap(opt) is opt
    assert flatopt.unwrap(lightning) is opt
    assert flatopt.unwrap(accelerated) is opt
    assert flatopt.unwrap(AcceleratedStyleOptimizer(lightning, reload=False)) is opt
    bare = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="No FlatPerturb inside AcceleratedStyleOptimizer"):
        flatopt.unwrap(AcceleratedStyleOptimizer(bare))


def test_lightning_manual_optimization_is_the_plain_loop():
    """perturb(), manual backward, restore() on the wrapper; its step passes a no-op closure."""
    runs = {}
    for wrapped in (False, True):
        model = tiny_lora()
        opt = _wrap(model, resample="call")  # the draw counter must not fork
        handle = LightningStyleOptimizer(opt) if wrapped else opt
        seen = record_reads(model[0].base)

        def run(handle=handle, opt=opt, model=model):
            for step in range(2):
                for x, y in toy_batches(2, seed=step):
                    handle.perturb()
                    assert opt.is_perturbed and handle.is_perturbed
                    _loss(model, x, y).backward()
                    handle.restore()
                handle.step()
                handle.zero_grad()

        assert _warnings_of(run) == []
        assert opt.num_steps == 2 and handle.sigma == opt.sigma
        runs[wrapped] = (_params(model), seen)
    assert len(runs[True][1]) == 4 and not bits_equal(runs[True][1][0], runs[True][1][1])
    assert _same(runs[True][0], runs[False][0]) and _same(runs[True][1], runs[False][1])


def test_a_forgotten_restore_through_the_lightning_wrapper_is_reported_and_undone():
    model = tiny_lora()
    opt = _wrap(model)
    handle = LightningStyleOptimizer(opt)
    ((x, y),) = toy_batches(1)
    params = _params(model)
    handle.perturb()
    _loss(model, x, y).backward()
    with pytest.raises(RuntimeError, match="restore"):
        handle.step()
    assert not opt.is_perturbed and opt.num_steps == 0
    assert _same(_params(model), params)  # the step was not taken
    model.eval()
    assert bits_equal(model(x), lora_forward(model, x))  # and nothing is armed
    model.train()
    handle.perturb()  # the next step works
    model(x)
    handle.restore()


def test_auto_mode_through_an_accelerated_wrapper_is_the_explicit_loop():
    runs = {}
    for auto in (False, True):
        model = tiny_lora()
        opt = _wrap(model, auto=auto)
        handle = AcceleratedStyleOptimizer(opt)
        seen = record_reads(model[0].base)
        for step in range(3):
            for x, y in toy_batches(2, seed=step):
                if auto:
                    (_loss(model, x, y) / 2).backward()
                else:
                    with opt.perturbed():
                        (_loss(model, x, y) / 2).backward()
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                handle.step()
            handle.zero_grad()
            if step == 1:
                handle.state_dict()
        runs[auto] = (_params(model), seen)
    assert len(runs[True][1]) == 6
    assert _same(runs[True][0], runs[False][0]) and _same(runs[True][1], runs[False][1])


def test_a_checkpoint_loaded_through_the_lightning_wrapper_loads_without_a_false_warning():
    model = tiny_lora()
    opt = _wrap(model)
    handle = LightningStyleOptimizer(opt)
    saved = handle.state_dict()
    assert saved["flatopt"] == opt.state_dict()["flatopt"]
    ((x, y),) = toy_batches(1)
    with opt.perturbed():
        _loss(model, x, y).backward()
    opt.step()
    assert _warnings_of(lambda: handle.load_state_dict(saved)) == []
    assert opt.num_steps == 0
