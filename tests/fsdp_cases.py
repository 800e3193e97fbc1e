"""What each rank runs for tests/test_fsdp.py: a small LoRA model, the ways to shard it with FSDP2
(``fully_shard``), and a training run checked against unsharded references in the same process.

flatopt's promise under FSDP2: each rank's forward sees exactly the W + ε that unsharded flatopt
gives for the same seed and rank. So every rank runs, next to the sharded model:

- ``synced``: an unsharded copy in the compute dtype with its own FlatPerturb (same seed, same
  rank), loaded with the sharded model's gathered parameters at the start of every step. A forward
  pre-hook on every target module records the weight each forward reads, in both models: the bits
  must be equal. Its gradients, averaged over the ranks as FSDP reduces them, must be FSDP's;
- ``solo``: an unsharded run of its own (fp32 master parameters, the same optimizer), whose
  parameters the sharded run's gathered ones must stay.

A case records what differed instead of raising, so that one spawn reports every case; an
exception is recorded with its traceback.
"""

from __future__ import annotations

import copy
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from ranks import WORLD, process_group, spawn  # noqa: F401 - re-exported
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

import flatopt
from flatopt.lora import LoRALinear, add_lora
from flatopt.noise import LowRank

WIDTH = 8
HIDDEN = (5, 7)  # rows of the blocks' first layers: odd, so the shards are uneven (3 + 2, 4 + 3)
OUT = 3  # rows of the dense head: 2 + 1
STEPS = 4
MICRO = 2  # micro-batches per optimizer step
BATCH = 4  # rows per micro-batch
SIGMA = 0.2
TOTAL_STEPS = 3  # cosine ramp: σ_t = 0, 0.05, 0.15, 0.2
SEED = 7
LR = 1e-2
RESUME_AT = 2  # the checkpoint case saves after this many steps

# FSDP2 passes a unit's inputs through an autograd node of its own. Where a unit boundary falls
# inside a residual block, the gradient reaching that input is summed in another order than in
# the unsharded model: a few ulps apart, even without flatopt. The forwards' W + ε are compared
# bitwise; gradients and trained parameters at this tolerance (bf16: bf16 ulps of the forward).
TOLERANCE = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-2},
}


class Block(nn.Module):
    """A residual MLP block: x + down(tanh(up(x)))."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.down(torch.tanh(self.up(x)))


class Net(nn.Module):
    """Blocks, then a new, fully trained head (a dense target); optional activation checkpoints."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(WIDTH, hidden) for hidden in HIDDEN])
        self.head = nn.Linear(WIDTH, OUT)
        self.checkpointing = False

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.checkpointing else block(x)
        return self.head(x)


