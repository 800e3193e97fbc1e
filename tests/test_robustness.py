"""Nothing breaks around the optimizer: pickles and copies, corrupt checkpoints, weights and
modules replaced under a live FlatPerturb, and every error path leaving nothing armed.
"""

import copy
import gc
import io
import math
import pickle
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

import flatopt
from flatopt.lora import LoRALinear
from flatopt.noise import LowRank, derive_seed, noise_std, perturbed_weight

pytestmark = pytest.mark.usefixtures("one_thread")


def _wrap(model, lr=0.02, adapters=(), **kwargs):
    params = [p for p in model.parameters() if p.requires_grad] or [nn.Parameter(torch.ones(1))]
    kwargs.setdefault("sigma", 0.3)
    kwargs.setdefault("schedule", "constant")
    kwargs.setdefault("seed", 3)
    if not kwargs.get("auto", True):
        del kwargs["auto"]  # the default
    return flatopt.FlatPerturb(torch.optim.AdamW(params, lr=lr), model, adapters=adapters, **kwargs)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _same(a, b):
    return len(a) == len(b) and all(bits_equal(x, y) for x, y in zip(a, b))


def _train(model, opt, batches, auto=False):
    """One optimizer step per batch, explicit or drop-in as ``opt`` was built."""
    for x, y in batches:
        if auto:
            F.mse_loss(model(x), y).backward()
        else:
            with opt.perturbed():
                F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def _clean_in_training_mode(model, x):
    """A training-mode forward of ``model`` is W's: its hooks are inert."""
    assert model.training
    return bits_equal(model(x), lora_forward(model, x))


def _record_in_forward(module):
    """Clone the weight ``module`` holds inside its forward, from a forward hook that runs before
    flatopt's: it sees W + ε even on a module flatopt hooked after this was registered."""
    seen = []

    def hook(module, args, output):
        seen.append(module.weight.detach().clone())

    module.register_forward_hook(hook, prepend=True)
    return seen


def _arm(model, opt, x, auto):
    if auto:
        model(x)
    else:
        opt.perturb()
        model(x)


def _disarm(opt, auto):
    if auto:
        opt.step()  # no gradients: the inner step changes nothing
    else:
        opt.restore()


# -- 1. pickles and copies ---------------------------------------------------------------------


def _round_trip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("auto", [False, True])
def test_torch_save_of_a_model_while_its_flatperturb_is_alive_and_after(auto):
    model = tiny_lora()
    opt = _wrap(model, auto=auto)
    batches = toy_batches(3)
    _train(model, opt, batches[:2], auto)
    ((x, _),) = toy_batches(1, seed=9)

    loaded = _round_trip(model)  # alive, between steps
    assert _same(_params(loaded), _params(model))
    assert _clean_in_training_mode(loaded, x)  # no noise, no tie to the original
    assert not opt.is_perturbed

    _arm(model, opt, x, auto)
    loaded = _round_trip(model)  # alive and armed
    assert _clean_in_training_mode(loaded, x)
    _disarm(opt, auto)

    # A new FlatPerturb on the loaded model perturbs it as one on the original would.
    twin = copy.deepcopy(model)
    seen, want = record_reads(loaded[0].base), record_reads(twin[0].base)
    for m in (loaded, twin):
        fresh = _wrap(m, seed=11)
        with fresh.perturbed():
            m(x)
    assert bits_equal(seen[0], want[0]) and not torch.equal(seen[0], loaded[0].base.weight)

    del opt
    gc.collect()
    loaded = _round_trip(model)  # after the FlatPerturb is gone
    assert _clean_in_training_mode(loaded, x)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize(
    ("auto", "resample"), [(False, "step"), (False, "call"), (True, "step"), (True, "call")]
)
def test_model_and_optimizer_copied_together_continue_bitwise_like_the_original(
    how, auto, resample
):
    model = tiny_lora()
    opt = _wrap(model, auto=auto, resample=resample, schedule="cosine", total_steps=4)
    batches = toy_batches(5)
    _train(model, opt, batches[:2], auto)
    if how == "deepcopy":
        model_copy, opt_copy = copy.deepcopy((model, opt))
    else:
        model_copy, opt_copy = pickle.loads(pickle.dumps((model, opt)))
    assert opt_copy.num_steps == opt.num_steps == 2 and opt_copy.seed == opt.seed
    assert opt_copy.param_groups[0]["params"][0] is model_copy[0].lora_A  # the copy's own
    seen, seen_copy = record_reads(model[0].base), record_reads(model_copy[0].base)
    _train(model, opt, batches[2:], auto)
    assert not _same(_params(model), _params(model_copy))  # training one left the other alone
    _train(model_copy, opt_copy, batches[2:], auto)
    assert _same(_params(model_copy), _params(model))
    assert len(seen_copy) == 3 and _same(seen_copy, seen)
    assert not any(torch.equal(w, model_copy[0].base.weight) for w in seen_copy)


