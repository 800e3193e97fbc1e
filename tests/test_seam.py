"""The perturbation seam: any `flatopt._swap.Perturbation` rides the same hooks, tokens and
exactness as Flat-LoRA's noise. Checked with a stored P (`Dense`, a gradient-derived P)."""

import torch
from helpers import assert_nothing_armed, assert_untouched, build, snapshot

from flatopt._arming import Arming, build_sites
from flatopt._swap import Dense
from flatopt.adapters import find_targets
from flatopt.reference import perturbed_forward

TOLERANCE = {"rtol": 1e-10, "atol": 1e-12}  # fp64: W + P rounded once on both paths


class _StoredLaw:
    """A law that hands each site a stored P (one per site index)."""

    train_only = False

    def __init__(self, tensors):
        self.tensors = tensors

    def perturbation(self, site, weight, unwrap=False):
        return Dense(self.tensors[site.index])


def test_a_stored_perturbation_matches_the_reference_and_leaves_w_untouched():
    model, x, adapters = build("lora", torch.float64, 6, 5, 2, seed=0)
    found = find_targets(model, adapters)
    sites = build_sites(found, [model])
    names = {id(p): n for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(3)
    stored = [
        0.1 * torch.randn(site.readers[0].read().shape, generator=g, dtype=torch.float64)
        for site in sites
    ]
    by_name = {names[id(site.readers[0].read())]: p for site, p in zip(sites, stored)}
    trainable = [p for p in model.parameters() if p.requires_grad]

    expected = perturbed_forward(model, by_name, x)
    expected_grads = torch.autograd.grad(expected.square().sum(), trainable)

    before = snapshot(model)
    arming = Arming(sites, _StoredLaw(stored))
    try:
        out = model(x)
        grads = torch.autograd.grad(out.square().sum(), trainable)
    finally:
        arming.disarm()
    assert arming.calls == len(sites)
    torch.testing.assert_close(out, expected, **TOLERANCE)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, **TOLERANCE)
    assert_untouched(model, before)
    assert_nothing_armed(model)