class FactorLoRA(nn.Module):
    """A LoRA layer laid out as torchtune's: it reads its own ``weight``, and the factors are child
    ``nn.Linear`` modules, so each factor can be an FSDP unit of its own."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=False)
        self.bias = nn.Parameter(base.bias.detach().clone(), requires_grad=False)
        self.lora_a = nn.Linear(base.in_features, rank, bias=False)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False)
        self.scaling = alpha / rank

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias) + self.scaling * self.lora_b(self.lora_a(x))


def factor_adapter(module: nn.Module) -> Optional[flatopt.Target]:
    if isinstance(module, FactorLoRA):
        return flatopt.Target(
            module,
            "weight",
            lambda: LowRank(module.lora_b.weight, module.lora_a.weight, module.scaling),
        )
    return None


def build(kind: str) -> Net:
    """The same model on every rank, drawn from a private generator; B is not zero."""
    g = torch.Generator().manual_seed(0)
    net = Net()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.4)
    if kind == "lora":
        add_lora(net, ["up", "down"], rank=2, alpha=4)
    else:
        net.requires_grad_(False)
        for block in net.blocks:
            block.up = FactorLoRA(block.up, rank=2, alpha=4)
            block.down = FactorLoRA(block.down, rank=2, alpha=4)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    net.head.requires_grad_(True)
    return net


def reader(net: nn.Module, name: str) -> nn.Module:
    """The module whose forward reads the weight of the target named ``name``."""
    module = net.get_submodule(name)
    return module.base if isinstance(module, LoRALinear) else module


def lora_layers(net: Net) -> list[nn.Module]:
    return [m for m in net.modules() if isinstance(m, (LoRALinear, FactorLoRA))]


def shard(net: Net, layout: str, mesh: DeviceMesh, reshard: bool, bf16: bool) -> None:
    """``fully_shard`` the units of ``layout``, innermost first, then the root."""
    kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard}
    if bf16:
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    if layout == "blocks":  # as torchtune's distributed recipes: each block, then the root
        units = list(net.blocks)
    elif layout == "layers":  # each LoRA layer and the head
        units = [*lora_layers(net), net.head]
    elif layout == "targets":  # each module whose forward reads a target weight
        units = [reader(net, n) for n, m in net.named_modules() if isinstance(m, LoRALinear)]
        units = [*units, *(m for m in lora_layers(net) if isinstance(m, FactorLoRA)), net.head]
    elif layout == "factors":  # each factor on its own: still sharded when the layer's hook runs
        units = []
        for layer in lora_layers(net):
            units += [layer.lora_a, layer.lora_b, layer]
        units.append(net.head)
    else:
        raise ValueError(layout)
    for unit in units:
        fully_shard(unit, **kwargs)
    fully_shard(net, **kwargs)


@dataclass(frozen=True)
class Case:
    """One FSDP2 configuration; every field but ``name`` departs from the first case's."""

    name: str
    kind: str = "lora"  # "lora": flatopt.lora.LoRALinear; "factors": FactorLoRA
    layout: str = "blocks"
    reshard: bool = True  # fully_shard(reshard_after_forward=...)
    rank_noise: bool = True
    sync: str = "every"  # gradient sync at "every" micro-batch, or at the "last" one only
    resample: str = "step"
    auto: bool = False
    checkpointing: bool = False
    bf16: bool = False  # MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)
    flatopt_first: bool = False  # FlatPerturb built before fully_shard (accelerate's order)


CASES = (
    Case("blocks"),
    Case("blocks_kept_unsharded", reshard=False),
    Case("blocks_shared_noise", rank_noise=False),
    Case("layers", layout="layers"),
    Case("layers_kept_unsharded", layout="layers", reshard=False),
    Case("targets", layout="targets"),
    Case("torchtune_style_blocks", kind="factors"),
    Case("torchtune_style_factors", kind="factors", layout="factors"),
    Case("accumulate_without_sync", sync="last"),
    Case("accumulate_without_sync_layers", layout="layers", sync="last"),
    Case("resample_call", resample="call"),
    Case("activation_checkpointing", checkpointing=True),
    Case("activation_checkpointing_kept", checkpointing=True, reshard=False),
    Case("bf16_mixed_precision", bf16=True),
    Case("bf16_mixed_precision_without_sync", bf16=True, sync="last"),
    Case("flatopt_first", flatopt_first=True, layout="targets"),
    Case("auto", auto=True),
    Case("auto_layers", auto=True, layout="layers"),
    Case("auto_resample_call", auto=True, resample="call"),
    Case("auto_checkpointing_without_sync", auto=True, checkpointing=True, sync="last"),
)


def _diff(a: Tensor, b: Tensor) -> str:
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"{tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}"
    return f"max |diff| {(a.double() - b.double()).abs().max().item():.3g}"


def _full(t: Tensor) -> Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class Recorder:
    """A hook per target module: a copy of the weight each forward reads (a forward pre-hook
    registered after FlatPerturb's), or of each output (for output-side noise: quantized W)."""

    def __init__(self, net: nn.Module, names: list[str], observe: str = "weight"):
        self.seen: dict[str, list[Tensor]] = {name: [] for name in names}
        for name in names:
            module = reader(net, name)
            if observe == "weight":
                module.register_forward_pre_hook(self._weight(name))
            else:
                module.register_forward_hook(self._output(name))

    def _weight(self, name: str):
        def hook(module: nn.Module, args: Any) -> None:
            self.seen[name].append(module.weight.detach().clone())

        return hook

    def _output(self, name: str):
        def hook(module: nn.Module, args: Any, output: Tensor) -> None:
            self.seen[name].append(output.detach().clone())

        return hook

    def take(self) -> dict[str, list[Tensor]]:
        seen = {name: list(values) for name, values in self.seen.items()}
        for values in self.seen.values():
            values.clear()
        return seen