def test_a_copy_taken_mid_step_in_auto_mode_continues_the_step():
    model = tiny_lora()
    opt = _wrap(model, auto=True, resample="call")
    (x, y), (x2, y2) = toy_batches(2)
    F.mse_loss(model(x), y).backward()  # armed, gradients pending
    model_copy, opt_copy = copy.deepcopy((model, opt))
    assert not opt_copy.is_perturbed  # the copy arms itself at its own next forward
    for p, q in zip(model.parameters(), model_copy.parameters()):
        q.grad = None if p.grad is None else p.grad.clone()  # deepcopy drops a Parameter's grad
    seen, seen_copy = record_reads(model[0].base), record_reads(model_copy[0].base)
    for m, o in ((model, opt), (model_copy, opt_copy)):
        F.mse_loss(m(x2), y2).backward()  # the step's second draw, in both
        o.step()
    assert bits_equal(seen_copy[0], seen[0]) and not torch.equal(seen[0], model[0].base.weight)
    assert _same(_params(model_copy), _params(model))


def test_a_deep_copied_model_alone_gets_inert_hooks():
    model = tiny_lora()
    opt = _wrap(model, auto=True)
    ((x, y),) = toy_batches(1)
    copied = copy.deepcopy(model)
    assert _clean_in_training_mode(copied, x)
    assert not opt.is_perturbed  # the copy's forward did not arm the original
    F.mse_loss(model(x), y).backward()
    assert opt.is_perturbed
    assert _clean_in_training_mode(copied, x)  # nor does the original's arming reach the copy
    opt.step()


def _fixed_factor(step):
    return 0.5


def _ramp(step):
    return min(step, 4) / 4


def test_a_lambda_schedule_fails_at_dump_time_and_a_named_one_round_trips():
    model = tiny_lora()
    opt = _wrap(model, schedule=lambda step: 0.5)
    with pytest.raises((pickle.PicklingError, AttributeError), match="lambda"):
        pickle.dumps((model, opt))
    named = _wrap(tiny_lora(), schedule=_fixed_factor)
    loaded = pickle.loads(pickle.dumps(named))
    assert loaded.sigma == named.sigma == 0.15


def test_a_dense_adapter_pickles_and_follows_the_copied_model():
    model = tiny_lora()
    model[2].requires_grad_(True)  # a fully trained head, perturbed through dense()
    opt = _wrap(model, adapters=[flatopt.dense(model[2].base)])
    model_copy, opt_copy = pickle.loads(pickle.dumps((model, opt)))
    assert opt_copy.targets == opt.targets
    ((x, _),) = toy_batches(1)
    seen = record_reads(model_copy[2].base)
    with opt_copy.perturbed():
        model_copy(x)
    assert not torch.equal(seen[0], model_copy[2].base.weight)  # the copy's own head
    lambda_adapter = _wrap(tiny_lora(), adapters=[lambda module: None])
    with pytest.raises((pickle.PicklingError, AttributeError), match="lambda"):
        pickle.dumps(lambda_adapter)


