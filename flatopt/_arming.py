"""Arming: one live perturbation of a set of sites, and the one way to take it off.

An `Arming` puts a `_Swap` on every module that reads one of its sites; while it is armed the
modules' forwards see W + P, and `Arming.disarm` removes every trace. The module layout, for a
newcomer: `flatopt._sites` (which weights), `flatopt._hooks` (the hooks on each module),
`flatopt._swap` (one call's W + P, its saved-tensor tokens and the `Perturbation` protocol),
`flatopt._generators` (generators and the parallel CPU draw), and this file. The laws that
fill P live with their methods: `flatopt._flat` (Flat-LoRA) and `flatopt.bilora`. The names
tests and other modules import from here are re-exported.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ._generators import Generators, _parallel
from ._hooks import (
    _PostHook,
    _PreHook,
    _Slot,
    _unwind,
    drop_hooks,
    find_slot,
    guard,
    guard_while_armed,
    outside_backward,
    remove_hooks,
    root_hook,
)
from ._sites import Reader, Site, build_sites
from ._swap import Law, Perturbation, _Swap

__all__ = [
    "Arming",
    "Generators",
    "Reader",
    "Site",
    "_PostHook",
    "_PreHook",
    "_Slot",
    "_parallel",
    "build_sites",
    "drop_hooks",
    "find_slot",
    "outside_backward",
    "remove_hooks",
    "root_hook",
]


class Arming:
    """The live perturbation of a set of sites; `disarm` removes every trace of it.

    ``law`` (a `flatopt._swap.Law`: Flat-LoRA's noise, Bi-LoRA's auxiliary module) gives each
    site's P at the first forward that reads it, from the tensor that forward reads (the whole,
    unsharded weight under FSDP2); the arming keeps it for every later call and backward.
    """

    def __init__(self, sites: Sequence[Site], law: Law, auto: bool = False):
        self.law = law
        self.auto = auto
        self.calls = 0  # target forwards that ran perturbed
        self._perturbations: dict[int, Perturbation] = {}
        self._swaps: list[tuple[_Slot, str, _Swap]] = []
        try:
            for site in sites:
                for reader in site.readers:
                    slot, name = reader.slot, reader.target.param_name
                    if not slot.installed:
                        raise RuntimeError(
                            f"flatopt.remove_hooks() took the hooks off {reader.name!r}; build a "
                            "new wrapper to perturb this model again."
                        )
                    if name in slot.swaps:
                        raise RuntimeError(
                            f"{site.name!r} is already perturbed by another flatopt wrapper or "
                            "sharpness() call; restore that one first."
                        )
                    swap = slot.swaps[name] = _Swap(self, site, reader)
                    self._swaps.append((slot, name, swap))
                    guard(slot, reader.target.module)
        except BaseException:
            self.disarm()
            raise
        self.size = len(self._swaps)  # how many (module, weight) pairs were armed

    def perturbation(self, site: Site, weight: Tensor, unwrap: bool = False) -> Perturbation:
        perturbation = self._perturbations.get(site.index)
        if perturbation is None:
            perturbation = self.law.perturbation(site, weight, unwrap)
            self._perturbations[site.index] = perturbation
        return perturbation

    def disarm(self) -> None:
        swaps, self._swaps = self._swaps, []
        slots: dict[int, tuple[_Slot, nn.Module]] = {}
        for slot, name, swap in swaps:
            if slot.swaps.get(name) is swap:
                del slot.swaps[name]
            slots.setdefault(id(slot), (slot, swap.reader.target.module))
        for slot, module in slots.values():
            _unwind(slot)
            guard_while_armed(slot, module)
