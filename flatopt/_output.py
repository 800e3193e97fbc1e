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

__all__ = ["dequantized", "is_plain", "layer_op"]


def is_plain(weight: Tensor) -> bool:
    """A plain floating tensor, to which ε can be added directly."""
    return type(weight) in (torch.Tensor, nn.Parameter) and weight.is_floating_point()


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


def layer_op(module: nn.Module, weight: Tensor, transposed: bool = False) -> Optional[_Op]:
    """The functional form of ``module`` in its weight, for the kinds flatopt knows, or None.

    ε arrives in the weight's storage layout; a linear weight stored ``(fan_in, out)`` is
    applied transposed."""
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.transposed or module.padding_mode != "zeros":
            return None
        dims = weight.ndim - 2
        conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
        grad = (nn.grad.conv1d_input, nn.grad.conv2d_input, nn.grad.conv3d_input)[dims - 1]
        options = (module.stride, module.padding, module.dilation, module.groups)
        return _Op(
            lambda x, eps: conv(x, eps, None, *options),
            lambda grad_out, eps, shape: grad(shape, eps, grad_out, *options),
        )
    if isinstance(module, nn.Embedding):
        return _Op(lambda x, eps: F.embedding(x, eps), None)
    if weight.ndim == 2 and transposed:
        return _Op(lambda x, eps: x @ eps, lambda grad_out, eps, shape: grad_out @ eps.t())
    if weight.ndim == 2:
        return _Op(lambda x, eps: F.linear(x, eps), lambda grad_out, eps, shape: grad_out @ eps)
    return None


class _OutputNoise(torch.autograd.Function):
    """f(x; ε) with ε regenerated in backward: nothing weight-sized is saved."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, epsilon: Callable[[torch.dtype], Tensor], op: _Op, dtype):
        ctx.epsilon, ctx.op, ctx.dtype, ctx.shape = epsilon, op, dtype, x.shape
        return op.forward(x, epsilon(dtype))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], None, None, None]:
        if not ctx.needs_input_grad[0] or ctx.op.input_grad is None:
            return None, None, None, None
        return ctx.op.input_grad(grad, ctx.epsilon(ctx.dtype), ctx.shape), None, None, None


class OutputSwap:
    """One armed quantized target: adds f(x; ε) to each output of its module."""

    def __init__(self, target: Any, epsilon: Callable[[torch.dtype], Tensor], op: _Op):
        self.target = target
        self.epsilon = epsilon
        self.op = op
        self.calls = 0

    def pre(self, module: nn.Module, args: Any) -> None:
        self.calls += 1

    def post(self, module: nn.Module, args: Any, output: Any) -> Any:
        if output is None or not args:
            return output
        if not isinstance(output, Tensor):
            raise TypeError(
                f"{type(module).__name__} returned {type(output).__name__}; flatopt's output-side "
                "noise for quantized weights needs a layer that returns one tensor."
            )
        x = args[0]
        dtype = output.dtype if output.is_floating_point() else torch.get_default_dtype()
        return output + _OutputNoise.apply(x, self.epsilon, self.op, dtype)

    def unwind(self) -> None:
        pass
