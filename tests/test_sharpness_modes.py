"""flatopt.sharpness leaves the model and any FlatPerturb on it as it found them.

- Modes go through each module's own ``eval()``/``train()``: a layer that merges its LoRA on
  ``eval()`` (as loralib's ``merge_weights=True`` layers do) comes back unmerged and training.
- A FlatPerturb built on the model, explicit or ``auto=True``, is not armed by the forwards
  sharpness runs, its counters do not move, and its next step is the step it would have taken.
- Inside an armed step sharpness refuses, names the layer as ``opt.targets`` does, and says
  when to call it.
"""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_untouched, bits_equal, snapshot
from torch import nn

import flatopt
from flatopt.lora import add_lora

# -- a layer that acts on a mode change --------------------------------------------------------


class MergingLoRA(nn.Linear):
    """A LoRA layer that merges s·B·A into its weight on ``eval()`` and takes it out again on
    ``train()``, as loralib's ``Linear(merge_weights=True)`` does; the built-in loralib adapter
    recognises it by its attributes. Its values are small integers, so the merge and the unmerge
    are exact and W comes back bitwise."""

    def __init__(self, fan_in: int, out: int, generator: torch.Generator):
        super().__init__(fan_in, out, bias=False)
        self.weight.requires_grad_(False)
        with torch.no_grad():
            self.weight.copy_(torch.randint(-3, 4, (out, fan_in), generator=generator))
        self.lora_A = nn.Parameter(torch.randint(-2, 3, (2, fan_in), generator=generator).float())
        self.lora_B = nn.Parameter(torch.randint(-2, 3, (out, 2), generator=generator).float())
        self.r, self.scaling = 2, 0.5
        self.merge_weights, self.merged = True, False
        self.modes_set: list[bool] = []  # every train(mode) call, in order

    def train(self, mode: bool = True) -> MergingLoRA:
        super().train(mode)
        self.modes_set.append(mode)
        update = self.scaling * self.lora_B.detach() @ self.lora_A.detach()
        if mode and self.merged:
            self.weight.data -= update
            self.merged = False
        elif not mode and not self.merged:
            self.weight.data += update
            self.merged = True
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)
        if not self.merged:
            out = out + self.scaling * (x @ self.lora_A.t() @ self.lora_B.t())
        return out


def merging_model(seed: int = 0) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    return nn.Sequential(MergingLoRA(6, 8, g), nn.Tanh(), MergingLoRA(8, 3, g))


def batches(count: int = 2, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)) for _ in range(count)]


def mse(model: nn.Module):
    return lambda batch: F.mse_loss(model(batch[0]), batch[1])


def test_eval_mode_goes_through_train_so_a_merging_layer_comes_back_unmerged(one_thread):
    model = merging_model()
    weights = [layer.weight.detach().clone() for layer in (model[0], model[2])]
    data = batches()
    with torch.no_grad():
        merged_loss = (float(mse(model.eval())(data[0])) + float(mse(model)(data[1]))) / 2
    model.train()
    for layer in (model[0], model[2]):
        layer.modes_set.clear()

    result = flatopt.sharpness(model, mse(model), data, sigma=0.1, samples=2)

    assert result.clean_loss == merged_loss  # measured merged, as an evaluation loop would
    for layer, weight in zip((model[0], model[2]), weights):
        assert layer.modes_set == [False, True]  # eval() then train(), each once
        assert layer.training and not layer.merged
        assert bits_equal(layer.weight, weight)
    # The LoRA still learns: unmerged, its factors are in the graph again.
    mse(model)(data[0]).backward()
    for layer in (model[0], model[2]):
        assert layer.lora_A.grad is not None and layer.lora_A.grad.abs().sum() > 0
        assert layer.lora_B.grad is not None and layer.lora_B.grad.abs().sum() > 0


def test_a_child_left_in_eval_inside_a_training_model_comes_back_in_eval_and_merged(one_thread):
    model = merging_model()
    model.train()
    model[2].eval()  # merged, inside a model in training mode
    weights = [layer.weight.detach().clone() for layer in (model[0], model[2])]
    modes = [m.training for m in model.modules()]

    flatopt.sharpness(model, mse(model), batches(), sigma=0.1, samples=2)

    assert [m.training for m in model.modules()] == modes
    assert not model[0].merged and model[2].merged
    for layer, weight in zip((model[0], model[2]), weights):
        assert bits_equal(layer.weight, weight)


def test_without_eval_mode_no_mode_is_set(one_thread):
    model = merging_model()
    model.train()
    model[2].eval()
    for layer in (model[0], model[2]):
        layer.modes_set.clear()
    before = snapshot(model)

    flatopt.sharpness(model, mse(model), batches(), sigma=0.1, samples=2, eval_mode=False)

    assert model[0].modes_set == [] and model[2].modes_set == []
    assert model.training and model[0].training and not model[2].training
    assert_untouched(model, before)