def test_copying_or_pickling_a_perturbed_flatperturb_raises_at_dump_time():
    model = tiny_lora()
    opt = _wrap(model)
    ((x, _),) = toy_batches(1)
    with opt.perturbed():
        model(x)
        for action in (
            lambda: copy.deepcopy(opt),
            lambda: copy.deepcopy((model, opt)),
            lambda: pickle.dumps(opt),
        ):
            with pytest.raises(RuntimeError, match="restore"):
                action()
        assert opt.is_perturbed
    assert copy.deepcopy(opt).num_steps == 0


# -- 2. load_state_dict validates, then loads ---------------------------------------------------


def _two_checkpoints():
    """An optimizer mid-run, and a valid checkpoint of a later, different state of it."""
    model = tiny_lora()
    opt = _wrap(model, schedule="linear", total_steps=10)
    batches = toy_batches(4)
    _train(model, opt, batches[:1])
    later_model = copy.deepcopy(model)
    later = _wrap(later_model, lr=0.5, seed=99, schedule="linear", total_steps=10)
    later.load_state_dict(opt.state_dict())
    for group in later.param_groups:
        group["lr"] = 0.5
    _train(later_model, later, batches[1:])
    checkpoint = later.state_dict()
    checkpoint["flatopt"]["seed"] = 99
    return model, opt, checkpoint


def _assert_same_state(a, b):
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same_state(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same_state(x, y)
    elif isinstance(a, torch.Tensor):
        assert bits_equal(a, b)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b


BAD_ENTRIES = [
    ("sigma", float("nan"), ValueError, r"\['sigma'\]: nan"),
    ("sigma", -0.1, ValueError, r"\['sigma'\]: -0\.1"),
    ("sigma", "0.1", TypeError, r"\['sigma'\]: '0\.1'"),
    ("resample", "sometimes", ValueError, r"\['resample'\]: 'sometimes'"),
    ("schedule", "exponential", ValueError, "'exponential'"),
    ("seed", "abc", TypeError, r"\['seed'\]: 'abc'"),
    ("num_steps", -1, ValueError, r"\['num_steps'\]: -1"),
    ("draw", 1.5, ValueError, r"\['draw'\]: 1\.5"),
    ("total_steps", 0, ValueError, "total_steps: 0"),
    ("rank_noise", "yes", TypeError, r"\['rank_noise'\]: 'yes'"),
    *[(key, None, ValueError, f"no '{key}' entry") for key in ("seed", "num_steps", "sigma")],
    *[(key, None, ValueError, f"no '{key}' entry") for key in ("schedule", "resample", "draw")],
    *[(key, None, ValueError, f"no '{key}' entry") for key in ("total_steps", "rank_noise")],
]


@pytest.mark.parametrize(("key", "value", "error", "match"), BAD_ENTRIES)
def test_a_bad_flatopt_entry_is_refused_by_name_and_nothing_changes(key, value, error, match):
    _, opt, checkpoint = _two_checkpoints()
    if value is None:
        del checkpoint["flatopt"][key]
    else:
        checkpoint["flatopt"][key] = value
    before = copy.deepcopy(opt.state_dict())
    sigma, inner_state = opt.sigma, copy.deepcopy(opt.optimizer.state_dict())
    with pytest.raises(error, match=match):
        opt.load_state_dict(checkpoint)
    _assert_same_state(opt.state_dict(), before)
    _assert_same_state(opt.optimizer.state_dict(), inner_state)
    assert opt.sigma == sigma and opt.param_groups[0]["lr"] == 0.02


def test_a_flatopt_entry_that_is_not_a_dict_is_refused():
    _, opt, checkpoint = _two_checkpoints()
    checkpoint["flatopt"] = [1, 2]
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(TypeError, match="must be a dict, got list"):
        opt.load_state_dict(checkpoint)
    _assert_same_state(opt.state_dict(), before)


def test_a_failing_inner_load_changes_nothing_either():
    _, opt, checkpoint = _two_checkpoints()
    checkpoint["param_groups"][0]["params"] = checkpoint["param_groups"][0]["params"][:-1]
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="parameter group"):
        opt.load_state_dict(checkpoint)
    _assert_same_state(opt.state_dict(), before)
    assert opt.num_steps == 1 and opt.seed == 3


