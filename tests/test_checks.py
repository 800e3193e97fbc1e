"""FlatPerturb checks what it is given against what it will be used for: seeds, NumPy scalars,
total_steps, adapters and state dicts are validated by one set of rules; the optimizer is checked
against the model; a setting a checkpoint replaces is named; the optimizer's state-dict hooks run
as on any torch.optim.Optimizer; and misuses that used to pass silently say what to do.
"""

import copy
import re
import warnings
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    KINDS,
    assert_nothing_armed,
    build,
    record_reads,
    tiny_lora,
    toy_batches,
    transposed_adapter,
)
from torch import nn

import flatopt
from flatopt.adapters import find_targets
from flatopt.lora import LoRALinear
from flatopt.noise import schedule_factor

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = {
    "sigma": 0.3,
    "schedule": "linear",
    "total_steps": 4,
    "seed": 5,
    "resample": "step",
    "rank_noise": True,
}


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _wrap(model, params=None, **kwargs):
    """A FlatPerturb over SGD on ``params`` (default: the model's trainable parameters)."""
    inner = torch.optim.SGD(_trainable(model) if params is None else params, lr=0.1)
    return flatopt.FlatPerturb(inner, model, **{**SETTINGS, **kwargs})


def _half(step):
    """A callable schedule: half of σ throughout."""
    return 0.5


