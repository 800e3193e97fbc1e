"""flatopt: exact, seed-only Flat-LoRA for any torch optimizer and any LoRA implementation.

Example:
    >>> import torch
    >>> import flatopt
    >>> from flatopt.lora import add_lora
    >>> net = add_lora(torch.nn.Sequential(torch.nn.Linear(8, 8)), ["0"], rank=2)
    >>> inner = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad])
    >>> opt = flatopt.FlatPerturb(inner, net, sigma=0.05, total_steps=10)
    >>> opt.targets
    [('0', (8, 8))]
"""

from . import bilora, integrations, lora, noise, reference, sam
from ._arming import remove_hooks
from .adapters import Target, dense, register_adapter, unregister_adapter
from .bilora import BiLoRA
from .noise import LowRank
from .perturb import FlatPerturb, unwrap
from .sam import LoRASAM
from .sharpness import Sharpness, sharpness

__all__ = [
    "BiLoRA",
    "FlatPerturb",
    "LoRASAM",
    "LowRank",
    "Sharpness",
    "Target",
    "bilora",
    "dense",
    "integrations",
    "lora",
    "noise",
    "reference",
    "register_adapter",
    "remove_hooks",
    "sam",
    "sharpness",
    "unregister_adapter",
    "unwrap",
]

__version__ = "0.1.0"
