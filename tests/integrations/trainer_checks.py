"""What the trainer tests share: a tiny GPT-2 with a peft LoRA, a toy task, and an observer.

- `tiny_gpt2`: GPT-2 built from a config (no download), peft LoRA on ``c_attn`` and both
  ``c_proj`` of its two blocks: six targets. No dropout, so two runs differ only by their noise.
- `sequences` / `tokenizer`: counting sequences ``a, a+k, a+2k, ... (mod V)``, as token ids or as
  text for a word-level tokenizer built in memory.
- `Observer`: a forward pre-hook on every target module, registered *after* the FlatPerturb was
  built, so it runs after flatopt's own and sees the weight the forward reads: W + ε while
  perturbed, the clean W object otherwise. It records every read with the module's mode and the
  step count, and `check` asserts the contract on them.
- `flatopt_warnings`: the warnings flatopt emitted, out of everything a trainer warns about.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from helpers import assert_untouched, bits_equal, frozen_names, snapshot
from peft import LoraConfig, get_peft_model
from torch import Tensor, nn
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

import flatopt

VOCAB, LENGTH = 32, 12
TARGETS = 6  # c_attn, attn.c_proj and mlp.c_proj in each of the two blocks
SIGMA, SEED = 0.5, 7


def tiny_gpt2(seed: int = 0) -> nn.Module:
    """A 2-block GPT-2 (width 32) with a rank-4 peft LoRA; the same ``seed`` gives the same bits."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=2 * LENGTH,  # room for the EOS token TRL appends
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["c_attn", "c_proj"],
        fan_in_fan_out=True,  # GPT-2's Conv1D stores its weight as (in, out)
        lora_dropout=0.0,
        init_lora_weights=False,  # B != 0, so W' = W + s·B·A differs from W from the start
    )
    return get_peft_model(GPT2LMHeadModel(config), lora)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def sequences(count: int, seed: int = 0, vocab: int = VOCAB) -> list[list[int]]:
    """``count`` sequences ``a, a+k, ... (mod vocab)`` of LENGTH tokens, from a private RNG."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, vocab, (count,), generator=g)
    strides = torch.randint(1, 4, (count,), generator=g)
    positions = torch.arange(LENGTH)
    return [((a + k * positions) % vocab).tolist() for a, k in zip(starts, strides)]


def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``"0" ... "29"`` (ids 2 ... 31), built in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<eos>": 0, "<unk>": 1, **{str(i): i + 2 for i in range(VOCAB - 2)}}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=inner, eos_token="<eos>", pad_token="<eos>", unk_token="<unk>"
    )


@dataclass
class Read:
    """One forward of one target: what it read, in which mode, at which step."""

    name: str
    training: bool
    step: int
    weight: Tensor  # a copy of the tensor the forward read
    is_clean_object: bool  # the forward read the stored Parameter itself


class _Record:
    """The observing pre-hook of one target (a small class, so the model still pickles)."""

    def __init__(self, observer: Observer, name: str):
        self.observer = observer
        self.name = name

    def __call__(self, module: nn.Module, args: Any) -> None:
        weight = module.weight
        self.observer.reads.append(
            Read(
                self.name,
                module.training,
                self.observer.flat.num_steps,
                weight.detach().clone(),
                weight is self.observer.stored[self.name],
            )
        )


class Observer:
    """Records what every target's forward reads (see the module docstring).

    Build it right after the FlatPerturb: its hooks must come after flatopt's.
    """

    def __init__(self, flat: flatopt.FlatPerturb, model: nn.Module):
        self.flat = flat
        self.reads: list[Read] = []
        modules = dict(model.named_modules())
        self.stored: dict[str, Tensor] = {}
        self.clean: dict[str, Tensor] = {}
        self._handles = []
        for name, _ in flat.targets:
            # peft's LoRA layer calls its base layer as a module: flatopt's hooks sit there.
            module = modules[name].get_base_layer()
            weight = module.weight
            self.stored[name] = weight
            self.clean[name] = weight.detach().clone()
            self._handles.append(module.register_forward_pre_hook(_Record(self, name)))

    @property
    def train_reads(self) -> list[Read]:
        return [r for r in self.reads if r.training]

    @property
    def eval_reads(self) -> list[Read]:
        return [r for r in self.reads if not r.training]

    def perturbed(self) -> list[Read]:
        """The reads that saw something other than the clean W."""
        return [r for r in self.reads if not bits_equal(r.weight, self.clean[r.name])]

    def counts(self) -> dict[str, int]:
        """Training and evaluation reads, and how many of each saw W + ε."""
        perturbed = self.perturbed()
        return {
            "train": len(self.train_reads),
            "train_perturbed": sum(r.training for r in perturbed),
            "eval": len(self.eval_reads),
            "eval_perturbed": sum(not r.training for r in perturbed),
        }

    def check(self, train: int, eval: int, steps: int) -> dict[str, int]:
        """Every training read saw W + ε of its step, every eval read the clean W object.

        ``train`` and ``eval`` are the expected numbers of reads (forwards x targets), ``steps``
        the number of optimizer steps the training reads span: ε is one per step and target.
        """
        counts = self.counts()
        assert (counts["train"], counts["eval"]) == (train, eval), counts
        for read in self.eval_reads:
            assert read.is_clean_object, f"eval forward of {read.name} read a copy of W"
            assert bits_equal(read.weight, self.clean[read.name]), f"eval read of {read.name}"
        for read in self.train_reads:
            clean = self.clean[read.name]
            assert not read.is_clean_object, f"training forward of {read.name} read the clean W"
            assert read.weight.dtype == clean.dtype and read.weight.shape == clean.shape
            assert not torch.equal(read.weight, clean), f"{read.name} read W at step {read.step}"
        # One ε per (step, target): equal within a step, different across steps.
        by_key: dict[tuple[int, str], Tensor] = {}
        for read in self.train_reads:
            first = by_key.setdefault((read.step, read.name), read.weight)
            assert bits_equal(read.weight, first), f"{read.name}: two ε in step {read.step}"
        assert len(by_key) == steps * TARGETS, sorted({s for s, _ in by_key})
        for name in self.clean:
            draws = [w for (s, n), w in sorted(by_key.items()) if n == name]
            for a, b in zip(draws, draws[1:]):
                assert not torch.equal(a, b), f"{name}: the same ε in two steps"
        return counts

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def assert_same_reads(got: list[Read], want: list[Read]) -> None:
    """Two runs' forwards read bitwise the same tensors, target by target, in the same order."""
    assert len(got) == len(want), (len(got), len(want))
    for index, (a, b) in enumerate(zip(got, want)):
        assert (a.name, a.training, a.step) == (b.name, b.training, b.step), index
        assert bits_equal(a.weight, b.weight), f"read {index} ({a.name}, step {a.step}) differs"


def assert_same_tensors(got: list[Tensor], want: list[Tensor]) -> None:
    assert len(got) == len(want)
    for index, (a, b) in enumerate(zip(got, want)):
        assert bits_equal(a.detach(), b.detach()), f"tensor {index} differs"


class Frozen:
    """The frozen tensors of a model, to check they come back bitwise, version-identical."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.names = frozen_names(model)
        self.before = snapshot(model)
        assert len(self.names) > TARGETS

    def check(self) -> None:
        assert_untouched(self.model, self.before, self.names)


# flatopt's warnings all speak of perturbing: "No target layer ran ...", "... auto=True".
_FLATOPT = re.compile(r"perturb|auto=True|FlatPerturb|flatopt", re.IGNORECASE)


@contextmanager
def recorded_warnings() -> Iterator[list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def flatopt_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if _FLATOPT.search(str(w.message))]