@contextmanager
def no_warnings():
    """Any warning inside the block is an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def _perturbed_output(opt, model, x):
    """The model's output at W + ε of ``opt``'s current step."""
    with torch.no_grad(), opt.perturbed():
        return model(x)


# -- arguments: the value, what was wrong, and the fix ---------------------------------------


def _missing_on_root(module):
    return flatopt.Target(module, "nope") if isinstance(module, nn.Sequential) else None


def _missing_on_child(module):
    return flatopt.Target(module, "base.wieght") if isinstance(module, LoRALinear) else None


def _missing_child(module):
    return flatopt.Target(module, "bose.weight") if isinstance(module, LoRALinear) else None


RANGE = r"an int in \[0, 2\*\*64\)"

BAD_ARGUMENTS = [
    ({"seed": -1}, ValueError, rf"Invalid seed: -1\. A seed is {RANGE}.*seed % 2\*\*64"),
    ({"seed": 2**64}, ValueError, rf"Invalid seed: {2**64}\. A seed is {RANGE}"),
    ({"seed": 2**70}, ValueError, rf"Invalid seed: {2**70}\. A seed is {RANGE}"),
    ({"seed": 1.5}, TypeError, rf"Invalid seed: 1\.5\. Pass {RANGE}, or None"),
    ({"seed": True}, TypeError, rf"Invalid seed: True\. Pass {RANGE}, or None"),
    ({"seed": np.True_}, TypeError, rf"Invalid seed: np\.True_\. Pass {RANGE}"),
    (
        {"schedule": _half, "total_steps": "abc"},
        ValueError,
        r"Invalid total_steps: 'abc'\. It must be None or a positive int",
    ),
    ({"schedule": _half, "total_steps": 0}, ValueError, r"Invalid total_steps: 0\."),
    ({"schedule": _half, "total_steps": True}, ValueError, r"Invalid total_steps: True\."),
    (
        {"adapters": "peft"},
        TypeError,
        r"Invalid adapters: 'peft'\. adapters takes callables .* not names.*leave adapters out"
        r".*adapters=\[my_adapter\]",
    ),
    ({"adapters": 3}, TypeError, r"Invalid adapters: 3\. Pass a callable .*adapters=\[my_adapter"),
    (
        {"adapters": [_missing_on_root]},
        ValueError,
        r"'_missing_on_root', asked about the model itself \(Sequential\), targets "
        r"Sequential\.nope, but Sequential has no attribute 'nope'.*Check param_name",
    ),
    (
        {"adapters": [_missing_on_child]},
        ValueError,
        r"asked about module '0' \(LoRALinear\), targets LoRALinear\.base\.wieght, but Linear "
        r"'base' has no attribute 'wieght'.*Check param_name",
    ),
    (
        {"adapters": [_missing_child]},
        ValueError,
        r"asked about module '0' \(LoRALinear\), targets LoRALinear\.bose\.weight, but "
        r"LoRALinear has no attribute 'bose'",
    ),
]


def _name(value):
    if isinstance(value, list):
        return f"[{','.join(map(_name, value))}]"
    return getattr(value, "__name__", None) or repr(value)


def _case(kwargs):
    """A test id for a dict of arguments: ``seed=-1``, ``adapters=[_missing_on_root]``."""
    return ",".join(f"{name}={_name(value)}" for name, value in kwargs.items())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"), BAD_ARGUMENTS, ids=[_case(case[0]) for case in BAD_ARGUMENTS]
)
def test_bad_arguments_name_the_argument_the_value_and_the_fix(kwargs, error, match):
    with pytest.raises(error, match=match):
        _wrap(tiny_lora(), **kwargs)


def test_the_ends_of_the_seed_range_are_two_runs_and_beyond_them_is_refused():
    x = toy_batches(1)[0][0]
    outputs = []
    for seed in (0, 2**64 - 1):
        model = tiny_lora()
        opt = _wrap(model, seed=seed, schedule="constant")
        assert opt.seed == seed
        outputs.append(_perturbed_output(opt, model, x))
    assert not torch.equal(*outputs)
    # -1 would repeat the noise of 2**64 - 1, and 2**64 that of 0.
    for seed in (-1, 2**64):
        with pytest.raises(ValueError, match=rf"Invalid seed: {seed}\."):
            _wrap(tiny_lora(), seed=seed)


def _transposed_model():
    return build("transposed", torch.float32, 8, 6, 2, seed=0)[0]


def test_one_adapter_needs_no_list():
    listed = _wrap(_transposed_model(), adapters=[transposed_adapter]).targets
    alone = _wrap(_transposed_model(), adapters=transposed_adapter).targets
    assert alone == listed == [("0", (8, 6))]
    assert [name for name, _ in find_targets(_transposed_model(), transposed_adapter)] == ["0"]


# -- NumPy scalars: the noise of the Python number, stored as one -----------------------------

NUMPY_SCALARS = [
    ("sigma", np.float32(0.25), 0.25),
    ("sigma", np.float64(0.1), 0.1),
    ("seed", np.int64(123), 123),
    ("seed", np.uint64(2**64 - 1), 2**64 - 1),
    ("total_steps", np.int64(3), 3),
    ("total_steps", np.int32(7), 7),
]


@pytest.mark.parametrize(
    ("name", "numpy_value", "value"), NUMPY_SCALARS, ids=[f"{n}={v!r}" for n, v, _ in NUMPY_SCALARS]
)
def test_a_numpy_scalar_gives_the_noise_of_the_python_number(name, numpy_value, value):
    x = toy_batches(1)[0][0]
    outputs, owns = [], []
    for given in (numpy_value, value):
        model = tiny_lora()
        opt = _wrap(model, **{name: given})
        _perturbed_output(opt, model, x)
        opt.step()  # past step 0, where total_steps shapes σ_t
        outputs.append(_perturbed_output(opt, model, x))
        owns.append(opt.state_dict()["flatopt"])
    assert torch.equal(*outputs)
    assert owns[0] == owns[1]
    assert type(owns[0][name]) is type(value)
    assert type(owns[0]["sigma"]) is float and type(owns[0]["seed"]) is int
    for refused in (True, np.True_):  # a bool is not a number here
        with pytest.raises(TypeError, match=r"Invalid sigma: (np\.)?True_?\. sigma must be"):
            _wrap(tiny_lora(), sigma=refused)


def test_a_checkpoint_holding_numpy_scalars_loads_them_as_python_numbers():
    saved = _wrap(tiny_lora()).state_dict()
    numbers = {"seed": 5, "sigma": 0.3, "total_steps": 4, "num_steps": 2}
    saved["flatopt"].update(
        seed=np.int64(5), sigma=np.float64(0.3), total_steps=np.int64(4), num_steps=np.int64(2)
    )
    opt = _wrap(tiny_lora())
    with no_warnings():  # the same settings as the constructor's
        opt.load_state_dict(saved)
    own = opt.state_dict()["flatopt"]
    assert {key: own[key] for key in numbers} == numbers
    assert {key: type(own[key]) for key in numbers} == {key: type(v) for key, v in numbers.items()}


# -- load_state_dict: a dict, checked by the constructor's rules ------------------------------

NOT_A_STATE_DICT = [
    (None, r"state_dict must be a dict, got NoneType\. Pass what FlatPerturb\.state_dict\(\)"),
    ([("state", {})], r"state_dict must be a dict, got list\."),
    ("opt.pt", r"state_dict must be a dict, got str\..*torch\.load\(path\)"),
]


@pytest.mark.parametrize(("state_dict", "match"), NOT_A_STATE_DICT, ids=["None", "list", "str"])
def test_load_state_dict_refuses_what_is_not_a_dict(state_dict, match):
    with pytest.raises(TypeError, match=match):
        _wrap(tiny_lora()).load_state_dict(state_dict)


BAD_CHECKPOINT_SEEDS = [
    (-1, ValueError, rf"Invalid state_dict\['flatopt'\]\['seed'\]: -1\. A seed is {RANGE}"),
    (2**64, ValueError, rf"Invalid state_dict\['flatopt'\]\['seed'\]: {2**64}\. A seed is"),
    (1.5, TypeError, rf"Invalid state_dict\['flatopt'\]\['seed'\]: 1\.5\. Pass {RANGE}"),
    (True, TypeError, rf"Invalid state_dict\['flatopt'\]\['seed'\]: True\. Pass {RANGE}"),
]


@pytest.mark.parametrize(
    ("seed", "error", "match"),
    BAD_CHECKPOINT_SEEDS,
    ids=[repr(case[0]) for case in BAD_CHECKPOINT_SEEDS],
)
def test_a_checkpoint_seed_is_checked_like_the_constructors(seed, error, match):
    opt = _wrap(tiny_lora())
    saved = opt.state_dict()
    saved["flatopt"]["seed"] = seed
    saved["flatopt"]["num_steps"] = 3
    with pytest.raises(error, match=match):
        opt.load_state_dict(saved)
    assert (opt.seed, opt.num_steps) == (5, 0)  # nothing was loaded


# -- settings a checkpoint replaces -----------------------------------------------------------

REPLACED = [
    ("sigma", 0.2),
    ("schedule", "cosine"),
    ("total_steps", 9),
    ("seed", 6),
    ("resample", "call"),
    ("rank_noise", False),
]


@pytest.mark.parametrize(("name", "built_with"), REPLACED)
def test_a_checkpoint_replacing_a_constructor_setting_warns_naming_it(name, built_with):
    saved = _wrap(tiny_lora()).state_dict()
    with no_warnings():  # the same settings load silently
        _wrap(tiny_lora()).load_state_dict(saved)
    opt = _wrap(tiny_lora(), **{name: built_with})
    ours, theirs = re.escape(repr(built_with)), re.escape(repr(SETTINGS[name]))
    match = rf"replaced noise settings .*\({name}: this FlatPerturb's {ours}, the checkpoint's "
    with pytest.warns(UserWarning, match=rf"{match}{theirs}\): the checkpoint's win") as record:
        opt.load_state_dict(saved)
    assert len(record) == 1
    assert opt.state_dict()["flatopt"][name] == SETTINGS[name]


def test_every_replaced_setting_is_named_in_one_warning():
    saved = _wrap(tiny_lora()).state_dict()
    opt = _wrap(tiny_lora(), **dict(REPLACED))
    with pytest.warns(UserWarning, match="replaced noise settings") as record:
        opt.load_state_dict(saved)
    assert len(record) == 1
    message = str(record[0].message)
    for name, built_with in REPLACED:
        assert f"{name}: this FlatPerturb's {built_with!r}, the checkpoint's" in message


def test_a_drawn_seed_is_replaced_silently_and_a_loaded_one_is_kept_as_chosen():
    saved = _wrap(tiny_lora()).state_dict()
    other = _wrap(tiny_lora(), seed=6).state_dict()
    drawn = _wrap(tiny_lora(), seed=None)
    for opt in (drawn, copy.deepcopy(drawn)):  # a copy's seed was drawn too
        assert opt.seed != 5
        with no_warnings():
            opt.load_state_dict(saved)
        assert opt.seed == 5
        with pytest.warns(UserWarning, match=r"\(seed: this FlatPerturb's 5, the checkpoint's 6\)"):
            opt.load_state_dict(other)


def test_base_sigma_is_the_configured_sigma_and_sigma_the_scheduled_one():
    model = tiny_lora()
    x = toy_batches(1)[0][0]
    opt = _wrap(model, sigma=0.1, schedule="cosine", total_steps=4)
    for step in range(6):
        assert opt.base_sigma == 0.1 == opt.state_dict()["flatopt"]["sigma"]
        assert opt.sigma == 0.1 * schedule_factor("cosine", step, 4)
        _perturbed_output(opt, model, x)
        opt.step()
    assert opt.sigma == opt.base_sigma
    saved = _wrap(tiny_lora(), sigma=0.2, schedule="cosine", total_steps=4).state_dict()
    with pytest.warns(UserWarning, match=r"sigma: this FlatPerturb's 0\.1"):
        opt.load_state_dict(saved)
    assert (opt.base_sigma, opt.sigma) == (0.2, 0.0)  # the checkpoint's σ, at its step 0


# -- the optimizer's state-dict hooks ---------------------------------------------------------


def _hook_trace(opt):
    """Register each kind of state-dict hook on ``opt``, save and load; what the hooks saw."""
    trace = []

    def add_key(optimizer, state_dict):
        trace.append(("post: add", sorted(state_dict)))
        return {**state_dict, "note": "added"}

    def set_lr(optimizer, state_dict):
        trace.append("load pre")
        groups = [{**group, "lr": 0.5} for group in state_dict["param_groups"]]
        return {**state_dict, "param_groups": groups}

    opt.register_state_dict_pre_hook(lambda optimizer: trace.append("pre"))
    opt.register_state_dict_pre_hook(lambda optimizer: trace.append("pre first"), prepend=True)
    opt.register_state_dict_post_hook(add_key)
    opt.register_state_dict_post_hook(lambda o, sd: trace.append(("post: sees", sd["note"])))
    opt.register_load_state_dict_pre_hook(set_lr)
    opt.register_load_state_dict_post_hook(
        lambda optimizer: trace.append(("load post", optimizer.param_groups[0]["lr"]))
    )
    saved = opt.state_dict()
    trace.append(("saved", saved["note"]))
    opt.load_state_dict(saved)
    trace.append(("lr", opt.param_groups[0]["lr"]))
    return trace


def _expected_trace(keys):
    """What `_hook_trace` records on an optimizer whose state dict has ``keys``."""
    return [
        "pre first",
        "pre",
        ("post: add", keys),
        ("post: sees", "added"),
        ("saved", "added"),
        "load pre",
        ("load post", 0.5),
        ("lr", 0.5),
    ]


def test_state_dict_hooks_run_in_order_as_on_a_torch_optimizer():
    bare = torch.optim.SGD(_trainable(tiny_lora()), lr=0.1)
    assert _hook_trace(bare) == _expected_trace(["param_groups", "state"])
    wrapped = _wrap(tiny_lora())
    assert _hook_trace(wrapped) == _expected_trace(["flatopt", "param_groups", "state"])


def test_a_load_pre_hook_edits_what_loads_and_the_callers_dict_is_untouched():
    opt = _wrap(tiny_lora())
    saved = opt.state_dict()

    def resume_at_three(optimizer, state_dict):
        state_dict["extra"] = "the hook's copy"  # a shallow copy: the caller's dict is unchanged
        return {**state_dict, "flatopt": {**state_dict["flatopt"], "num_steps": 3}}

    handle = opt.register_load_state_dict_pre_hook(resume_at_three)
    seen = []
    opt.register_load_state_dict_post_hook(lambda optimizer: seen.append(optimizer.num_steps))
    opt.load_state_dict(saved)
    assert (opt.num_steps, seen) == (3, [3])
    assert "extra" not in saved and saved["flatopt"]["num_steps"] == 0
    handle.remove()
    opt.load_state_dict(saved)
    assert (opt.num_steps, seen) == (0, [3, 0])


def test_a_load_pre_hook_must_return_a_dict_or_none():
    opt = _wrap(tiny_lora())
    saved = opt.state_dict()
    opt.register_load_state_dict_pre_hook(lambda optimizer, state_dict: list(state_dict))
    with pytest.raises(TypeError, match=r"A load_state_dict pre-hook's result must be a dict, got"):
        opt.load_state_dict(saved)


# -- the optimizer against the model -----------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_another_models_optimizer_warns_naming_the_targets(kind):
    model, _, adapters = build(kind, torch.float32, 8, 6, 2, seed=0)
    other, _, _ = build(kind, torch.float32, 8, 6, 2, seed=1)
    names = re.escape(str([name for name, _ in find_targets(model, adapters)]))
    match = (
        rf"holds none of the trainable parameters \(the LoRA factors\) of the targets {names}, "
        r"so flatopt perturbs them but nothing trains them\. It holds none of this model's "
        r"parameters.*add_param_group"
    )
    with pytest.warns(UserWarning, match=match):
        _wrap(model, params=_trainable(other), adapters=adapters)
    model, _, _ = build(kind, torch.float32, 8, 6, 2, seed=0)
    with no_warnings():  # its own optimizer holds every target's factors
        _wrap(model, adapters=adapters)


def _two_models():
    first, second = tiny_lora(0), tiny_lora(1)
    return [first, second], _trainable(first), _trainable(second), ["1.0", "1.2"]


def _second_layer_left_out():
    model = tiny_lora()
    return model, _trainable(model[0]), _trainable(model[2]), ["2"]


@pytest.mark.parametrize(
    "setup", [_second_layer_left_out, _two_models], ids=["layer_left_out", "model_left_out"]
)
def test_factors_left_out_of_the_optimizer_are_named_until_a_param_group_holds_them(setup):
    model, held, _, names = setup()
    inner = torch.optim.SGD(held, lr=0.1)
    with pytest.warns(UserWarning, match=rf"of the targets {re.escape(str(names))}, so") as record:
        flatopt.FlatPerturb(inner, model, **SETTINGS)
    assert len(record) == 1 and "another model" not in str(record[0].message)
    model, held, left_out, _ = setup()  # the same again, with the fix the message names
    inner = torch.optim.SGD(held, lr=0.1)
    inner.add_param_group({"params": left_out})
    with no_warnings():
        flatopt.FlatPerturb(inner, model, **SETTINGS)


# -- misuses that used to pass silently or say the wrong thing --------------------------------


def test_call_resampling_warns_when_the_models_own_forward_never_ran():
    model = tiny_lora()
    opt = _wrap(model, auto=True, resample="call", schedule="constant")
    reads = record_reads(model[0].base)
    x, y = toy_batches(1)[0]
    with no_warnings():
        for _ in range(2):
            F.mse_loss(model(x), y).backward()
        opt.step()
    assert not torch.equal(reads[0], reads[1])  # a fresh ε per forward of the model
    match = (
        r"resample='call'\): target layers ran training forwards in this step but the model's "
        r"own forward never ran its hooks, so every one of them saw the same ε.*Call the model "
        r"as model\(x\), not model\.forward\(x\)"
    )
    with pytest.warns(UserWarning, match=match):
        for _ in range(2):
            F.mse_loss(model.forward(x), y).backward()
        opt.step()
    assert torch.equal(reads[2], reads[3])


def _closure(opt, model, x, misuse=None):
    def closure():
        if misuse == "perturbed":
            with opt.perturbed():
                loss = model(x).sum()
        else:
            if misuse == "perturb":
                opt.perturb()
            loss = model(x).sum()
            if misuse == "restore":
                opt.restore()
        loss.backward()
        return loss

    return closure


IN_THE_CLOSURE = r"inside the closure of step\(closure\): step\(closure\) already perturbs"
CLOSURE_MISUSES = [
    ("perturbed", rf"perturb\(\) \(or `with opt\.perturbed\(\):`\) {IN_THE_CLOSURE}"),
    ("perturb", rf"perturb\(\) \(or `with opt\.perturbed\(\):`\) {IN_THE_CLOSURE}"),
    ("restore", rf"restore\(\) {IN_THE_CLOSURE}.*Drop the perturb\(\)/restore\(\) calls"),
]


@pytest.mark.parametrize(
    ("misuse", "match"), CLOSURE_MISUSES, ids=[case[0] for case in CLOSURE_MISUSES]
)
def test_perturbing_inside_a_step_closure_says_the_step_already_perturbs(misuse, match):
    model = tiny_lora()
    opt = _wrap(model, schedule="constant")
    reads = record_reads(model[0].base)
    x = toy_batches(1)[0][0]
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=match):
        opt.step(_closure(opt, model, x, misuse))
    assert not opt.is_perturbed and opt.num_steps == 0
    assert_nothing_armed(model)
    assert all(map(torch.equal, before, model.parameters()))
    # With the calls dropped, as the message says, the next step(closure) runs perturbed.
    reference = tiny_lora()
    reference_opt = _wrap(reference, schedule="constant")
    expected = record_reads(reference[0].base)
    _perturbed_output(reference_opt, reference, x)
    assert not torch.equal(expected[0], reference[0].base.weight)
    opt.zero_grad()
    opt.step(_closure(opt, model, x))
    assert torch.equal(reads[-1], expected[0])
    assert opt.num_steps == 1
