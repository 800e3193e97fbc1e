"""``LoRASAM``: sharpness-aware minimization on the trainable parameters (the LoRA factors).

SAM (Foret et al., 2021) trains on the worst nearby loss: it takes the gradient g at θ, moves
to θ + ε with ε = ρ·g/‖g‖, takes the gradient there, goes back to θ and steps with that second
gradient. Applied to the LoRA factors only (LoRA-SAM), θ and ε are as small as the factors, so
keeping an exact copy of θ for the way back costs what the factors cost. Flat-LoRA
(`flatopt.FlatPerturb`) is the one-pass alternative; this is the two-pass baseline it is
measured against.

Caveats, up front:

- Two forward and backward passes per step, so it needs ``step(closure)``. Trainers that call
  ``optimizer.step()`` with no closure (HF Trainer, TRL, an Accelerate loop) cannot run it:
  ``step()`` raises rather than silently take a one-pass step.
- Gradient accumulation must happen inside the closure. Micro-batches backpropagated before
  ``step(closure)`` are discarded (with a warning): SAM's second pass would otherwise see
  only the last micro-batch at θ + ε.
- ``GradScaler`` (fp16 AMP) does not accept closures; use bf16 autocast inside the closure.
- Perturbed are the optimizer's parameters that get a gradient; frozen weights are never
  touched. Dropout draws afresh in each pass, as in every SAM implementation.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ._wrapper import Wrapper
from .perturb import FlatPerturb, check_number

__all__ = ["LoRASAM", "sam_perturbation"]


def _check_rho(rho: Any, name: str = "rho") -> float:
    """``rho`` as a Python float: a real number (NumPy's too) > 0 and finite, not a bool."""
    hint = (
        " (0.05 is SAM's usual radius); for training without SAM, step the wrapped optimizer "
        "itself."
    )
    return check_number(rho, name, what="rho", minimum="> 0", hint=hint)


def _check_adaptive(adaptive: Any, name: str = "adaptive") -> bool:
    if not isinstance(adaptive, bool):
        raise TypeError(f"Invalid {name}: {adaptive!r}. Pass True or False.")
    return adaptive


@torch.no_grad()
def sam_perturbation(
    params: list[Tensor], grads: list[Tensor], rho: float, adaptive: bool = False
) -> list[Tensor]:
    """Return SAM's ε for each parameter: ρ·g/‖g‖ (ASAM: ρ·θ²⊙g/‖|θ|⊙g‖), ε = 0 when ‖g‖ = 0.

    ‖·‖ is the global 2-norm over all the given gradients, accumulated in fp32 (fp64 when any
    gradient is fp64) on the first parameter's device. Nothing is read back to the host. A
    non-finite gradient gives a non-finite ε, as it would give a non-finite step.

    Example:
        >>> p, g = [torch.zeros(2)], [torch.tensor([3.0, 4.0])]
        >>> sam_perturbation(p, g, rho=0.5)
        [tensor([0.3000, 0.4000])]
    """
    if not grads:
        return []
    device = params[0].device
    acc = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
    scaled = [p.abs() * g if adaptive else g for p, g in zip(params, grads)]
    norms = torch._foreach_norm(scaled, 2, dtype=acc)  # one fused kernel per device and dtype
    norm = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))
    scale = torch.where(norm > 0, rho / norm, torch.zeros_like(norm))
    return [
        (p.square() * g if adaptive else g) * scale.to(device=g.device, dtype=g.dtype)
        for p, g in zip(params, grads)
    ]