def test_a_callable_schedule_is_compared_by_qualified_name():
    saved = _wrap(tiny_lora(), schedule=_fixed_factor).state_dict()
    other = _wrap(tiny_lora(), schedule=_ramp, seed=5)
    with pytest.raises(ValueError, match=r"_fixed_factor.*_ramp"):
        other.load_state_dict(saved)
    assert other.seed == 5
    same = _wrap(tiny_lora(), schedule=_fixed_factor, seed=5)
    same.load_state_dict(saved)
    assert same.seed == 3


# -- 3. caches keyed on what they depend on -----------------------------------------------------


def _frozen_dense(seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(12, 5)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(5, 12, generator=g))
    layer.requires_grad_(False)
    return layer, torch.randn(3, 12, generator=g)


def _large_lora(seed=0):
    """A LoRA layer over 70 400 weights: its ‖W_i‖² come from the cached base row norms."""
    g = torch.Generator().manual_seed(seed)
    layer = LoRALinear(nn.Linear(1100, 64, bias=False), rank=2, alpha=2)
    layer.base.requires_grad_(False)
    with torch.no_grad():
        layer.base.weight.copy_(torch.randn(64, 1100, generator=g) * 0.05)
        layer.lora_A.copy_(torch.randn(2, 1100, generator=g) * 0.05)
        layer.lora_B.copy_(torch.randn(64, 2, generator=g))
    return layer, torch.randn(2, 1100, generator=g)


def _target_and_delta(kind, layer):
    if kind == "dense":
        return layer, None
    return layer.base, LowRank(layer.lora_B, layer.lora_A, layer.scaling)


def _expected(weight, delta, opt):
    std = noise_std(weight, delta, opt.sigma)
    seed = derive_seed(opt.seed, opt.num_steps, 0, 0, 0)
    return perturbed_weight(weight, std, generator=torch.Generator(), seed=seed)


CHANGES = {
    "data": lambda module: setattr(module.weight, "data", module.weight.data * 10),
    "assign": lambda module: module.load_state_dict(
        {**module.state_dict(), "weight": module.weight.detach() * 10}, assign=True
    ),
    "to": lambda module: module.to(torch.float64),
}


@pytest.mark.parametrize("change", list(CHANGES))
@pytest.mark.parametrize("kind", ["dense", "large_lora"])
def test_the_noise_follows_the_weight_the_forward_reads_after_it_changes(kind, change):
    layer, x = _frozen_dense() if kind == "dense" else _large_lora()
    target, delta = _target_and_delta(kind, layer)
    adapters = [flatopt.dense(layer)] if kind == "dense" else []
    opt = _wrap(layer, adapters=adapters, lr=0.0)
    seen = record_reads(target)
    with opt.perturbed():
        layer(x)
    opt.step()
    CHANGES[change](target)
    if change == "to" and kind == "large_lora":
        layer.to(torch.float64)
    weight = target.weight
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a changed weight object needs no re-scan
        with opt.perturbed():
            layer(x.to(weight.dtype))
    _, delta = _target_and_delta(kind, layer)
    assert bits_equal(seen[-1], _expected(weight.detach(), delta, opt))
    assert target.weight is weight  # and the new weight is left as it is


# -- 4. module replacement and deletion --------------------------------------------------------


