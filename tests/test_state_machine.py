"""A stateful fuzz test: random sequences of everything a training loop (or a trainer) does.

Hypothesis drives perturb, restore, step (with and without a closure), zero_grad, state_dict,
load_state_dict (valid and corrupt), forwards in train and eval mode and under no_grad,
exceptions inside a target's forward, between layers and in backward, and switches between
explicit and drop-in (``auto=True``) mode. After every rule the frozen weights are bitwise what
they were (value, ``_version``, storage, the Parameter object itself) and, outside an armed
window, the model computes with W.
"""

import copy
import warnings

import torch
import torch.nn.functional as F
from helpers import assert_untouched, bits_equal, build, frozen_names, lora_forward, snapshot
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import flatopt
from flatopt._arming import find_slot


class Boom(Exception):
    """The exception the machine throws inside forward and backward."""


class FlatPerturbMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.model = build("lora", torch.float32, 8, 6, 2, 0)[0]
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)
        self.start = snapshot(self.model)
        self.frozen = frozen_names(self.model)
        self.weights = [self.model[i].base.weight for i in (0, 2)]
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.inner = torch.optim.AdamW(trainable, lr=0.01)
        self.fail = None  # where the next forward raises: "target", "between" or None
        self.model[1].register_forward_hook(self._raise_between)
        self.saved = []
        self.steps = 0
        self.armed = False  # explicitly armed by perturb()
        self.opt = None

    def _raise_between(self, module, args, output):
        if self.fail == "between":
            raise Boom("between the layers")

    def _raise_in_target(self, module, args):
        if self.fail == "target":
            raise Boom("inside a target, with W + ε in it")

    def _build(self, auto, resample):
        self.opt = flatopt.FlatPerturb(
            self.inner,
            self.model,
            sigma=0.3,
            schedule="linear",
            total_steps=3,
            seed=5,
            resample=resample,
            auto=auto,
        )
        # Registered after flatopt's pre-hook: it raises with W + ε already in the module.
        self.model[2].base.register_forward_pre_hook(self._raise_in_target)

    @initialize(auto=st.booleans(), resample=st.sampled_from(["step", "call"]))
    def build(self, auto, resample):
        self._build(auto, resample)
        self.saved.append(copy.deepcopy(self.opt.state_dict()))

    # -- helpers ------------------------------------------------------------------------------

    @property
    def auto(self):
        return self.opt.auto

    def _sees_noise(self, training):
        """Whether a forward now sees W + ε, by the contract."""
        if self.opt.sigma == 0:
            return False
        return self.armed if not self.auto else training

    def _forward(self):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self.model(self.x)

    # -- rules -------------------------------------------------------------------------------

    @precondition(lambda self: not self.auto and not self.armed)
    @rule()
    def perturb(self):
        self.opt.perturb()
        self.armed = True

    @precondition(lambda self: not self.auto and self.armed)
    @rule()
    def perturb_twice(self):
        try:
            self.opt.perturb()
        except RuntimeError as error:
            assert "twice" in str(error)
        else:
            raise AssertionError("perturb() twice did not raise")
        assert self.opt.is_perturbed

    @precondition(lambda self: not self.auto)
    @rule()
    def restore(self):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                self.opt.restore()
            except RuntimeError:
                assert not self.armed
            else:
                assert self.armed
        self.armed = False

    @precondition(lambda self: self.auto)
    @rule()
    def perturb_or_restore_in_auto_mode(self):
        for call in (self.opt.perturb, self.opt.restore):
            try:
                call()
            except RuntimeError as error:
                assert "auto=True" in str(error)
            else:
                raise AssertionError(f"{call.__name__}() in auto mode did not raise")

    @rule(training=st.booleans(), no_grad=st.booleans(), backward=st.booleans())
    def forward(self, training, no_grad, backward):
        self.model.train(training)
        with torch.no_grad():
            clean = lora_forward(self.model, self.x)
        if no_grad:
            with torch.no_grad():
                out = self._forward()
        else:
            out = self._forward()
            if backward:
                F.mse_loss(out, self.y).backward()
        if self._sees_noise(training):
            assert not torch.equal(out.detach(), clean)
        else:
            assert bits_equal(out.detach(), clean)

    @rule(where=st.sampled_from(["target", "between"]), training=st.booleans())
    def forward_raises(self, where, training):
        self.model.train(training)
        self.fail = where
        try:
            self._forward()
        except Boom:
            pass
        else:
            raise AssertionError("the forward did not raise")
        finally:
            self.fail = None

    @rule(training=st.booleans())
    def backward_raises(self, training):
        self.model.train(training)
        out = self._forward()

        def boom(grad):
            raise Boom("in backward")

        out.register_hook(boom)
        try:
            F.mse_loss(out, self.y).backward()
        except Boom:
            pass
        else:
            raise AssertionError("the backward did not raise")

    @rule(closure=st.booleans())
    def step(self, closure):
        def loss():
            self.inner.zero_grad()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                value = F.mse_loss(self.model(self.x), self.y)
            value.backward()
            return value

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                self.opt.step(loss if closure else None)
            except RuntimeError as error:
                assert self.armed and "while the perturbation is armed" in str(error)
                self.armed = False
                return
        assert not self.armed
        self.steps += 1

    @precondition(lambda self: not self.armed)
    @rule()
    def step_with_a_failing_closure(self):
        def closure():
            self.model(self.x)
            raise Boom("in the closure")

        try:
            self.opt.step(closure)
        except Boom:
            pass
        else:
            raise AssertionError("the closure did not raise")
        assert not self.opt.is_perturbed

    @rule()
    def zero_grad(self):
        self.opt.zero_grad()

    @rule()
    def state_dict(self):
        self.saved.append(copy.deepcopy(self.opt.state_dict()))

    @rule(index=st.integers(0, 1000), corrupt=st.booleans())
    def load_state_dict(self, index, corrupt):
        saved = copy.deepcopy(self.saved[index % len(self.saved)])
        if corrupt:
            saved["flatopt"]["sigma"] = float("nan")
        perturbed = self.opt.is_perturbed
        try:
            self.opt.load_state_dict(saved)
        except RuntimeError as error:
            assert self.armed and "while perturbed" in str(error)
        except ValueError as error:
            assert corrupt and "sigma" in str(error)
        else:
            assert not corrupt and not self.armed
            assert not self.opt.is_perturbed
            self.steps = saved["flatopt"]["num_steps"]
            return
        assert self.opt.is_perturbed == perturbed  # a refused load changes nothing

    @rule(training=st.booleans())
    def set_mode(self, training):
        self.model.train(training)

    @precondition(lambda self: not self.opt.is_perturbed)
    @rule()
    def toggle_auto(self):
        saved = self.opt.state_dict()
        resample = saved["flatopt"]["resample"]
        assert flatopt.remove_hooks(self.model) == 2
        self._build(not self.auto, resample)
        self.opt.load_state_dict(saved)

    # -- invariants --------------------------------------------------------------------------

    @invariant()
    def frozen_weights_are_bitwise_unchanged(self):
        if self.opt is None:
            return
        assert_untouched(self.model, self.start, self.frozen)
        for index, weight in zip((0, 2), self.weights):
            assert self.model[index].base._parameters["weight"] is weight
        assert self.opt.num_steps == self.steps

    @invariant()
    def clean_outside_an_armed_window(self):
        if self.opt is None:
            return
        assert self.opt.is_perturbed == self.armed or self.auto
        assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
        for module in self.model.modules():
            slot = find_slot(module)
            if slot is not None:
                assert not slot.frames  # no call in flight
                if not self.opt.is_perturbed:
                    assert not slot.swaps
        if self.armed:
            return  # explicitly armed: every forward sees W + ε, by design
        training = self.model.training
        self.model.eval()  # evaluation sees W, armed under auto=True or not
        try:
            with torch.no_grad():
                assert bits_equal(self._forward(), lora_forward(self.model, self.x))
        finally:
            self.model.train(training)


FlatPerturbMachine.TestCase.settings = settings(stateful_step_count=25)  # on the loaded profile
test_flatperturb_state_machine = FlatPerturbMachine.TestCase