class Setup:
    """How a run builds, shards and feeds its model: here the small `Net` of a `Case`. Other
    models (tests/integrations/test_torchtune_fsdp.py) bring their own."""

    observe = "weight"  # what `Recorder` compares: the weight each forward reads, or outputs

    def __init__(self, case: Case):
        self.case = case

    def build(self) -> nn.Module:
        net = build(self.case.kind)
        net.checkpointing = self.case.checkpointing
        return net

    def shard(self, net: nn.Module, mesh: DeviceMesh) -> None:
        case = self.case
        shard(net, case.layout, mesh, case.reshard, case.bf16)

    def adapters(self, net: nn.Module) -> list:
        return [flatopt.dense(net.head), factor_adapter]

    def batches(self, rank: int, step: int) -> list[tuple[Tensor, Tensor]]:
        return micro_batches(rank, step)

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(output.float(), target) / MICRO


def wrap(net: nn.Module, params: list[Tensor], case: Case, adapters: list, inner=None, auto=None):
    """A FlatPerturb with the settings of ``case`` over an AdamW (or ``inner``)."""
    if inner is None:
        inner = torch.optim.AdamW(params, lr=LR)
    kwargs = {"auto": True} if (case.auto if auto is None else auto) else {}
    return flatopt.FlatPerturb(
        inner,
        net,
        sigma=SIGMA,
        schedule="cosine",
        total_steps=TOTAL_STEPS,
        seed=SEED,
        rank_noise=case.rank_noise,
        resample=case.resample,
        adapters=adapters,
        **kwargs,
    )