class _Settings:
    """Everything a LoRASAM changes after it is built, behind one reference.

    Framework wrappers that copy an optimizer's ``__dict__`` (Lightning's LightningOptimizer)
    then share this object with the LoRASAM instead of forking it.
    """

    def __init__(self, rho: float, adaptive: bool):
        self.rho = rho
        self.adaptive = adaptive
        self.left: dict[int, tuple[int, int]] = {}  # id(param) -> (id(grad), grad._version)
        self.warned: set[str] = set()

    def warn_once(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            warnings.warn(message, stacklevel=5)  # warn_once, _clear_grads, step, hook wrapper


class LoRASAM(Wrapper):
    """Wrap ``optimizer`` so that each step is SAM's: a step with the gradient at θ + ε.

    ``step(closure)`` runs the closure (forward, backward, return the loss) twice:

    1. at θ, giving g; each parameter with a gradient is copied, then moved to θ + ε with
       ε = ρ·g/‖g‖ (the global 2-norm over all of them; ε = 0 when ‖g‖ = 0);
    2. at θ + ε, giving g'; every perturbed parameter is then restored from its copy, bitwise
       (``torch.equal`` to θ, the same storage: never by subtracting ε);

    and then the wrapped optimizer's ``step()`` uses g'. Gradients are cleared before each
    pass, so the closure need not zero them. θ is only what the optimizer holds: pass it the
    trainable parameters (the LoRA factors, as `flatopt.lora.add_lora` leaves them); frozen
    weights are never read or written.

    The wrapper is a ``torch.optim.Optimizer`` whose ``param_groups``, ``state`` and
    ``defaults`` are the wrapped optimizer's, so LR schedulers work on it.

    Args:
        optimizer: any ``torch.optim.Optimizer`` over the trainable parameters.
        model: optional. SAM needs only the optimizer's parameters; the model is read once,
            to warn when the optimizer holds none of its trainable parameters (built over
            another model, or before a copy), and is not kept. It is accepted so that
            ``LoRASAM(inner, model, ...)`` and ``FlatPerturb(inner, model, ...)`` swap for one
            another.
        rho: ρ, the radius of the perturbation: a real number > 0.
        adaptive: ASAM's element-wise scaled perturbation, ε = ρ·θ²⊙g/‖|θ|⊙g‖ (as
            davda54/sam). A factor that starts at zero (LoRA's B) is then not perturbed
            until it moves.

    Raises:
        TypeError: ``optimizer`` is not an Optimizer (or already a LoRASAM or FlatPerturb),
            ``model`` is not a module, or an argument has the wrong type.
        ValueError: ``rho`` is not a finite number > 0.

    Example:
        >>> from flatopt.lora import add_lora
        >>> net = add_lora(torch.nn.Sequential(torch.nn.Linear(8, 8)), ["0"], rank=2)
        >>> inner = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad])
        >>> opt = LoRASAM(inner, net, rho=0.05)
        >>> x, y = torch.randn(4, 8), torch.randn(4, 8)
        >>> def closure():
        ...     loss = torch.nn.functional.mse_loss(net(x), y)
        ...     loss.backward()
        ...     return loss
        >>> loss = opt.step(closure)  # the loss at θ, before the step
        >>> opt.zero_grad()
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: Optional[nn.Module] = None,
        *,
        rho: float = 0.05,
        adaptive: bool = False,
    ):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}. "
                "Build one over the trainable parameters, e.g. torch.optim.AdamW(params)."
            )
        if isinstance(optimizer, LoRASAM):
            raise TypeError("optimizer is already a LoRASAM; wrap the inner optimizer once.")
        if isinstance(optimizer, FlatPerturb):
            raise TypeError(
                "optimizer is a FlatPerturb; LoRASAM wraps the base optimizer itself "
                "(LoRASAM(torch.optim.AdamW(params), ...)). Flat-LoRA and LoRA-SAM are "
                "alternatives: choose one."
            )
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(
                f"model must be an nn.Module or None, got {type(model).__name__}. LoRASAM needs "
                "only the optimizer's parameters; leave model out if in doubt."
            )
        self._sam = _Settings(_check_rho(rho), _check_adaptive(adaptive))
        self._wrap(optimizer)
        if model is not None:
            self._warn_unheld(model)

    def _warn_unheld(self, model: nn.Module) -> None:
        held = {id(p) for group in self._inner.param_groups for p in group["params"]}
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        if trainable and not any(
            id(p) in held for _, p in model.named_parameters() if p.requires_grad
        ):
            warnings.warn(
                f"The optimizer holds none of the model's trainable parameters "
                f"({trainable[:4]}{', ...' if len(trainable) > 4 else ''}), so LoRASAM would "
                "perturb and train nothing of it. Build the optimizer over this model's "
                "trainable parameters, e.g. torch.optim.AdamW([p for p in "
                "model.parameters() if p.requires_grad]).",
                stacklevel=3,
            )

    @property
    def rho(self) -> float:
        """ρ, the radius of the perturbation."""
        return self._sam.rho

    @property
    def adaptive(self) -> bool:
        """Whether the perturbation is ASAM's element-wise scaled one."""
        return self._sam.adaptive

    # -- the step ---------------------------------------------------------------------------

    def _params(self) -> list[Tensor]:
        return [p for group in self._inner.param_groups for p in group["params"]]

    def _clear_grads(self, params: list[Tensor]) -> None:
        """Clear gradients before the first pass; warn once if a backward ran since the last
        step (micro-batches accumulated outside the closure would be lost)."""
        left = self._sam.left
        for p in params:
            grad = p.grad
            if grad is None:
                continue
            if left.get(id(p)) != (id(grad), grad._version):
                self._sam.warn_once(
                    "outside",
                    "LoRASAM.step(closure) found gradients computed since the previous step "
                    "(micro-batches accumulated outside the closure, or a backward before "
                    "step(closure)?) and discarded them: SAM's two passes each compute the "
                    "step's whole gradient in the closure. Run every micro-batch inside the "
                    "closure (gradient accumulation belongs there), and zero gradients with "
                    "set_to_none=True.",
                )
                break
        self._inner.zero_grad(set_to_none=True)

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:  # type: ignore[override]
        """Take one SAM step: closure() at θ, closure() at θ + ε, restore θ, inner step.

        Both closure calls run with gradients enabled, whatever the caller's grad mode.
        When the second call raises, θ is restored before the exception propagates and the
        inner step is not taken.

        Returns:
            The first closure's loss: the loss at θ, before the step.

        Raises:
            RuntimeError: no closure was given.
        """
        if closure is None:
            raise RuntimeError(
                "LoRASAM.step() needs a closure: SAM evaluates the loss twice per step (at θ "
                "and at θ + ε), which only a closure can do. Call opt.step(closure) with a "
                "closure that runs forward and backward and returns the loss: a plain loop "
                "does, and so do PyTorch Lightning's automatic optimization and "
                "manual_backward loops that pass one. HF Trainer, TRL and Accelerate's loop "
                "call step() without a closure: use flatopt.FlatPerturb(..., auto=True) "
                "there, one pass per step."
            )
        params = self._params()
        self._clear_grads(params)
        with torch.enable_grad():
            loss = closure()
        perturbed = [p for p in params if p.grad is not None]
        grads = [p.grad for p in perturbed]
        with torch.no_grad():
            saved = [p.detach().clone() for p in perturbed]
            epsilon = sam_perturbation(perturbed, grads, self._sam.rho, self._sam.adaptive)
        self._inner.zero_grad(set_to_none=True)
        try:
            if perturbed:
                with torch.no_grad():
                    torch._foreach_add_(perturbed, epsilon)  # θ + ε, in place on the factors
            del epsilon
            with torch.enable_grad():
                closure()
        finally:
            if perturbed:
                with torch.no_grad():
                    torch._foreach_copy_(perturbed, saved)  # exact: a copy of θ, never θ + ε − ε
        self._inner.step()
        self._sam.left.clear()
        for p in params:
            if p.grad is not None:
                self._sam.left[id(p)] = (id(p.grad), p.grad._version)
        return loss

    # -- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict plus a ``"lora_sam"`` entry (ρ and adaptive).

        LoRASAM keeps no other state, so loading it into a fresh wrapper continues the run bit
        for bit. State-dict hooks run as on any ``torch.optim.Optimizer``.
        """
        return self._state_dict_with(
            "lora_sam", {"rho": self._sam.rho, "adaptive": self._sam.adaptive}
        )

    @staticmethod
    def _check_own(own: Any) -> tuple[float, bool]:
        if not isinstance(own, Mapping):
            raise TypeError(
                f"state_dict['lora_sam'] must be a dict, got {type(own).__name__}. Load a state "
                "dict written by LoRASAM.state_dict()."
            )
        for key in ("rho", "adaptive"):
            if key not in own:
                raise ValueError(
                    f"state_dict['lora_sam'] has no {key!r} entry; was it written by "
                    "LoRASAM.state_dict()? Nothing was loaded."
                )
        rho = _check_rho(own["rho"], name="state_dict['lora_sam']['rho']")
        adaptive = _check_adaptive(own["adaptive"], name="state_dict['lora_sam']['adaptive']")
        return rho, adaptive

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a `state_dict`; the checkpoint's ρ and adaptive replace the current ones.

        The ``"lora_sam"`` entry is checked first, and loading is atomic: on any error nothing
        changes, the wrapped optimizer included. When the checkpoint's settings differ from
        this wrapper's, it warns, naming them. A state dict of the bare wrapped optimizer (no
        ``"lora_sam"`` entry) loads the optimizer state only, and warns.

        Raises:
            TypeError: ``state_dict`` or its entry is not a dict, or an entry has the wrong type.
            ValueError: a bad or missing entry.
        """
        state_dict = self._to_load(state_dict)
        own = state_dict.get("lora_sam")
        settings = self._check_own(own) if own is not None else None
        self._load_inner(state_dict, "lora_sam")
        if settings is None:
            warnings.warn(
                "state_dict has no 'lora_sam' entry (written by the bare optimizer?): loaded "
                f"the optimizer state; rho stays {self._sam.rho:g}.",
                stacklevel=2,
            )
        else:
            rho, adaptive = settings
            changed = [
                f"{name}: this LoRASAM's {ours!r}, the checkpoint's {theirs!r}"
                for name, ours, theirs in (
                    ("rho", self._sam.rho, rho),
                    ("adaptive", self._sam.adaptive, adaptive),
                )
                if ours != theirs
            ]
            if changed:
                warnings.warn(
                    f"load_state_dict() replaced LoRASAM settings ({'; '.join(changed)}): the "
                    "checkpoint's win.",
                    stacklevel=2,
                )
            self._sam.rho, self._sam.adaptive = rho, adaptive
        self._sam.left.clear()
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    # -- copies and pickles ---------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        return {"optimizer": self._inner, "rho": self._sam.rho, "adaptive": self._sam.adaptive}

    def __setstate__(self, saved: dict[str, Any]) -> None:
        self.__init__(saved["optimizer"], rho=saved["rho"], adaptive=saved["adaptive"])

    def __repr__(self) -> str:
        inner = "\n".join("    " + line for line in repr(self._inner).splitlines())
        return (
            f"LoRASAM (\n"
            f"  rho: {self._sam.rho:g}, adaptive: {self._sam.adaptive}\n"
            f"  optimizer:\n{inner}\n)"
        )
