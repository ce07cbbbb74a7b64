"""A PEFT LoRA linear's training forward and backward as one autograd function with in-place accumulation.

PEFT computes a LoRA linear as  y = base(x) + lora_B(lora_A(dropout(x))) * scaling:  two extra passes over the
(tokens, out) output (the scaling and the sum) each way, and its small products in whatever orientation autograd
picks. With a frozen base weight W, rank-r factors A (r, in) and B (out, r) and s the scaling, here:

    forward     t = x A^T                     (tokens, r)
                y = x W^T + b,  y += s t B^T  (in place)
    backward    u = dy B                      (tokens, r: dL/dt short of s)
                dx = dy W,  dx += s u A       (in place)
                dA = s u^T x,   dB = s (t^T dy)^T

saving x and t. Within `lora_linears(model)` every plain LoRA linear of `model` (one active adapter, no dropout,
no DoRA or other variant, not merged, a frozen float32 `nn.Linear` base, unbiased factors) computes this way;
anything else keeps PEFT's forward. The values equal PEFT's to float32 rounding (tested: outputs and gradients,
with and without gradient checkpointing). Measured on SmolLM2-135M with LoRA r 16 on all linears, one checkpointed
micro-batch of 8 x 64 completion tokens behind a 35-token prompt, 2 CPU cores: see README, "LoRA".
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch

from grpo.fused_ops import forward_replaced


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """x W^T + b + scaling * (x A^T) B^T with W frozen: gradients for x, A and B only."""
    return _LoRALinear.apply(x, weight, bias, lora_a, lora_b, scaling)


class _LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
        rows = x.reshape(-1, x.size(-1))
        out = rows @ weight.t() if bias is None else torch.addmm(bias, rows, weight.t())
        down = rows @ lora_a.t()
        out.addmm_(down, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(rows, down, weight, lora_a, lora_b)
        ctx.scaling, ctx.shape = scaling, x.shape
        return out.view(*x.shape[:-1], weight.size(0))

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:
        rows, down, weight, lora_a, lora_b = ctx.saved_tensors
        scaling = ctx.scaling
        dy = dy.reshape(-1, dy.size(-1))
        grad_down = dy @ lora_b  # dL/d(x A^T), short of the scaling
        dx = None
        if ctx.needs_input_grad[0]:
            dx = (dy @ weight).addmm_(grad_down, lora_a, alpha=scaling).view(ctx.shape)
        # (r, tokens) @ (tokens, n) runs about twice as fast on CPU as the (n, tokens) @ (tokens, r) orientation
        d_a = (grad_down.t() @ rows).mul_(scaling) if ctx.needs_input_grad[3] else None
        d_b = (down.t() @ dy).mul_(scaling).t() if ctx.needs_input_grad[4] else None
        return dx, None, None, d_a, d_b, None


@contextmanager
def lora_linears(model: torch.nn.Module) -> Iterator[None]:
    """Within it, `model`'s plain LoRA linears (see the module docstring) compute through `lora_linear`; each
    module's own forward is back on exit. A backward that recomputes layers (gradient checkpointing) must run inside
    the same scope."""
    with ExitStack() as stack:
        for module in model.modules():
            if _plain_lora(module):
                stack.enter_context(forward_replaced(module, _lora_forward))
        yield


def _plain_lora(module: torch.nn.Module) -> bool:
    if type(module).__module__ != "peft.tuners.lora.layer" or type(module).__name__ != "Linear":
        return False
    if "forward" in vars(module) or module.disable_adapters or module.merged:
        return False
    adapters = [a for a in module.active_adapters if a in module.lora_A]
    if len(adapters) != 1 or adapters[0] in getattr(module, "lora_variant", {}):
        return False
    name = adapters[0]
    base, lora_a, lora_b = module.base_layer, module.lora_A[name], module.lora_B[name]
    weights = [base.weight, lora_a.weight, lora_b.weight]
    linears = (base, lora_a, lora_b)
    return (all(type(m) is torch.nn.Linear and not m._forward_hooks and not m._forward_pre_hooks for m in linears)
            and not base.weight.requires_grad and (base.bias is None or not base.bias.requires_grad)
            and lora_a.bias is None and lora_b.bias is None
            and isinstance(module.lora_dropout[name], torch.nn.Identity)
            and not getattr(module, "fan_in_fan_out", False)
            # plain parameters: not sharded (FSDP's DTensors, ZeRO-3's placeholders gathered by hooks)
            and all(type(w) is torch.nn.Parameter and w.dtype == torch.float32 and w.device.type == "cpu"
                    for w in weights))


def _lora_forward(self: torch.nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    name = next(a for a in self.active_adapters if a in self.lora_A)
    if args or kwargs or x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
        return type(self).forward(self, x, *args, **kwargs)
    return lora_linear(x, self.base_layer.weight, self.base_layer.bias, self.lora_A[name].weight,
                       self.lora_B[name].weight, self.scaling[name])