def micro_batches(rank: int, step: int) -> list[tuple[Tensor, Tensor]]:
    """Each rank its own data, the same at the same step in every run."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(MICRO * BATCH, WIDTH, generator=g)
    y = torch.randn(MICRO * BATCH, OUT, generator=g)
    return list(zip(x.split(BATCH), y.split(BATCH)))


def average(grads: dict[str, Tensor], group: Any) -> dict[str, Tensor]:
    """The mean over the ranks of each gradient, summed in rank order."""
    mean = {}
    for name, local in grads.items():
        everyone = [torch.empty_like(local) for _ in range(WORLD)]
        dist.all_gather(everyone, local.contiguous(), group=group)
        mean[name] = sum(everyone[1:], everyone[0]) / WORLD
    return mean


def reduce_as_fsdp(micro_grads: list[dict[str, Tensor]], sync: str, group: Any):
    """The gradient FSDP2 leaves on the parameters after the micro-batches of one step."""
    if sync == "last":  # accumulated on each rank, reduced once
        local = dict(micro_grads[0])
        for grads in micro_grads[1:]:
            local = {n: local[n] + grads[n] for n in local}
        return average(local, group)
    total: dict[str, Tensor] = {}  # reduced at every micro-batch, the means accumulated
    for grads in micro_grads:
        mean = average(grads, group)
        total = {n: total[n] + mean[n] for n in total} if total else mean
    return total


class Reference:
    """The unsharded model in the compute dtype, perturbed by a FlatPerturb of its own with the
    same seed and rank. Its parameters are loaded at every step; it never steps them itself."""

    def __init__(self, net: nn.Module, setup: Setup, dtype: torch.dtype, names: list[str]):
        self.model = copy.deepcopy(net).to(dtype)
        if hasattr(self.model, "checkpointing"):
            self.model.checkpointing = False
        self.setup, self.dtype = setup, dtype
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        inner = torch.optim.SGD(trainable, lr=0.0)
        adapters = setup.adapters(self.model)
        self.opt = wrap(self.model, trainable, setup.case, adapters, inner=inner, auto=False)
        self.seen = Recorder(self.model, names, setup.observe)

    def load(self, params: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if name in params:
                    p.copy_(params[name].to(self.dtype))

    def micro_batch(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """Perturbed forward and backward of one micro-batch; its gradients, in fp32."""
        x = x.to(self.dtype) if x.is_floating_point() else x
        with self.opt.perturbed():
            self.setup.loss(self.model(x), y).backward()
        grads = {n: p.grad.float() for n, p in self.model.named_parameters() if p.grad is not None}
        self.opt.zero_grad()
        return grads

    def step(self) -> None:
        self.opt.step()  # lr = 0: only the noise schedule moves
        self.opt.zero_grad()


def _plain(t: Tensor) -> bool:
    return type(_local(t)) in (Tensor, nn.Parameter)


def _storage(t: Tensor) -> list[tuple[Tensor, int, int]]:
    """A tensor's values, version counter and storage address; an NF4 tensor's, per part."""
    t = _local(t).detach()
    parts = [getattr(t, name, None) for name in NF4_PARTS]
    tensors = [t] if _plain(t) or None in parts else parts
    return [(part.clone(), part._version, part.data_ptr()) for part in tensors]


NF4_PARTS = ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean", "nf4")


class Run:
    """One sharded training run on this rank, and (optionally) two unsharded references.

    ``synced`` is loaded with the sharded model's gathered parameters at every step: its
    forwards must see the same bits, and its gradients averaged over the ranks must be FSDP's.
    ``solo`` is an unsharded run of its own: fp32 master parameters and their optimizer, loaded
    into the compute copy at every step, trained on the averaged reference gradients.
    """

    def __init__(
        self,
        case: Case,
        mesh: DeviceMesh,
        group: Any,
        reference: bool = True,
        setup: Optional[Setup] = None,
    ):
        self.case, self.group, self.rank = case, group, dist.get_rank()
        self.setup = setup = setup if setup is not None else Setup(case)
        self.dtype = torch.bfloat16 if case.bf16 else torch.float32
        self.tolerance = TOLERANCE[self.dtype]
        net = self.net = setup.build()
        unsharded = copy.deepcopy(net)
        if case.flatopt_first:
            # The optimizer and FlatPerturb exist before the model is sharded; then the
            # optimizer is pointed at the sharded parameters by name, as accelerate does.
            names = {id(p): n for n, p in net.named_parameters()}
            self.opt = self._wrap()
            setup.shard(net, mesh)
            now = dict(net.named_parameters())
            for param_group in self.opt.param_groups:
                param_group["params"] = [now[names[id(p)]] for p in param_group["params"]]
        else:
            setup.shard(net, mesh)
            self.opt = self._wrap()
        self.names = [name for name, _ in self.opt.targets]
        # FSDP's lazy initialisation, at the root's first forward, re-allocates uneven shards on
        # some torch releases (2.8, 2.9): one clean eval forward first, so that the frozen
        # shards are recorded as FSDP keeps them (flatopt never allocates or writes one).
        training = net.training
        net.eval()
        with torch.no_grad():
            net(setup.batches(self.rank, 0)[0][0])
        for module in net.modules():  # back to the shards where reshard_after_forward=False
            if isinstance(module, FSDPModule):
                module.reshard()
        net.train(training)
        self.seen = Recorder(net, self.names, setup.observe)
        self.frozen = {n: _storage(p) for n, p in net.named_parameters() if not p.requires_grad}
        self.sharded = {name: reader(net, name)._parameters["weight"] for name in self.names}
        module_names = {id(m): n for n, m in net.named_modules()}
        self.weights = {
            name: f"{module_names[id(reader(net, name))]}.weight" for name in self.names
        }
        self.reference = reference
        if reference:
            self.synced = Reference(unsharded, setup, self.dtype, self.names)
            self.solo = Reference(unsharded, setup, self.dtype, self.names)
            self.master = {
                n: nn.Parameter(p.detach().clone())
                for n, p in unsharded.named_parameters()
                if p.requires_grad
            }
            self.master_opt = torch.optim.AdamW(list(self.master.values()), lr=LR)
        self.report: dict[str, Any] = {
            "targets": self.opt.targets,
            "ref_targets": self.synced.opt.targets if reference else None,
            "compared": 0,  # forwards compared bitwise with the synced reference
            "seen": [],  # (step, micro-batch, target) whose W + ε differed from the reference's
            "noiseless": [],  # a forward with σ_t > 0 that saw the clean W
            "grads": [],  # (step, parameter) whose gradient is not the averaged reference's
            "grad_max_diff": 0.0,
            "grad_bitwise": True,
            "solo": [],  # (step, parameter) that is not the unsharded run's
            "solo_max_diff": 0.0,
            "eval": [],  # drop-in mode: an evaluation forward that did not see the clean W
            "held": [],  # a module holding neither FSDP's parameter nor the clean weight
            "first_seen": [],  # the first target's W + ε at each step, to compare the ranks
            "sigmas": [],
        }

    def _wrap(self) -> flatopt.FlatPerturb:
        # All parameters, frozen ones included, as torchtune's recipes build their optimizer: a
        # parameter without a gradient is never written.
        params = list(self.net.parameters())
        return wrap(self.net, params, self.case, self.setup.adapters(self.net))

    # -- the training loop --------------------------------------------------------------------

    def train(self, steps: int) -> None:
        for _ in range(steps):
            self._step()

    def _gather(self) -> dict[str, Tensor]:
        """The whole trainable parameters, and the frozen ones that are plain tensors."""
        return {
            n: _full(p.detach())
            for n, p in self.net.named_parameters()
            if p.requires_grad or _plain(p)
        }

    def _step(self) -> None:
        case, net, opt, report = self.case, self.net, self.opt, self.report
        step = opt.num_steps
        report["sigmas"].append(opt.sigma)
        gathered = self._gather()
        if self.reference:
            self._compare_solo(f"before step {step}", gathered)
            self.synced.load(gathered)
            self.solo.load({n: p.detach() for n, p in self.master.items()})
        synced_grads, solo_grads = [], []
        for index, (x, y) in enumerate(self.setup.batches(self.rank, step)):
            if case.sync == "last":
                net.set_requires_gradient_sync(index == MICRO - 1)
            if case.auto:
                self._forward_backward(x, y, gathered, index)
            else:
                with opt.perturbed():
                    self._forward_backward(x, y, gathered, index)
            seen = self.seen.take()
            if index == 0:
                report["first_seen"].append(seen[self.names[0]][0])
            if self.reference:
                synced_grads.append(self.synced.micro_batch(x, y))
                self._compare_seen(step, index, seen, self.synced.seen.take(), opt.sigma)
                solo_grads.append(self.solo.micro_batch(x, y))
                self.solo.seen.take()
        if self.reference:
            self._compare_grads(step, reduce_as_fsdp(synced_grads, case.sync, self.group))
            for name, grad in reduce_as_fsdp(solo_grads, case.sync, self.group).items():
                self.master[name].grad = grad.to(self.master[name].dtype)
            self.master_opt.step()
            self.master_opt.zero_grad()
            self.synced.step()
            self.solo.step()
        if case.auto:
            self._check_eval(step, gathered)
        opt.step()
        opt.zero_grad()
        self._check_held(step, "after the step", gathered)

    def _forward_backward(self, x: Tensor, y: Tensor, gathered, index: int) -> None:
        out = self.net(x)
        self._check_held(self.opt.num_steps, f"micro-batch {index}, after the forward", gathered)
        self.setup.loss(out, y).backward()

    # -- the checks ---------------------------------------------------------------------------

    def _compare_seen(self, step, index, seen, ref_seen, sigma) -> None:
        for name in self.names:
            where = f"step {step}, micro-batch {index}, {name!r}"
            ours, theirs = seen[name], ref_seen[name]
            if not theirs or not ours:
                self.report["seen"].append(f"{where}: {len(ours)} forwards vs {len(theirs)}")
                continue
            want = theirs[0]
            # Every forward of the micro-batch (a checkpointed one runs again in the backward)
            # sees the same bits, in the sharded model and in the reference.
            for call, got in enumerate(ours + theirs[1:]):
                self.report["compared"] += 1
                if not (got.dtype == want.dtype and torch.equal(got, want)):
                    self.report["seen"].append(f"{where}, call {call}: {_diff(got, want)}")
            clean = reader(self.synced.model, name).weight
            if self.setup.observe == "weight" and sigma > 0 and torch.equal(want, clean):
                self.report["noiseless"].append(where)

    def _close(self, got: Tensor, want: Tensor) -> Optional[str]:
        try:
            torch.testing.assert_close(got, want, **self.tolerance)
        except AssertionError as error:
            return " ".join(str(error).split())[:300]
        return None

    def _compare_grads(self, step: int, want: dict[str, Tensor]) -> None:
        report = self.report
        for n, p in self.net.named_parameters():
            if not p.requires_grad:
                continue
            if p.grad is None or n not in want:
                report["grads"].append(f"step {step}, {n}: gradient missing")
                continue
            got = _full(p.grad).float()  # a bf16 model reduces in bf16; the reference in fp32
            if got.shape == want[n].shape:
                gap = (got.double() - want[n].double()).abs().max().item()
                report["grad_max_diff"] = max(report["grad_max_diff"], gap)
            report["grad_bitwise"] &= bool(torch.equal(got, want[n]))
            problem = self._close(got, want[n])
            if problem:
                report["grads"].append(f"step {step}, {n}: {problem}")

    def _compare_solo(self, when: str, gathered: dict[str, Tensor]) -> None:
        for n, master in self.master.items():
            got, want = gathered[n].float(), master.detach().float()
            if got.shape == want.shape:
                gap = (got.double() - want.double()).abs().max().item()
                self.report["solo_max_diff"] = max(self.report["solo_max_diff"], gap)
            problem = self._close(got, want)
            if problem:
                self.report["solo"].append(f"{when}, {n}: {problem}")

    def _check_eval(self, step: int, gathered: dict[str, Tensor]) -> None:
        """Drop-in mode: an evaluation forward in the middle of a step sees the clean W."""
        self.net.eval()
        with torch.no_grad():
            self.net(self.setup.batches(self.rank, step)[0][0])
        self.net.train()
        for name, values in self.seen.take().items():
            clean = gathered[self.weights[name]].to(self.dtype)
            if len(values) != 1 or not torch.equal(values[0], clean):
                self.report["eval"].append(f"step {step}, {name!r}: not the clean W")

    def _check_held(self, step: int, when: str, gathered: dict[str, Tensor]) -> None:
        """Each target module holds FSDP's sharded parameter, or a live unsharded clean W."""
        for name in self.names:
            held = reader(self.net, name)._parameters["weight"]
            if held is self.sharded[name] or self.weights[name] not in gathered:
                continue  # FSDP's own parameter, or a quantized W (never swapped: output-side)
            where = f"step {step}, {when}, {name!r}"
            if isinstance(held, DTensor):
                self.report["held"].append(f"{where}: a DTensor that is not FSDP's parameter")
            elif held.untyped_storage().size() == 0:
                self.report["held"].append(f"{where}: a tensor whose storage FSDP freed")
            elif not torch.equal(held.detach(), gathered[self.weights[name]].to(held.dtype)):
                self.report["held"].append(f"{where}: not the clean weight (W + ε left behind?)")

    def finish(self) -> dict[str, Any]:
        final = {n: _full(p.detach()) for n, p in self.net.named_parameters() if p.requires_grad}
        if self.reference:
            self._compare_solo(f"after step {self.opt.num_steps - 1}", final)
        moved = []
        for n, p in self.net.named_parameters():
            if n not in self.frozen:
                continue
            for (value, version, ptr), (now, now_version, now_ptr) in zip(
                self.frozen[n], _storage(p)
            ):
                if not torch.equal(now, value):
                    moved.append(f"{n}: values changed")
                if now_version != version or now_ptr != ptr:
                    moved.append(f"{n}: version {version} -> {now_version} or new storage")
        self.report.update(
            frozen_moved=moved,
            frozen_count=len(self.frozen),
            num_steps=self.opt.num_steps,
            final=final,
        )
        return self.report

    # -- a distributed checkpoint -------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        # The wrapped optimizer: on a fresh one, get_state_dict takes a step with zero gradients
        # to create its state, which on the wrapper would count as a step of the schedule. DCP
        # keeps an optimizer's "state" and "param_groups" only: flatopt's entry (seed, step
        # count, noise settings) goes in beside them.
        model_state, optim_state = get_state_dict(self.net, self.opt.optimizer)
        own = self.opt.state_dict()["flatopt"]
        return {"model": model_state, "optim": optim_state, "flatopt": own}

    def save(self, directory: Path) -> None:
        dcp.save(self._state(), checkpoint_id=directory, process_group=self.group)

    def load(self, directory: Path) -> None:
        state = self._state()
        dcp.load(state, checkpoint_id=directory, process_group=self.group)
        set_state_dict(
            self.net,
            self.opt.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
        )
        loaded = self.opt.state_dict()  # the optimizer state just loaded, and flatopt's entry
        loaded["flatopt"] = state["flatopt"]
        self.opt.load_state_dict(loaded)
        # Loading writes every shard, frozen ones included (DCP's copy; on some torch releases
        # into new storage): from here on, nothing may move them.
        self.frozen = {
            n: _storage(p) for n, p in self.net.named_parameters() if not p.requires_grad
        }