# -- a FlatPerturb on the measured model --------------------------------------------------------


def named_model(seed: int = 0) -> nn.Sequential:
    """``encoder -> Tanh -> head``, LoRA on both: the names a user sees in ``opt.targets``."""
    torch.manual_seed(seed)
    layers = OrderedDict(encoder=nn.Linear(6, 8), act=nn.Tanh(), head=nn.Linear(8, 3))
    model = add_lora(nn.Sequential(layers), ["encoder", "head"], rank=2)
    with torch.no_grad():
        for name in ("encoder", "head"):
            model.get_submodule(name).lora_B.normal_()  # W' differs from W
    return model


def wrap(model: nn.Module, kind: str, schedule: str = "constant") -> flatopt.FlatPerturb:
    inner = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    return flatopt.FlatPerturb(
        inner, model, sigma=0.2, schedule=schedule, total_steps=10, seed=3, auto=kind == "auto"
    )


def train_step(model: nn.Module, opt: flatopt.FlatPerturb, batch) -> None:
    if opt.auto:
        mse(model)(batch).backward()
    else:
        with opt.perturbed():
            mse(model)(batch).backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("eval_mode", [True, False], ids=["eval_mode", "train_mode"])
@pytest.mark.parametrize("phase", ["before_any_step", "after_a_step"])
@pytest.mark.parametrize("kind", ["auto", "explicit"])
def test_sharpness_measures_the_clean_model_and_leaves_the_flatperturb_as_found(
    kind, phase, eval_mode, one_thread
):
    data = batches(3)
    model, twin = named_model(), named_model()
    opt, twin_opt = wrap(model, kind), wrap(twin, kind)
    if phase == "after_a_step":
        train_step(model, opt, data[0])
        train_step(twin, twin_opt, data[0])
    model.train()
    # The clean loss by a plain forward of a copy (its hooks are inert copies).
    plain = copy.deepcopy(model).train(not eval_mode)
    with torch.no_grad():
        expected = (float(mse(plain)(data[1])) + float(mse(plain)(data[2]))) / 2
    before = snapshot(model)
    state = (opt.is_perturbed, opt.num_steps, opt.sigma)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # flatopt warns of nothing here
        result = flatopt.sharpness(
            model, mse(model), data[1:], sigma=0.1, samples=2, eval_mode=eval_mode
        )

    assert result.clean_loss == expected
    assert result.mean != 0.0  # the draws were perturbed
    assert (opt.is_perturbed, opt.num_steps, opt.sigma) == state and not opt.is_perturbed
    assert model.training and all(m.training for m in model.modules())
    assert_untouched(model, before)
    # The next step is the one the wrapper would have taken without the measurement.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_step(model, opt, data[2])
        train_step(twin, twin_opt, data[2])
    assert opt.num_steps == twin_opt.num_steps
    for a, b in zip(model.parameters(), twin.parameters()):
        assert bits_equal(a.detach(), b.detach())


@pytest.mark.parametrize("eval_mode", [True, False], ids=["eval_mode", "train_mode"])
@pytest.mark.parametrize("schedule", ["constant", "cosine"])  # cosine: σ_0 = 0, nothing drawn
def test_sharpness_inside_an_auto_step_says_to_call_it_after_step(schedule, eval_mode, one_thread):
    data = batches(2)
    model, twin = named_model(), named_model()
    opt, twin_opt = wrap(model, "auto", schedule), wrap(twin, "auto", schedule)
    mse(model)(data[0]).backward()  # the step's first training forward arms the noise
    mse(twin)(data[0]).backward()
    assert opt.is_perturbed
    before = snapshot(model)

    with pytest.raises(RuntimeError, match=r"FlatPerturb\(auto=True\).*'encoder'.*after opt\.step"):
        flatopt.sharpness(model, mse(model), data[1:], sigma=0.1, eval_mode=eval_mode)

    assert opt.is_perturbed and opt.num_steps == 0
    assert model.training and all(m.training for m in model.modules())
    assert_untouched(model, before)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
        twin_opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert bits_equal(a.detach(), b.detach())
    # Once the step is taken, the same call measures.
    flatopt.sharpness(model, mse(model), data[1:], sigma=0.1, samples=2, eval_mode=eval_mode)
    assert not opt.is_perturbed and opt.num_steps == 1


def test_sharpness_between_perturb_and_restore_says_to_call_it_after_restore(one_thread):
    model = named_model()
    opt = wrap(model, "explicit")
    data = batches(2)
    with opt.perturbed():
        with pytest.raises(RuntimeError, match=r"'encoder' is perturbed.*after opt\.restore"):
            flatopt.sharpness(model, mse(model), data, sigma=0.1, samples=2)
        assert opt.is_perturbed
        mse(model)(data[0]).backward()
    opt.step()
    assert opt.num_steps == 1
