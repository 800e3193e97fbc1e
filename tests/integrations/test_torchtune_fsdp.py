"""flatopt on a tiny torchtune LoRA Llama-2 sharded by torchtune's own ``shard_model`` (FSDP2, each
transformer layer then the root, as ``lora_finetune_distributed`` does), on two gloo processes.

The checks are tests/test_fsdp.py's (tests/fsdp_cases.py runs them): every rank's forward sees
bitwise the W + ε of an unsharded flatopt with the same seed and rank; FSDP's averaged gradient is
the mean of the unsharded references'; the frozen shards are never written; the gathered LoRA
factors stay those of an unsharded run. With ``quantize_base=True`` (QLoRA, NF4 base weights) the
noise goes on the layers' output side, so their outputs are compared bitwise instead.

``torchtune.training`` holds ``shard_model``. torchtune 0.6.1 imports ``int4_weight_only`` there,
which torchao 0.16 removed: constraints/torchtune-litgpt.txt pins torchao 0.15.0.
"""

from __future__ import annotations

import datetime
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from fsdp_cases import MICRO, STEPS, Case, Run, Setup, in_group, process_group, spawn
from ranks import listed, reports
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torchtune import modules, training
from torchtune.models.llama2 import lora_llama2
from torchtune.modules.peft import LoRALinear, get_adapter_params, set_trainable_params

TIMEOUT = datetime.timedelta(seconds=60)
DEADLINE_S = 400
SEQ, BATCH = 8, 2
CASES = (
    (Case("shard_model"), False),
    (Case("shard_model_kept_unsharded", reshard=False), False),
    (Case("shard_model_shared_noise", rank_noise=False), False),
    (Case("accumulate_without_sync", sync="last"), False),
    (Case("activation_checkpointing", checkpointing=True), False),
    (Case("auto", auto=True), False),
    (Case("bf16", bf16=True), False),
    (Case("nf4_base"), True),
)
NAMES = [case.name for case, _ in CASES]


class TorchtuneSetup(Setup):
    """A one-layer ``lora_llama2`` with LoRA on every linear layer, sharded by ``shard_model``."""

    def __init__(self, case: Case, nf4: bool):
        super().__init__(case)
        self.nf4 = nf4
        self.observe = "output" if nf4 else "weight"
        # NF4 quantizes blocks of 64 entries in groups of 256 blocks, on each shard too.
        self.dim = 256 if nf4 else 32

    def build(self) -> nn.Module:
        torch.manual_seed(0)  # torchtune initialises from the global generator: same on each rank
        model = lora_llama2(
            lora_attn_modules=["q_proj", "k_proj", "v_proj", "output_proj"],
            apply_lora_to_mlp=True,
            apply_lora_to_output=True,
            vocab_size=self.dim,
            num_layers=1,
            num_heads=4,
            num_kv_heads=4 if self.nf4 else 2,
            embed_dim=self.dim,
            max_seq_len=16,
            lora_rank=2,
            lora_alpha=4,
            quantize_base=self.nf4,
        )
        set_trainable_params(model, get_adapter_params(model))
        for module in model.modules():
            if isinstance(module, LoRALinear):  # B starts at 0: give W' its low-rank part
                nn.init.normal_(module.lora_b.weight, std=0.2)
        if self.case.bf16:
            model.to(torch.bfloat16)
        if self.case.checkpointing:
            training.set_activation_checkpointing(
                model, auto_wrap_policy={modules.TransformerSelfAttentionLayer}
            )
        return model

    def shard(self, model: nn.Module, mesh: DeviceMesh) -> None:
        conditions = [partial(training.get_shard_conditions, names_to_match=None)]
        training.shard_model(
            model,
            conditions,
            cpu_offload=False,
            reshard_after_forward=self.case.reshard,
            dp_mesh=mesh,
        )

    def adapters(self, model: nn.Module) -> list:
        return []  # flatopt's built-in adapter finds torchtune's LoRALinear

    def batches(self, rank: int, step: int) -> list[tuple[Tensor, Tensor]]:
        g = torch.Generator().manual_seed(1000 * rank + step)
        tokens = torch.randint(0, self.dim, (MICRO * BATCH, SEQ + 1), generator=g)
        return list(zip(tokens[:, :-1].split(BATCH), tokens[:, 1:].split(BATCH)))

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(output.float().flatten(0, 1), target.flatten()) / MICRO


def _run(mesh: DeviceMesh, group, case: Case, nf4: bool) -> dict:
    run = Run(case, mesh, group, setup=TorchtuneSetup(case, nf4))
    run.train(STEPS)
    return run.finish()


def _worker(rank: int, host: str, port: int, out_dir: str) -> None:
    with process_group(rank, host, port, TIMEOUT):
        results = {"rank": dist.get_rank()}
        for case, nf4 in CASES:
            results[case.name] = in_group(TIMEOUT, _run, case, nf4)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return spawn(_worker, tmp_path_factory.mktemp("torchtune_fsdp"), TIMEOUT, DEADLINE_S)


@pytest.mark.parametrize("name", NAMES)
def test_each_forward_sees_the_unsharded_w_plus_eps_bitwise(ranks, name):
    for rank, report in enumerate(reports(ranks, name)):
        names = [target for target, _ in report["targets"]]
        assert len(names) == 4 + 3 + 1  # q, k, v, output_proj; w1, w2, w3; output
        assert all(n.startswith("layers.0.") for n in names[:-1]) and names[-1] == "output"
        assert report["targets"] == report["ref_targets"]  # the whole weights' shapes
        assert report["compared"] >= STEPS * MICRO * len(names)
        assert report["seen"] == [], listed(rank, report["seen"])
        assert report["noiseless"] == [], listed(rank, report["noiseless"])


@pytest.mark.parametrize("name", NAMES)
def test_the_averaged_gradient_is_the_mean_of_the_unsharded_references(ranks, name):
    for rank, report in enumerate(reports(ranks, name)):
        assert report["grads"] == [], listed(rank, report["grads"])


@pytest.mark.parametrize("name", NAMES)
def test_the_gathered_lora_factors_stay_those_of_an_unsharded_run(ranks, name):
    for rank, report in enumerate(reports(ranks, name)):
        assert report["solo"] == [], listed(rank, report["solo"])
        assert report["num_steps"] == STEPS
        assert all(".lora_" in n for n in report["final"])  # the factors are what trained


@pytest.mark.parametrize("name", NAMES)
def test_frozen_shards_stay_bitwise_unchanged_and_unmoved(ranks, name):
    for rank, report in enumerate(reports(ranks, name)):
        assert report["frozen_count"] > 8  # every base weight, the norms, the embedding
        assert report["frozen_moved"] == [], listed(rank, report["frozen_moved"])
        assert report["held"] == [], listed(rank, report["held"])
        assert report["eval"] == [], listed(rank, report["eval"])


def test_ranks_draw_their_own_noise_unless_told_otherwise(ranks):
    for name in ("shard_model", "shard_model_shared_noise"):
        first, second = (report["first_seen"] for report in reports(ranks, name))
        noisy = [(a, b) for a, b, s in zip(first, second, ranks[0][name]["sigmas"]) if s > 0]
        assert len(noisy) == STEPS - 1
        same = [torch.equal(a, b) for a, b in noisy]
        assert same == [name == "shard_model_shared_noise"] * len(noisy)
