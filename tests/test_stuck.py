"""Never silently stuck: when something other than FlatPerturb trains the model, flatopt's step
count (and so the noise schedule) never moves. flatopt warns once, naming the fix, and the
usual loops never trigger that warning. And a step() inside ``with opt.perturbed():`` raises
the error that names the fix, not one about the block's own restore."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import build

import flatopt

STUCK = "counted no step"


def _model(seed: int = 0):
    model, x, _ = build("lora", torch.float32, 6, 5, 2, seed=seed)
    return model, x


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _loss(model, x):
    return model(x).square().mean()


def _wrap(model, inner=None, **kwargs):
    inner = inner or torch.optim.AdamW(_trainable(model), lr=1e-2)
    kwargs.setdefault("schedule", "constant")
    return flatopt.FlatPerturb(inner, model, sigma=0.1, seed=0, **kwargs)


def _stuck(caught) -> list[str]:
    return [str(w.message) for w in caught if STUCK in str(w.message)]


def _run(loop) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loop()
    return _stuck(caught)


# -- another optimizer trains the model -----------------------------------------------------


@pytest.mark.parametrize("auto", [False, True])
def test_a_model_trained_by_another_optimizer_warns_once_naming_the_fix(auto):
    model, x = _model()
    opt = _wrap(model, auto=auto)
    other = torch.optim.SGD(_trainable(model), lr=0.1)  # e.g. DeepSpeed's, built from its config

    def loop():
        for _ in range(5):
            if auto:
                _loss(model, x).backward()
            else:
                with opt.perturbed():
                    _loss(model, x).backward()
            other.step()  # FlatPerturb.step() never runs
            other.zero_grad()

    found = _run(loop)
    assert len(found) == 1, found
    assert "num_steps stays 0" in found[0]
    assert "opt.step()" in found[0] and "trainer_optimizer" in found[0]
    assert '"optimizer" section' in found[0]
    assert opt.num_steps == 0


def test_one_edit_of_the_weights_between_steps_does_not_warn():
    """A user loading weights once between two forwards is not a stuck run."""
    model, x = _model()
    opt = _wrap(model)
    saved = copy.deepcopy(model.state_dict())

    def loop():
        with opt.perturbed():
            _loss(model, x).backward()
        model.load_state_dict(saved)  # bumps every version counter, no step
        for _ in range(3):
            with opt.perturbed():
                _loss(model, x).backward()
            opt.step()
            opt.zero_grad()

    assert _run(loop) == []


def test_eval_forwards_are_not_watched():
    model, x = _model()
    _wrap(model)
    other = torch.optim.SGD(_trainable(model), lr=0.1)
    model.eval()

    def loop():
        for _ in range(4):
            _loss(model, x).backward()
            other.step()

    assert _run(loop) == []


# -- the usual loops never warn ---------------------------------------------------------------


def _explicit(model, x, opt):
    for _ in range(4):
        with opt.perturbed():
            _loss(model, x).backward()
        opt.step()
        opt.zero_grad()


def _auto(model, x, opt):
    for _ in range(4):
        _loss(model, x).backward()
        opt.step()
        opt.zero_grad()


def _closure(model, x, opt):
    for _ in range(4):

        def closure():
            opt.zero_grad()
            loss = _loss(model, x)
            loss.backward()
            return loss

        opt.step(closure)


def _accumulation(model, x, opt):
    for _ in range(4):
        for micro in x.split(2):
            with opt.perturbed():
                (_loss(model, micro) / 3).backward()
        opt.step()
        opt.zero_grad()


def _scheduler(model, x, opt):
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(4):
        with opt.perturbed():
            _loss(model, x).backward()
        opt.step()
        scheduler.step()
        opt.zero_grad()


def _grad_scaler(model, x, opt):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for _ in range(4):
        with opt.perturbed():
            scaler.scale(_loss(model, x)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()


def _inner_stepped(model, x, opt):
    """A framework handed the inner optimizer: flatopt counts its steps (and says so)."""
    for _ in range(4):
        _loss(model, x).backward()
        opt.optimizer.step()
        opt.optimizer.zero_grad()


LOOPS = {
    "explicit": (_explicit, {}),
    "auto": (_auto, {"auto": True}),
    "closure": (_closure, {}),
    "closure_auto": (_closure, {"auto": True}),
    "accumulation": (_accumulation, {}),
    "scheduler": (_scheduler, {}),
    "grad_scaler": (_grad_scaler, {}),
    "inner_stepped_auto": (_inner_stepped, {"auto": True}),
    "cosine_ramp": (_explicit, {"schedule": "cosine", "total_steps": 3}),
}


@pytest.mark.parametrize("name", list(LOOPS))
def test_the_usual_loops_never_warn_that_they_are_stuck(name):
    loop, kwargs = LOOPS[name]
    model, x = _model()
    opt = _wrap(model, **kwargs)
    before = [p.detach().clone() for p in _trainable(model)]
    assert _run(lambda: loop(model, x, opt)) == []
    assert opt.num_steps == 4
    assert any(not torch.equal(a, b) for a, b in zip(before, _trainable(model)))  # it trained


def test_lbfgs_re_evaluating_its_closure_inside_the_step_does_not_warn():
    """LBFGS moves the parameters between the closure's evaluations inside one step."""
    model, x = _model()
    inner = torch.optim.LBFGS(_trainable(model), lr=0.5, max_iter=4)
    opt = _wrap(model, inner=inner)

    def loop():
        for _ in range(3):

            def closure():
                opt.zero_grad()
                loss = F.mse_loss(model(x), torch.zeros(5, 3))
                loss.backward()
                return loss

            opt.step(closure)

    assert _run(loop) == []
    assert opt.num_steps == 3


def test_a_copied_model_carries_an_inert_watch():
    model, x = _model()
    _wrap(model)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        other = torch.optim.SGD(_trainable(twin), lr=0.1)

        def loop(twin=twin, other=other):
            for _ in range(4):
                _loss(twin, x).backward()
                other.step()

        assert _run(loop) == []  # the copy has no FlatPerturb: nothing to be stuck


def test_a_new_wrapper_on_the_same_model_replaces_the_watch():
    model, x = _model()
    _wrap(model)
    opt = _wrap(model, auto=True)  # takes the model over
    watches = [h for h in model._forward_pre_hooks.values() if type(h).__name__ == "_StuckWatch"]
    assert len(watches) == 1
    assert _run(lambda: _auto(model, x, opt)) == []


def test_step_inside_perturbed_raises_the_step_error_not_a_restore_error():
    model, x = _model()
    opt = _wrap(model)
    armed = r"step\(\) was called while the perturbation is armed"
    with pytest.raises(RuntimeError, match=armed), opt.perturbed():
        _loss(model, x).backward()
        opt.step()
    assert not opt.is_perturbed and opt.num_steps == 0
