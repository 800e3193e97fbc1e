"""FlatPerturb under a real two-process DistributedDataParallel run: gloo on CPU, over the
loopback interface only.

One spawn trains the same model on both ranks (different data per rank), with gradient
accumulation under ``no_sync()``, once with ``rank_noise=True`` and once with ``False``. Each rank
also trains a twin by hand, all-reducing its local gradients explicitly, as a reference for what
DDP must produce. The tests below read what the ranks saved.
"""

import copy
import datetime
import math
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import bits_equal
from ranks import WORLD, process_group, spawn
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import flatopt
from flatopt.lora import LoRALinear, add_lora

pytestmark = [
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()),
        reason="needs torch.distributed with the gloo backend",
    ),
    pytest.mark.cpu_only(reason="gloo on CPU processes; one GPU cannot host two NCCL ranks"),
]

STEPS = 6
MICRO = 2  # micro-batches per optimizer step; all but the last run under no_sync()
SIGMA = 0.2
TOTAL_STEPS = 4
SEED = 11
TIMEOUT = datetime.timedelta(seconds=60)  # every rendezvous and collective
DEADLINE_S = 240  # the whole spawn; a stuck run is killed, never left hanging


def _model():
    """A LoRA MLP with a new, fully trained head (a dense target); identical on every rank."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.4)
    add_lora(model, ["0", "2"], rank=2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) * 0.3)
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.3)
    model[4].requires_grad_(True)
    return model


def _wrap(model, rank_noise):
    trainable = [p for p in model.parameters() if p.requires_grad]
    return flatopt.FlatPerturb(
        torch.optim.AdamW(trainable, lr=1e-2),
        model,
        sigma=SIGMA,
        schedule="cosine",
        total_steps=TOTAL_STEPS,
        seed=SEED,
        rank_noise=rank_noise,
        adapters=[flatopt.dense(model[4])],
    )


def _train(rank, rank_noise):
    model = _model()
    initial = {name: t.clone() for name, t in model.state_dict().items()}
    twin = copy.deepcopy(model)
    ddp = DistributedDataParallel(model)
    # DDP's constructor broadcasts rank 0's tensors in place; from here on nothing may write.
    versions = {n: (t._version, t.data_ptr()) for n, t in model.state_dict(keep_vars=True).items()}
    opt, twin_opt = _wrap(model, rank_noise), _wrap(twin, rank_noise)
    seen = []
    model[0].base.register_forward_hook(
        lambda m, args, out: seen.append(m.weight.detach().clone()), prepend=True
    )
    data = torch.Generator().manual_seed(100 + rank)  # each rank sees its own data
    sigmas = []
    for _ in range(STEPS):
        sigmas.append(opt.sigma)
        x, y = torch.randn(4 * MICRO, 6, generator=data), torch.randn(4 * MICRO, 3, generator=data)
        for index, (xb, yb) in enumerate(zip(x.split(4), y.split(4))):
            sync = index == MICRO - 1
            with nullcontext() if sync else ddp.no_sync(), opt.perturbed():
                (F.mse_loss(ddp(xb), yb) / MICRO).backward()
            with twin_opt.perturbed():
                (F.mse_loss(twin(xb), yb) / MICRO).backward()
        # What DDP does, by hand: average the local gradients over the ranks (one collective).
        grads = [p.grad for p in twin.parameters() if p.grad is not None]
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        for grad, reduced in zip(grads, flat.split([g.numel() for g in grads])):
            grad.copy_(reduced.view_as(grad) / WORLD)
        opt.step()
        opt.zero_grad()
        twin_opt.step()
        twin_opt.zero_grad()
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    state = model.state_dict(keep_vars=True)
    return {
        "seen": seen,
        "sigmas": sigmas,
        "num_steps": opt.num_steps,
        "trained": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
        "twin": {n: p.detach().clone() for n, p in twin.named_parameters() if p.requires_grad},
        "frozen_now": {n: state[n].detach().clone() for n in frozen},
        "frozen_initial": {n: initial[n] for n in frozen},
        "frozen_moved": [
            n for n in frozen if (state[n]._version, state[n].data_ptr()) != versions[n]
        ],
    }


def _worker(rank, host, port, out_dir):
    with process_group(rank, host, port, TIMEOUT):
        results = {"rank": dist.get_rank()}
        for rank_noise in (True, False):
            results[rank_noise] = _train(rank, rank_noise)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        # DDP's reducer must go before its process group does (a cycle would keep it to exit,
        # where gloo's threads abort the process): process_group collects; both ranks meet.
        dist.barrier()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Spawn the two ranks once; return what each saved, indexed by rank."""
    return spawn(_worker, tmp_path_factory.mktemp("ddp"), TIMEOUT, DEADLINE_S)