# -- what a rank runs -------------------------------------------------------------------------


def in_group(timeout, fn, *args) -> dict[str, Any]:
    """Run ``fn(mesh, group, *args)`` in a process group of its own, recording any exception.

    A case that fails on one rank leaves the other waiting in a collective until ``timeout``;
    the next case starts on a fresh group, so no message of the failed one is left in flight.
    The groups live until the process group is destroyed: DTensors resolve theirs by name.
    """
    group = dist.new_group(backend="gloo", timeout=timeout)
    mesh = DeviceMesh.from_group(group, "cpu")
    try:
        return {"error": None, **fn(mesh, group, *args)}
    except Exception:
        return {"error": traceback.format_exc()}


def run_case(mesh: DeviceMesh, group: Any, case: Case) -> dict[str, Any]:
    run = Run(case, mesh, group)
    run.train(STEPS)
    return run.finish()


def run_resume(mesh: DeviceMesh, group: Any, directory: str) -> dict[str, Any]:
    """Train straight through; then train, save a DCP checkpoint, load it into fresh objects and
    train on: the resumed run must end bit for bit where the straight one did."""
    case = Case("resume")
    straight = Run(case, mesh, group)
    straight.train(STEPS)
    first = Run(case, mesh, group, reference=False)
    first.train(RESUME_AT)
    first.save(Path(directory))
    resumed = Run(case, mesh, group, reference=False)
    resumed.load(Path(directory))
    loaded_steps = resumed.opt.num_steps
    resumed.train(STEPS - RESUME_AT)
    return {"straight": straight.finish(), "resumed": resumed.finish(), "loaded": loaded_steps}


