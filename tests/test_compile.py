"""torch.compile: a compiled model trains under FlatPerturb with the exact round trip.

flatopt's hooks are installed when FlatPerturb is built and are excluded from compilation, so
torch.compile breaks the graph around each target layer and runs the noise eagerly.
"""

import copy

import pytest
import torch
from helpers import assert_untouched, build, frozen_names, snapshot

import flatopt


def _pair(device, seed=0):
    model, x, _ = build("lora", torch.float32, 16, 12, 2, seed=seed, device=device)
    twin = copy.deepcopy(model)
    wrappers = []
    for m in (model, twin):
        inner = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
        wrappers.append(flatopt.FlatPerturb(inner, m, sigma=0.2, schedule="constant", seed=3))
    return model, twin, x, wrappers


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_a_compiled_model_trains_like_the_eager_one_and_restores_exactly(backend, device):
    if backend == "inductor" and device == "cuda":
        pytest.importorskip("triton", reason="inductor compiles CUDA kernels with Triton")
    torch._dynamo.reset()
    eager, twin, x, (opt_eager, opt_compiled) = _pair(device)
    compiled = torch.compile(twin, backend=backend)
    start = snapshot(twin)
    clean = eager(x)
    for _ in range(3):
        outputs = []
        for model, opt in ((eager, opt_eager), (compiled, opt_compiled)):
            with opt.perturbed():
                out = model(x)
                out.square().mean().backward()
            opt.step()
            opt.zero_grad()
            outputs.append(out.detach())
        torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(outputs[0], clean, rtol=1e-3, atol=1e-4)
    for a, b in zip(eager.parameters(), twin.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert_untouched(twin, start, frozen_names(twin))
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-6)  # clean again


def test_a_model_compiled_and_run_before_flatperturb_existed_is_reported(device):
    torch._dynamo.reset()
    model, x, _ = build("lora", torch.float32, 8, 8, 2, seed=0, device=device)
    compiled = torch.compile(model, backend="aot_eager")
    compiled(x)  # compiled without flatopt's hooks: it will never see them
    inner = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    opt = flatopt.FlatPerturb(inner, model, schedule="constant", seed=0)
    warning = pytest.warns(UserWarning, match="build FlatPerturb before the first call")
    with warning, opt.perturbed():
        compiled(x).sum().backward()