def _noisy_steps(run):
    """The W + ε of the first micro-batch of every step with σ_t > 0 (step 0 has σ_0 = 0)."""
    return run["seen"][MICRO::MICRO]


def test_with_rank_noise_the_ranks_draw_different_noise(ranks):
    first, second = ranks[0][True], ranks[1][True]
    assert len(first["seen"]) == STEPS * MICRO
    # The clean weights are identical on both ranks, so any difference is the noise.
    clean = [first["frozen_now"][n] for n in first["frozen_now"]]
    assert all(bits_equal(a, b) for a, b in zip(clean, second["frozen_now"].values()))
    assert all(not torch.equal(a, b) for a, b in zip(_noisy_steps(first), _noisy_steps(second)))


def test_without_rank_noise_the_ranks_draw_the_same_noise(ranks):
    first, second = ranks[0][False], ranks[1][False]
    assert all(bits_equal(a, b) for a, b in zip(first["seen"], second["seen"]))
    clean = first["frozen_now"]["0.base.weight"]
    assert all(not torch.equal(w, clean) for w in _noisy_steps(first))  # and it is real noise


def test_micro_batches_under_no_sync_share_the_step_noise(ranks):
    for run in (ranks[0][True], ranks[1][True]):
        seen = run["seen"]
        for step in range(STEPS):
            first, *rest = seen[step * MICRO : (step + 1) * MICRO]
            assert all(bits_equal(first, other) for other in rest)


@pytest.mark.parametrize("rank_noise", [True, False])
def test_the_trained_parameters_stay_identical_across_ranks(ranks, rank_noise):
    first, second = ranks[0][rank_noise]["trained"], ranks[1][rank_noise]["trained"]
    assert first.keys() == second.keys()
    assert {"0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B", "4.weight", "4.bias"} <= first.keys()
    initial = dict(_model().named_parameters())
    for name, value in first.items():
        assert bits_equal(value, second[name]), name
        assert not torch.equal(value, initial[name]), f"{name} did not train"


@pytest.mark.parametrize("rank_noise", [True, False])
def test_ddp_gives_the_all_reduced_gradient_of_each_ranks_perturbed_loss(ranks, rank_noise):
    for run in (ranks[0][rank_noise], ranks[1][rank_noise]):
        assert run["trained"].keys() == run["twin"].keys()
        for name, value in run["trained"].items():
            # DDP divides before summing, the twin after: fp32 round-off over six steps.
            torch.testing.assert_close(value, run["twin"][name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rank_noise", [True, False])
def test_the_frozen_base_weights_stay_bitwise_identical_to_the_start_on_every_rank(
    ranks, rank_noise
):
    for run in (ranks[0][rank_noise], ranks[1][rank_noise]):
        assert run["frozen_now"].keys() == run["frozen_initial"].keys()
        assert "0.base.weight" in run["frozen_now"]
        for name, value in run["frozen_now"].items():
            assert bits_equal(value, run["frozen_initial"][name]), name
        assert run["frozen_moved"] == []  # no ._version bump, no new storage


def test_the_schedule_counts_optimizer_steps_whatever_the_world_size(ranks):
    ramp = [0.5 * (1 - math.cos(math.pi * min(t, TOTAL_STEPS) / TOTAL_STEPS)) for t in range(STEPS)]
    expected = [SIGMA * factor for factor in ramp]
    for rank in ranks:
        for rank_noise in (True, False):
            run = rank[rank_noise]
            assert run["num_steps"] == STEPS
            assert run["sigmas"] == pytest.approx(expected)
    # It reaches σ (not σ / world_size) at total_steps, as in a single process.
    assert ranks[0][True]["sigmas"][TOTAL_STEPS] == pytest.approx(SIGMA)