def run_fsdp1(mesh: DeviceMesh, group: Any) -> dict[str, Any]:
    """FSDP1 (``FullyShardedDataParallel``): what FlatPerturb raises when built on the wrapped
    model or on the module inside it, with or without a dense head. Where nothing is raised,
    how far the W + ε of the first perturbed forward is from the unsharded reference's."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    case = Case("fsdp1")
    report: dict[str, Any] = {}
    for model_name in ("wrapper", "inner"):
        for head in (True, False):
            net = build("lora")
            unsharded = copy.deepcopy(net)
            wrapped = FullyShardedDataParallel(
                net, process_group=group, use_orig_params=True, device_id=torch.device("cpu")
            )
            model = wrapped if model_name == "wrapper" else net
            key = f"{model_name}{', dense head' if head else ''}"
            try:
                adapters = [flatopt.dense(net.head)] if head else []
                params = [p for p in wrapped.parameters() if p.requires_grad]
                opt = wrap(model, params, case, adapters, inner=torch.optim.SGD(params, lr=0.0))
            except Exception as error:
                report[key] = (type(error).__name__, str(error))
                continue
            setup = Setup(case)
            setup.adapters = lambda model, head=head: [flatopt.dense(model.head)] if head else []
            names = [name for name, _ in opt.targets]
            ref = Reference(unsharded, setup, torch.float32, names)
            seen = Recorder(net, names)
            gaps = []
            for step in range(2):  # step 0 has σ_0 = 0
                x, y = micro_batches(dist.get_rank(), step)[0]
                with opt.perturbed():
                    F.mse_loss(wrapped(x), y).backward()
                ref.micro_batch(x, y)
                ours, theirs = seen.take(), ref.seen.take()
                gaps += [_diff(ours[n][0], theirs[n][0]) for n in names]
                opt.step()
                ref.step()
            report[key] = (None, "; ".join(gaps))
    return {"built": report}


def run_tensor_parallel(mesh: DeviceMesh, group: Any) -> dict[str, Any]:
    """A target weight that is still sharded inside its forward (tensor parallelism): the steps
    that ran before FlatPerturb raised, and what it raised."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    net = build("lora")
    parallelize_module(net.blocks[0].up.base, mesh, ColwiseParallel(output_layouts=Replicate()))
    trainable = [p for p in net.parameters() if p.requires_grad]
    opt = wrap(net, trainable, Case("tensor_parallel"), [])
    try:
        for step in range(STEPS):
            x, y = micro_batches(dist.get_rank(), step)[0]
            with opt.perturbed():
                F.mse_loss(net(x), y).backward()
            opt.step()
            opt.zero_grad()
    except Exception as error:
        return {"raised": type(error).__name__, "message": str(error), "steps": opt.num_steps}
    return {"raised": None, "message": None, "steps": opt.num_steps}
