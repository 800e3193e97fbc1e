"""The output-side path, for base weights that cannot be added to (quantized: NF4, int8, …).

W + ε cannot be formed when W is quantized, but the layer is linear in its weight, so
f(x; W + ε) = f(x; W) + f(x; ε). The forward hook adds f(x; ε) to the layer's output, and a
small autograd function regenerates ε from the seed in backward instead of keeping it. The
quantized weight itself is never touched.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["OutputNoise", "dequantized", "is_dtensor", "is_plain", "layer_op"]


def is_plain(weight: Tensor) -> bool:
    """A plain floating tensor (or ``nn.Parameter`` subclass), to which ε can be added."""
    kind = type(weight)
    return (kind is torch.Tensor or issubclass(kind, nn.Parameter)) and weight.is_floating_point()


def is_dtensor(value: object) -> bool:
    """A ``torch.distributed`` DTensor (sharded or replicated), recognised without importing it."""
    return type(value).__name__ == "DTensor" and hasattr(value, "full_tensor")


def dequantized(weight: Tensor) -> Optional[Tensor]:
    """W as a floating tensor (for its row norms), or None when it cannot be read as one."""
    if is_plain(weight):
        return weight
    if weight.is_quantized:  # torch's own quantized tensors (qint8, quint8, …)
        return weight.dequantize()
    if type(weight) in (torch.Tensor, nn.Parameter):  # a plain integer tensor: no scale known
        return None
    read = getattr(weight, "get_original_weight", None)  # e.g. torchao's NF4Tensor
    if callable(read):
        return read()
    if weight.is_floating_point():  # a floating tensor subclass that converts on .to()
        return weight.to(torch.float32)
    return None


class _Op:
    """How a layer applies a weight to its input: f(x; ε), and the gradient of that for x."""

    def __init__(self, forward: Callable[..., Tensor], input_grad: Optional[Callable[..., Tensor]]):
        self.forward = forward
        self.input_grad = input_grad


def _vjp(forward: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """The input gradient of a layer that is linear in x, by autograd through ``forward``.

    f is linear in x, so the gradient does not depend on x's values: zeros stand in for x.
    """

    def input_grad(grad_out: Tensor, eps: Tensor, x_like: Tensor) -> Tensor:
        with torch.enable_grad():
            x = torch.zeros_like(x_like, requires_grad=True)
            return torch.autograd.grad(forward(x, eps), x, grad_out)[0]

    return input_grad


def layer_op(module: nn.Module, weight: Tensor, transposed: bool = False) -> Optional[_Op]:
    """The functional form of ``module`` in its weight, for the kinds flatopt knows, or None.

    ε arrives in the weight's storage layout; a linear weight stored ``(fan_in, out)`` is
    applied transposed."""
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.transposed or module.padding_mode != "zeros":
            return None
        conv = (F.conv1d, F.conv2d, F.conv3d)[weight.ndim - 3]
        options = (module.stride, module.padding, module.dilation, module.groups)

        def forward(x: Tensor, eps: Tensor) -> Tensor:
            return conv(x, eps, None, *options)

        return _Op(forward, _vjp(forward))
    if isinstance(module, nn.Embedding):
        return _Op(lambda x, eps: F.embedding(x, eps), None)
    if weight.ndim == 2 and transposed:
        return _Op(lambda x, eps: x @ eps, lambda grad_out, eps, x: grad_out @ eps.t())
    if weight.ndim == 2:
        return _Op(lambda x, eps: F.linear(x, eps), lambda grad_out, eps, x: grad_out @ eps)
    return None


class OutputNoise(torch.autograd.Function):
    """f(x; ε) with ε regenerated in backward: nothing weight-sized is saved. ``x`` is in
    ``dtype``, the layer's output dtype, which ε is drawn in."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, epsilon: Callable[[torch.dtype], Tensor], op: _Op, dtype):
        ctx.epsilon, ctx.op, ctx.dtype = epsilon, op, dtype
        ctx.x_like = torch.empty((), dtype=x.dtype, device=x.device).expand(x.shape)
        return op.forward(x, epsilon(dtype))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], None, None, None]:
        if not ctx.needs_input_grad[0] or ctx.op.input_grad is None:
            return None, None, None, None
        return ctx.op.input_grad(grad, ctx.epsilon(ctx.dtype), ctx.x_like), None, None, None
