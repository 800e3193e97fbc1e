"""Small models shared by the benchmark scripts.

``TinyGPT`` is a GPT-style decoder: token and position embeddings, pre-LN blocks with causal
self-attention (separate q, k, v, o projections) and a 4x-wide GELU MLP (fc1, fc2), a final
LayerNorm and an LM head. ``BLOCK_LINEARS`` names every linear layer inside the blocks, for
``flatopt.lora.add_lora``.

``teaching_mlp`` is the teaching-size model: ``depth`` × (``Linear(width, width)`` + GELU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BLOCK_LINEARS", "Block", "TinyGPT", "teaching_mlp"]

BLOCK_LINEARS = ("q", "k", "v", "o", "fc1", "fc2")


class Block(nn.Module):
    """One pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}.")
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.o = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def _split(self, x: Tensor) -> Tensor:
        batch, seq, width = x.shape
        return x.view(batch, seq, self.heads, width // self.heads).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln1(x)
        q, k, v = self._split(self.q(h)), self._split(self.k(h)), self._split(self.v(h))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(attn.transpose(1, 2).reshape(x.shape))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyGPT(nn.Module):
    """A GPT-style decoder returning next-token logits of shape ``(batch, seq, vocab)``."""

    def __init__(self, vocab: int, width: int, layers: int, heads: int, max_seq: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(max_seq, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens) + self.pos(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def teaching_mlp(width: int = 64, depth: int = 4) -> nn.Sequential:
    """``depth`` × (``nn.Linear(width, width)`` + GELU), initialised from torch's global RNG."""
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*layers)
