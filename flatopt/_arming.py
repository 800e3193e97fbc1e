"""Arming: one live perturbation of a set of sites, and the one way to take it off.

An `Arming` puts a `_Swap` on every module that reads one of its sites; while it is armed the
modules' forwards see W + P, and `Arming.disarm` removes every trace. The module layout, for a
newcomer: `flatopt._sites` (which weights), `flatopt._hooks` (the hooks on each module),
`flatopt._swap` (one call's W + P and its saved-tensor tokens), `flatopt._generators`
(generators and the parallel CPU draw), and this file. The names tests and other modules
import from here are re-exported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

from ._generators import Generators, _parallel
from ._hooks import (
    _PostHook,
    _PreHook,
    _Slot,
    _unwind,
    drop_hooks,
    find_slot,
    outside_backward,
    remove_hooks,
    root_hook,
)
from ._sites import Reader, Site, build_sites
from ._swap import Noise, _Swap

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

    Each site's std is computed at the first forward that reads it (from the tensor that
    forward reads: the whole, unsharded weight under FSDP) and kept in ``stds``, which the
    caller may share between armings (one std per optimizer step).
    """

    def __init__(
        self,
        sites: Sequence[Site],
        sigma: float,
        seed_of: Callable[[int], int],
        stds: dict[int, Tensor],
        generators: Generators,
        auto: bool = False,
    ):
        self.sigma = sigma
        self.auto = auto
        self.calls = 0  # target forwards that ran perturbed
        self._seed_of = seed_of
        self._stds = stds
        self._generators = generators
        self._noises: dict[int, Noise] = {}
        self._swaps: list[tuple[_Slot, str, _Swap]] = []
        try:
            for site in sites:
                for reader in site.readers:
                    slot, name = reader.slot, reader.target.param_name
                    if not slot.installed:
                        raise RuntimeError(
                            f"flatopt.remove_hooks() took the hooks off {reader.name!r}; build a "
                            "new FlatPerturb to perturb this model again."
                        )
                    if name in slot.swaps:
                        raise RuntimeError(
                            f"{site.name!r} is already perturbed by another FlatPerturb or "
                            "sharpness() call; restore that one first."
                        )
                    swap = slot.swaps[name] = _Swap(self, site, reader)
                    self._swaps.append((slot, name, swap))
        except BaseException:
            self.disarm()
            raise
        self.size = len(self._swaps)  # how many (module, weight) pairs were armed

    def noise(self, site: Site, weight: Tensor, unwrap: bool = False) -> Noise:
        noise = self._noises.get(site.index)
        if noise is None:
            std = self._stds.get(site.index)
            if std is None:
                std = self._stds[site.index] = site.std(self.sigma, weight, unwrap)
            generator = self._generators(weight.device)
            keep = site.readers[0].keep
            seed = self._seed_of(site.index)
            noise = Noise(std, seed, generator, weight, site.transposed, keep)
            self._noises[site.index] = noise
        return noise

    def disarm(self) -> None:
        swaps, self._swaps = self._swaps, []
        slots = []
        for slot, name, swap in swaps:
            if slot.swaps.get(name) is swap:
                del slot.swaps[name]
            if slot not in slots:
                slots.append(slot)
        for slot in slots:
            _unwind(slot)