class Holder(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


@pytest.mark.parametrize("auto", [False, True])
def test_a_replaced_target_is_found_again_with_a_warning(auto):
    model = tiny_lora()
    opt = _wrap(model, auto=auto)
    ((x, _),) = toy_batches(1)
    old = model[2]
    g = torch.Generator().manual_seed(4)
    model[2] = LoRALinear(nn.Linear(8, 5), rank=2)
    model[2].base.requires_grad_(False)
    with torch.no_grad():
        model[2].lora_B.copy_(torch.randn(5, 2, generator=g))
    seen, seen_old = _record_in_forward(model[2].base), _record_in_forward(old.base)
    with pytest.warns(UserWarning, match=r"\['2'\] were replaced or deleted"):
        _arm(model, opt, x, auto)
    assert opt.targets == [("0", (8, 6)), ("2", (5, 8))]
    assert not torch.equal(seen[0], model[2].base.weight)  # the new module is perturbed
    old(torch.zeros(1, 8))
    assert torch.equal(seen_old[0], old.base.weight)  # the one it replaced is not
    _disarm(opt, auto)
    assert_nothing_armed(model)
    assert_nothing_armed(old)


def test_a_deleted_target_is_dropped_with_a_warning():
    model = tiny_lora()
    opt = _wrap(model)
    model[2] = nn.Linear(8, 3)  # no LoRA any more
    with pytest.warns(UserWarning, match=r"\['2'\].*now perturbs 1 weights"):
        opt.perturb()
    assert opt.targets == [("0", (8, 6))]
    model(torch.zeros(1, 6))
    opt.restore()


def test_a_model_left_without_targets_raises_at_perturb_and_arms_nothing():
    model = tiny_lora()
    opt = _wrap(model)
    model[0], model[2] = nn.Linear(6, 8), nn.Linear(8, 3)
    with pytest.raises(ValueError, match="No adapter recognised a LoRA layer"):
        opt.perturb()
    assert not opt.is_perturbed


def test_a_target_moved_inside_a_wrapper_is_found_again_silently():
    model, twin = tiny_lora(), tiny_lora()
    opt, twin_opt = _wrap(model), _wrap(twin)
    ((x, _),) = toy_batches(1)
    model[0] = Holder(model[0])
    seen, want = record_reads(model[0].inner.base), record_reads(twin[0].base)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for m, o in ((model, opt), (twin, twin_opt)):
            with o.perturbed():
                m(x)
    assert opt.targets == [("0.inner", (8, 6)), ("2", (3, 8))]
    assert bits_equal(seen[0], want[0])  # the same index, so the same noise


# -- 5. error paths leave nothing armed ---------------------------------------------------------


def test_step_while_armed_restores_then_raises_and_takes_no_step():
    model = tiny_lora()
    opt = _wrap(model)
    ((x, y),) = toy_batches(1)
    params, start = _params(model), snapshot(model)
    opt.perturb()
    F.mse_loss(model(x), y).backward()
    with pytest.raises(RuntimeError, match="restored it and did not take the step"):
        opt.step()
    assert not opt.is_perturbed and opt.num_steps == 0
    assert_nothing_armed(model)
    assert _same(_params(model), params)
    model.eval()
    assert bits_equal(model(x), lora_forward(model, x))  # evaluation after the error sees W
    assert_untouched(model, start, frozen_names(model))
    model.train()
    opt.step()  # the gradients are still there: the step can now be taken
    assert opt.num_steps == 1


class FailingAdamW(torch.optim.AdamW):
    fail = True

    def step(self, closure=None):
        if self.fail:
            raise RuntimeError("the inner step failed")
        return super().step(closure)


def test_a_failing_inner_step_in_auto_mode_leaves_nothing_armed():
    model = tiny_lora()
    inner = FailingAdamW([p for p in model.parameters() if p.requires_grad], lr=0.02)
    opt = flatopt.FlatPerturb(inner, model, sigma=0.3, schedule="constant", seed=3, auto=True)
    seen = record_reads(model[0].base)
    ((x, y),) = toy_batches(1)
    F.mse_loss(model(x), y).backward()
    with pytest.raises(RuntimeError, match="the inner step failed"):
        opt.step()
    assert not opt.is_perturbed and opt.num_steps == 0
    assert_nothing_armed(model)
    model.eval()
    assert bits_equal(model(x), lora_forward(model, x))
    model.train()
    inner.fail = False
    model(x)  # the step is retried with its own noise
    assert len(seen) == 3 and bits_equal(seen[2], seen[0])
    opt.step()
    assert opt.num_steps == 1


@pytest.mark.parametrize("auto", [False, True])
def test_a_failing_closure_leaves_nothing_armed(auto):
    model = tiny_lora()
    opt = _wrap(model, auto=auto)
    ((x, y),) = toy_batches(1)

    def closure():
        F.mse_loss(model(x), y).backward()
        raise ValueError("the closure failed")

    with pytest.raises(ValueError, match="the closure failed"):
        opt.step(closure)
    assert not opt.is_perturbed and opt.num_steps == 0
    assert_nothing_armed(model)


def test_a_second_flatperturb_that_fails_to_arm_leaves_the_first_one_armed():
    """A model belongs to one FlatPerturb: a second one built while the first is perturbing
    the model is refused, and the first goes on untouched."""
    model = tiny_lora()
    first = _wrap(model)
    ((x, _),) = toy_batches(1)
    seen = record_reads(model[0].base)
    first.perturb()
    with pytest.raises(RuntimeError, match=r"perturbed by FlatPerturb\(seed=\d+, num_steps=0"):
        _wrap(model, seed=8)
    assert first.is_perturbed
    model(x)
    first.restore()
    model(x)
    assert not torch.equal(seen[0], model[0].base.weight)
    assert torch.equal(seen[1], model[0].base.weight)
    assert_nothing_armed(model)
    first.step()
    with pytest.warns(UserWarning, match="takes it over"):
        second = _wrap(model, seed=8)
    with second.perturbed():  # and the second one arms once the first has restored
        model(x)


def test_an_auto_flatperturb_dropped_mid_step_leaves_nothing_armed():
    model = tiny_lora()
    opt = _wrap(model, auto=True)
    ((x, y),) = toy_batches(1)
    F.mse_loss(model(x), y).backward()
    del opt
    gc.collect()
    assert _clean_in_training_mode(model, x)
    with _wrap(model).perturbed():
        model(x)


def _interrupt_an_auto_forward():
    """An auto-armed forward stopped by a KeyboardInterrupt inside a target, after flatopt's
    pre-hook wrote W + ε into it: its forward hook never runs."""
    model = tiny_lora()
    opt = _wrap(model, auto=True)
    ((x, _),) = toy_batches(1)

    def interrupt(module, args):
        raise KeyboardInterrupt

    weight = model[0].base.weight
    handle = model[0].base.register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        model(x)
    handle.remove()
    assert opt.is_perturbed
    return model, opt, weight


def test_an_interrupted_auto_forward_leaves_w_in_the_state_dict():
    model, opt, weight = _interrupt_an_auto_forward()
    try:
        assert bits_equal(model.state_dict()["0.base.weight"], weight)
        assert model[0].base._parameters["weight"] is weight
        assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    finally:
        opt.step()  # disarms, undoing the interrupted call: nothing leaks into other tests
    assert_nothing_armed(model)


def test_an_interrupted_auto_forward_leaves_w_in_a_pickled_model():
    """The call's guard undoes it at once: W in the module, no saved-tensor hooks left."""
    model, opt, weight = _interrupt_an_auto_forward()
    try:
        assert model[0].base._parameters["weight"] is weight
        assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
        assert bits_equal(_round_trip(model)[0].base.weight.detach(), weight.detach())
    finally:
        opt.step()
    assert_nothing_armed(model)
