"""FlatPerturb as a torch.optim.Optimizer: the checks PyTorch's own optimizers pass, plus
flatopt's own (σ = 0 is the bare optimizer, the same seed is the same run), and its errors."""

import copy

import pytest
import torch
from helpers import bits_equal, build
from torch import nn

import flatopt


def _setup(seed=0, sigma=0.1, inner="adamw", device="cpu", **kwargs):
    model, x, _ = build("lora", torch.float32, 8, 6, 2, seed=seed, device=device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if inner == "adamw":
        opt = torch.optim.AdamW(trainable, lr=1e-2)
    else:
        opt = torch.optim.SGD(trainable, lr=1e-2, momentum=0.9)
    kwargs.setdefault("schedule", "linear")
    kwargs.setdefault("total_steps", 5)
    wrapper = flatopt.FlatPerturb(
        opt, model, sigma=sigma, seed=kwargs.pop("noise_seed", 7), **kwargs
    )
    return model, x, opt, wrapper


def _train(model, x, opt, steps, perturb=True):
    losses = []
    for _ in range(steps):
        if perturb:
            opt.perturb()
        loss = model(x).square().mean()
        loss.backward()
        if perturb:
            opt.restore()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_it_is_an_optimizer_sharing_the_inner_state():
    model, x, inner, opt = _setup()
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is inner.param_groups
    assert opt.defaults is inner.defaults
    _train(model, x, opt, 2)
    assert opt.state is inner.state and len(opt.state) > 0
    opt.load_state_dict(opt.state_dict())
    assert opt.param_groups is inner.param_groups and opt.state is inner.state


def test_an_lr_scheduler_on_the_wrapper_drives_the_inner_lr():
    model, x, inner, opt = _setup()
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _train(model, x, opt, 1)
    scheduler.step()
    assert inner.param_groups[0]["lr"] == pytest.approx(5e-3)
    opt.load_state_dict(opt.state_dict())
    _train(model, x, opt, 1)
    scheduler.step()
    assert inner.param_groups[0]["lr"] == pytest.approx(2.5e-3)


def test_sigma_zero_is_exactly_the_bare_optimizer(device):
    model_a, x, _, opt = _setup(sigma=0.0, schedule="constant", device=device)
    model_b, _, inner_b, _ = _setup(sigma=0.0, schedule="constant", device=device)
    _train(model_a, x, opt, 4)
    _train(model_b, x, inner_b, 4, perturb=False)
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert bits_equal(a.detach(), b.detach())


def test_the_first_cosine_step_is_the_bare_optimizer_and_later_ones_are_not(device):
    model_a, x, _, opt = _setup(schedule="cosine", total_steps=10, device=device)
    model_b, _, inner_b, _ = _setup(device=device)
    _train(model_a, x, opt, 1)
    _train(model_b, x, inner_b, 1, perturb=False)
    assert all(
        bits_equal(a.detach(), b.detach())
        for a, b in zip(model_a.parameters(), model_b.parameters())
    )
    _train(model_a, x, opt, 1)
    _train(model_b, x, inner_b, 1, perturb=False)
    assert not all(torch.equal(a, b) for a, b in zip(model_a.parameters(), model_b.parameters()))


def test_the_same_seed_gives_the_same_run_and_another_seed_another(device):
    runs = []
    for noise_seed in (7, 7, 8):
        model, x, _, opt = _setup(noise_seed=noise_seed, device=device)
        runs.append((_train(model, x, opt, 4), _params(model)))
    assert runs[0][0] == runs[1][0]
    assert all(bits_equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    assert runs[0][0] != runs[2][0]


@pytest.mark.parametrize("inner", ["adamw", "sgd"])
def test_resume_from_state_dict_continues_bit_identically(inner, device):
    model, x, _, opt = _setup(inner=inner, device=device)
    _train(model, x, opt, 2)
    model_state = copy.deepcopy(model.state_dict())
    opt_state = copy.deepcopy(opt.state_dict())
    losses = _train(model, x, opt, 3)
    # Fresh objects, a different seed argument: the checkpoint must win.
    model2, _, _, opt2 = _setup(
        inner=inner, noise_seed=123, total_steps=99, sigma=0.5, device=device
    )
    model2.load_state_dict(model_state)
    opt2.load_state_dict(opt_state)
    assert opt2.num_steps == 2 and opt2.seed == opt.seed
    losses2 = _train(model2, x, opt2, 3)
    assert losses2 == losses
    assert all(bits_equal(a, b) for a, b in zip(_params(model), _params(model2)))


def test_a_bare_optimizer_checkpoint_loads_with_a_warning():
    model, x, inner, opt = _setup()
    _train(model, x, opt, 2)
    with pytest.warns(UserWarning, match="no 'flatopt' entry"):
        opt.load_state_dict(inner.state_dict())
    assert opt.num_steps == 2


def test_a_callable_schedule_needs_a_callable_to_resume():
    model, x, _, opt = _setup(schedule=lambda step: 0.5, total_steps=None)
    _train(model, x, opt, 1)
    state = opt.state_dict()
    assert state["flatopt"]["schedule"] == "callable"
    _, _, _, plain = _setup()
    with pytest.raises(ValueError, match="callable schedule"):
        plain.load_state_dict(state)


def test_closure_step_equals_the_manual_loop(device):
    model_a, x, _, opt_a = _setup(device=device)
    model_b, _, _, opt_b = _setup(device=device)
    manual = _train(model_a, x, opt_a, 3)
    closure_losses = []
    for _ in range(3):

        def closure():
            opt_b.zero_grad()
            loss = model_b(x).square().mean()
            loss.backward()
            return loss

        closure_losses.append(opt_b.step(closure).item())
        assert not opt_b.is_perturbed
    assert closure_losses == manual
    assert all(bits_equal(a, b) for a, b in zip(_params(model_a), _params(model_b)))


def test_a_step_without_gradients_changes_nothing(device):
    model, _, _, opt = _setup(device=device)
    before = _params(model)
    opt.step()
    assert all(bits_equal(a, b) for a, b in zip(before, _params(model)))
    assert opt.num_steps == 1


def test_frozen_and_gradless_parameters_are_left_alone(device):
    model, x, inner, opt = _setup(inner="sgd", device=device)
    extra = nn.Parameter(torch.ones(3, device=device))
    opt.add_param_group({"params": [extra], "lr": 0.1})
    assert inner.param_groups[-1]["params"][0] is extra
    _train(model, x, opt, 2)
    assert torch.equal(extra, torch.ones(3, device=device))


def test_read_only_views_and_repr():
    model, x, _, opt = _setup(sigma=0.2, schedule="linear", total_steps=4)
    assert opt.targets == [("0", (8, 6)), ("2", (3, 8))]
    assert opt.sigma == 0.0 and opt.num_steps == 0 and not opt.is_perturbed
    _train(model, x, opt, 2)
    assert opt.sigma == pytest.approx(0.1) and opt.num_steps == 2
    opt.perturb()
    assert opt.is_perturbed
    text = repr(opt)
    with pytest.warns(UserWarning, match="No target layer ran"):
        opt.restore()
    for fragment in (
        "FlatPerturb",
        "sigma: 0.2",
        "'linear'",
        "total_steps: 4",
        "num_steps: 2",
        "targets: 2 layers",
        "AdamW",
        "perturbed: True",
    ):
        assert fragment in text
    with pytest.raises(AttributeError):
        opt.num_steps = 3


def test_state_dict_holds_the_noise_settings():
    _, _, _, opt = _setup(sigma=0.1, resample="call", rank_noise=False)
    own = opt.state_dict()["flatopt"]
    assert own == {
        "seed": 7,
        "num_steps": 0,
        "draw": 0,
        "sigma": 0.1,
        "schedule": "linear",
        "schedule_name": None,
        "total_steps": 5,
        "resample": "call",
        "rank_noise": False,
    }


def _global_rng_states(device):
    """torch's default generators: the CPU one, and the current CUDA device's on CUDA."""
    states = [torch.get_rng_state()]
    if device == "cuda":
        states.append(torch.cuda.get_rng_state())
    return states


def test_seed_none_draws_once_from_the_default_generator(device):
    model, x, _ = build("lora", torch.float32, 4, 4, 2, seed=0, device=device)
    inner = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    torch.manual_seed(0)
    first = flatopt.FlatPerturb(inner, model, total_steps=3).seed
    torch.manual_seed(0)
    assert flatopt.FlatPerturb(inner, model, total_steps=3).seed == first
    states = _global_rng_states(device)
    opt = flatopt.FlatPerturb(inner, model, total_steps=3, seed=5)
    # An explicit seed reads nothing, and training never touches the global generators.
    assert all(map(torch.equal, states, _global_rng_states(device)))
    _train(model, x, opt, 3)
    assert all(map(torch.equal, states, _global_rng_states(device)))


def _model():
    return build("lora", torch.float32, 4, 4, 2, seed=0)[0]


def _inner(model):
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)


BAD_ARGUMENTS = [
    ({"sigma": -0.1}, ValueError, r"Invalid sigma: -0\.1.*>= 0"),
    ({"sigma": float("nan")}, ValueError, r"Invalid sigma: nan"),
    ({"sigma": "0.05"}, TypeError, r"Invalid sigma: '0\.05'.*number"),
    ({"schedule": "cosin"}, ValueError, r"Invalid schedule: 'cosin'.*'cosine'"),
    ({"schedule": "cosine"}, ValueError, r"schedule='cosine' needs total_steps.*constant"),
    ({"schedule": "linear", "total_steps": 0}, ValueError, r"Invalid total_steps: 0"),
    ({"total_steps": 2.5}, ValueError, r"Invalid total_steps: 2\.5"),
    ({"resample": "batch", "total_steps": 3}, ValueError, r"Invalid resample: 'batch'.*'step'"),
    ({"seed": 1.5, "total_steps": 3}, TypeError, r"Invalid seed: 1\.5.*int"),
    ({"rank_noise": 1, "total_steps": 3}, TypeError, r"Invalid rank_noise: 1"),
    ({"adapters": [3], "total_steps": 3}, TypeError, r"Invalid adapter: 3.*callables"),
    ({"adapters": [lambda m: "yes"], "total_steps": 3}, TypeError, r"returned str.*Target"),
    (
        {"adapters": [lambda m: flatopt.Target(m, "nope")], "total_steps": 3},
        ValueError,
        r"targets Sequential\.nope.*not a tensor.*param_name",
    ),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_ARGUMENTS)
def test_bad_arguments_raise_naming_the_value_and_fix(kwargs, error, match):
    model = _model()
    with pytest.raises(error, match=match):
        flatopt.FlatPerturb(_inner(model), model, **kwargs)


def test_bad_optimizer_and_model():
    model = _model()
    with pytest.raises(TypeError, match=r"optimizer must be a torch\.optim\.Optimizer, got list"):
        flatopt.FlatPerturb([1], model, total_steps=3)
    wrapped = flatopt.FlatPerturb(_inner(model), model, total_steps=3)
    with pytest.raises(TypeError, match="already a FlatPerturb"):
        flatopt.FlatPerturb(wrapped, model, total_steps=3)
    with pytest.raises(TypeError, match=r"model must be an nn\.Module"):
        flatopt.FlatPerturb(_inner(model), 3, total_steps=3)
    with pytest.raises(TypeError, match="item 1 is int"):
        flatopt.FlatPerturb(_inner(model), [model, 3], total_steps=3)


def test_a_model_without_lora_lists_the_module_types_it_saw():
    plain = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    match = r"No adapter recognised a LoRA layer.*\['Linear', 'ReLU', 'Sequential'\].*add_lora"
    with pytest.raises(ValueError, match=match):
        flatopt.FlatPerturb(torch.optim.SGD(plain.parameters(), lr=0.1), plain, total_steps=3)


def test_an_integer_weight_is_refused_by_name():
    layer = nn.Linear(2, 2)
    layer.register_buffer("table", torch.ones(2, 2, dtype=torch.int8))
    adapter = [lambda m: flatopt.Target(m, "table") if m is layer else None]
    with pytest.raises(
        ValueError, match=r"Module '': Linear\.table is a Tensor of dtype torch.int8"
    ):
        flatopt.FlatPerturb(
            torch.optim.SGD(layer.parameters(), lr=0.1), layer, total_steps=3, adapters=adapter
        )


CALL_ORDER = [
    (["perturb", "perturb"], r"perturb\(\) was called twice without restore\(\)"),
    (["restore"], r"restore\(\) was called with nothing armed"),
    (["perturb", "step"], r"step\(\) was called while the perturbation is armed.*restore\(\)"),
    (["perturb", "load_state_dict"], r"load_state_dict\(\) while perturbed"),
]


@pytest.mark.parametrize(("calls", "match"), CALL_ORDER)
def test_wrong_call_order_raises(calls, match):
    model = _model()
    opt = flatopt.FlatPerturb(_inner(model), model, total_steps=3)
    state = opt.state_dict()
    *first, last = calls
    for name in first:
        getattr(opt, name)()
    with pytest.raises(RuntimeError, match=match):
        if last == "load_state_dict":
            opt.load_state_dict(state)
        else:
            getattr(opt, last)()
    assert opt.num_steps == 0


def test_register_adapter_is_global_and_validated():
    class MyLoRA(nn.Linear):
        pass

    def adapter(module):
        return flatopt.Target(module, "weight") if isinstance(module, MyLoRA) else None

    layer = MyLoRA(3, 3)
    try:
        assert flatopt.register_adapter(adapter) is adapter
        opt = flatopt.FlatPerturb(torch.optim.SGD(layer.parameters(), lr=0.1), layer, total_steps=3)
        assert opt.targets == [("", (3, 3))]
    finally:
        flatopt.adapters.unregister_adapter(adapter)
    with pytest.raises(TypeError, match="expects a callable"):
        flatopt.register_adapter("peft")


def test_a_weight_read_by_two_modules_gets_one_noise_in_both(device):
    torch.manual_seed(0)
    first = nn.Linear(6, 6)
    second = nn.Linear(6, 6)
    second.weight = first.weight  # tied
    model = nn.Sequential(first, second).to(device)
    seen = {}  # hooks registered before FlatPerturb's run while W + ε is swapped in
    for name, layer in (("first", first), ("second", second)):
        layer.register_forward_hook(lambda m, a, o, name=name: seen.update({name: m.weight + 0}))
    opt = flatopt.FlatPerturb(
        torch.optim.SGD(model.parameters(), lr=0.1),
        model,
        schedule="constant",
        seed=0,
        adapters=[lambda m: flatopt.Target(m, "weight") if isinstance(m, nn.Linear) else None],
    )
    assert opt.targets == [("0", (6, 6))]
    with opt.perturbed():
        model(torch.randn(2, 6, device=device)).sum().backward()
    assert not torch.equal(seen["first"], first.weight)
    assert bits_equal(seen["first"], seen["second"])


def test_a_perturbation_that_no_layer_saw_warns_and_one_that_did_does_not(recwarn, device):
    model, x, _, opt = _setup(schedule="constant", device=device)
    with pytest.warns(UserWarning, match=r"No target layer ran.*module\(x\)"), opt.perturbed():
        pass
    with opt.perturbed():
        model(x)
    assert not [w for w in recwarn if "No target layer ran" in str(w.message)]


def test_two_adapters_claiming_one_weight_on_one_module_count_once(device):
    model, x, _ = build("lora", torch.float32, 6, 5, 2, seed=0, device=device)
    claim_base = [lambda m: flatopt.Target(m, "weight") if m is model[0].base else None]
    opt = flatopt.FlatPerturb(
        _inner(model), model, schedule="constant", seed=0, adapters=claim_base
    )
    assert [name for name, _ in opt.targets] == ["0", "2"]
    with opt.perturbed():
        model(x).sum().backward()


def test_a_dotted_param_name_reaches_a_child_weight_read_by_its_parent(device):
    class Reader(nn.Module):  # computes with its child's weight without calling the child
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(3, 4, 1)

        def forward(self, x):
            return torch.nn.functional.conv1d(x, self.conv.weight, self.conv.bias)

    reader = Reader().to(device)
    x = torch.randn(2, 3, 5, device=device)
    clean = reader(x)
    opt = flatopt.FlatPerturb(
        torch.optim.SGD(reader.parameters(), lr=0.1),
        reader,
        schedule="constant",
        seed=0,
        adapters=[lambda m: flatopt.Target(m, "conv.weight") if m is reader else None],
    )
    assert opt.targets == [("", (4, 3))]
    weight = reader.conv.weight
    with opt.perturbed():
        noisy = reader(x)
        noisy.sum().backward()
    assert not torch.allclose(noisy, clean) and reader.conv.weight is weight
    with pytest.raises(ValueError, match=r"Reader\.conv\.nope.*not a tensor"):
        flatopt.FlatPerturb(
            torch.optim.SGD(reader.parameters(), lr=0.1),
            reader,
            total_steps=3,
            adapters=[lambda m: flatopt.Target(m, "conv.nope") if m is reader else None],
        )
