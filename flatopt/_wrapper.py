"""The ``torch.optim.Optimizer`` plumbing that flatopt's wrappers share.

A wrapper is an ``Optimizer`` whose ``param_groups``, ``state`` and ``defaults`` are the wrapped
optimizer's, shared rather than copied, so LR schedulers, GradScaler and frameworks that read
them work unchanged; its own hooks (step, state dict, load) run as on any optimizer.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["Wrapper"]


class Wrapper(torch.optim.Optimizer):
    """Shares the wrapped optimizer's state; subclasses call `_wrap` in their ``__init__``."""

    _inner: torch.optim.Optimizer

    def _wrap(self, optimizer: torch.optim.Optimizer) -> None:
        """Hold ``optimizer`` and set up the Optimizer plumbing, without registering the
        parameters a second time (``Optimizer.__init__`` is not called)."""
        self._inner = optimizer
        self._optimizer_step_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict = OrderedDict()
        self._optimizer_state_dict_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_state_dict_post_hooks: OrderedDict = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: OrderedDict = OrderedDict()
        self._patch_step_function()

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The wrapped optimizer.

        flatopt itself reads it as ``_inner``: a framework wrapper that subclasses the
        wrapper may define its own ``optimizer`` (LightningOptimizer does).
        """
        return self._inner

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self._inner.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self._inner.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self._inner.state

    @state.setter
    def state(self, value: Any) -> None:
        self._inner.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self._inner.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self._inner.defaults = value

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forward to the wrapped optimizer's ``zero_grad``."""
        self._inner.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Forward to the wrapped optimizer's ``add_param_group``."""
        self._inner.add_param_group(param_group)

    def _state_dict_with(self, key: str, own: Any) -> dict[str, Any]:
        """The wrapped optimizer's state dict with ``own`` under ``key``, the state-dict
        hooks run as on any optimizer: pre-hooks first, post-hooks on the whole dict."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        sd = self._inner.state_dict()
        sd[key] = own() if callable(own) else own
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def _check_mapping(self, state_dict: Any, what: str) -> dict[str, Any]:
        if not isinstance(state_dict, Mapping):
            raise TypeError(
                f"{what} must be a dict, got {type(state_dict).__name__}. Pass what "
                f"{type(self).__name__}.state_dict() returned (e.g. "
                "torch.load(path)['optimizer'])."
            )
        return dict(state_dict)  # a shallow copy, as torch.optim.Optimizer makes

    def _to_load(self, state_dict: Any) -> dict[str, Any]:
        """What `load_state_dict` loads: a checked shallow copy, after the load pre-hooks (each
        may return a replacement)."""
        state_dict = self._check_mapping(state_dict, "state_dict")
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = self._check_mapping(result, "A load_state_dict pre-hook's result")
        return state_dict

    def _load_inner(self, state_dict: Mapping[str, Any], key: str) -> None:
        """Load all of ``state_dict`` but the wrapper's own ``key`` into the wrapped optimizer,
        all or nothing: on an error its previous state is put back."""
        inner = {name: value for name, value in state_dict.items() if name != key}
        before = self._inner.state_dict()
        try:
            self._inner.load_state_dict(inner)
        except BaseException:
            with contextlib.suppress(Exception):  # put the old state back, then re-raise
                self._inner.load_state_dict(before)
            raise
