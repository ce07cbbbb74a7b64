"""A Llama-family layer's element-wise steps fused into compiled CPU kernels for the training forward and backward.

Between its matrix multiplies a transformers Llama layer runs RMSNorm, SwiGLU and the rotary embedding as chains
of small torch operations, each a pass over memory with its own backward, all recomputed once more under
gradient checkpointing. Here each is one autograd function over one compiled kernel (`fused_ops.c`) each way,
saving only what its backward reads:

    rms_norm(x, w)      y = w * x / sqrt(mean(x^2) + eps)       saves x and 1 / rms per row
    swiglu(g, u)        y = silu(g) * u = g sigmoid(g) u        saves g and u
    rotary(q, k, c, s)  x -> x c + rotate_half(x) s             saves c and s

Within `fused_ops(body)` the RMSNorms, MLPs and attention of a llama / mistral / qwen2 / qwen3 body compute
through them; outside it the model is transformers' own. Each falls back to transformers' computation for what
the kernels do not cover (not float32 on CPU, an MLP whose activation is not SiLU, a rotary embedding applied
along another dim), and the scope changes nothing where the kernels cannot be built (`cpu_kernels.library`) or
for another model. The values equal transformers' to float32 rounding (tested: outputs and every gradient, with
and without gradient checkpointing). Measured on SmolLM2-135M, one micro-batch of 8 x 64 completion tokens behind
a 35-token prompt, 2 CPU cores (`benchmarks/fused_ops.py`, the two alternating in one process): forward + backward
2.34 -> 2.19 s and 2.27 -> 2.13 s (1.07x) with gradient checkpointing, 1.91 -> 1.74 s (1.10x) without.
"""

from __future__ import annotations

import ctypes
import functools
import sys
import types
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch

from grpo.cpu_kernels import INT, POINTER, STRIDE, entry
from grpo.models import LLAMA_FAMILY, SILU_ACTIVATIONS, STANDARD_RMS_NORMS


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2 over the last dim) + eps), as transformers' LlamaRMSNorm (float32 throughout).

    Backward, with s = 1 / sqrt(mean(x^2) + eps) per row and n the last dim:
        dx = s (dy w) - x s^3 mean(dy w x),    dw = sum over rows of dy x s.
    """
    if not _fusable(x, weight) or x.size(-1) != weight.numel():
        h = x.float()
        return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return _RMSNorm.apply(x, weight, eps)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, silu(g) = g sigmoid(g). Backward, with s = sigmoid(g):
        d_up = dy g s,    d_gate = dy up s (1 + g (1 - s)).
    """
    if not _fusable(gate, up) or gate.shape != up.shape:
        return torch.nn.functional.silu(gate) * up
    return _SwiGLU.apply(gate, up)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' apply_rotary_pos_emb: x cos + rotate_half(x) sin for x in (q, k), shaped (batch, heads,
    length, dim), cos and sin (batch or 1, length, dim); rotate_half(x1, x2) = (-x2, x1) over the halves of dim.
    Its transpose (the backward) is dy cos + (s2 dy2, -s1 dy1) with (s1, s2) the halves of sin."""
    if unsqueeze_dim != 1 or not _rotary_shapes(q, k, cos, sin) or not _fusable(q, k, cos, sin):
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return (q * cos) + (_rotate_half(q) * sin), (k * cos) + (_rotate_half(k) * sin)
    return _Rotary.apply(q, k, cos, sin)


@contextmanager
def fused_ops(body: torch.nn.Module) -> Iterator[None]:
    """Within it, `body`'s (a float32 llama-family decoder's on CPU) RMSNorms, SiLU MLPs and rotary embeddings
    compute through the fused kernels; each module's own forward is back on exit. A backward that recomputes
    layers (gradient checkpointing) must run inside the same scope, as the trainer does. Modules with a forward
    of their own already set (accelerate's hooks) are left alone."""
    config = getattr(body, "config", None)
    weight = next(body.parameters(), None)
    if (getattr(config, "model_type", None) not in LLAMA_FAMILY or _kernel("grpo_swiglu_forward") is None
            or weight is None or weight.device.type != "cpu" or weight.dtype != torch.float32):
        yield  # the kernels are float32 CPU code: a GPU or bfloat16 model keeps transformers' modules (and hub kernels)
        return
    with ExitStack() as stack:
        for module in body.modules():
            name = type(module).__name__
            if "forward" in vars(module):
                continue
            if name in STANDARD_RMS_NORMS:
                stack.enter_context(forward_replaced(module, _norm_forward))
            elif name.endswith("MLP") and type(getattr(module, "act_fn", None)).__name__ in SILU_ACTIVATIONS and all(
                    hasattr(module, part) for part in ("gate_proj", "up_proj", "down_proj")):
                stack.enter_context(forward_replaced(module, _mlp_forward))
            elif name.endswith("Attention"):
                stack.enter_context(_rotary_replaced(sys.modules[type(module).__module__]))
        yield


# ---- the autograd functions ----------------------------------------------------------------------------------
class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x, weight = x.contiguous(), weight.contiguous()
        rows, n = x.numel() // x.size(-1), x.size(-1)
        y, inv_rms = torch.empty_like(x), x.new_empty(x.shape[:-1])
        _kernel("grpo_rms_norm_forward")(x.data_ptr(), weight.data_ptr(), y.data_ptr(), inv_rms.data_ptr(), rows, n,
                                         eps, torch.get_num_threads())
        ctx.save_for_backward(x, weight, inv_rms)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:
        x, weight, inv_rms = ctx.saved_tensors
        dy = dy.contiguous()
        dx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        dw = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        if _kernel("grpo_rms_norm_backward")(
                dy.data_ptr(), x.data_ptr(), weight.data_ptr(), inv_rms.data_ptr(), _pointer(dx), _pointer(dw),
                x.numel() // x.size(-1), x.size(-1), torch.get_num_threads()):
            raise MemoryError("rms_norm backward: no memory for its per-thread sums")
        return dx, dw, None


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate, up = gate.contiguous(), up.contiguous()
        out = torch.empty_like(gate)
        _kernel("grpo_swiglu_forward")(gate.data_ptr(), up.data_ptr(), out.data_ptr(), gate.numel(),
                                       torch.get_num_threads())
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors
        dy = dy.contiguous()
        d_gate, d_up = torch.empty_like(gate), torch.empty_like(up)
        _kernel("grpo_swiglu_backward")(dy.data_ptr(), gate.data_ptr(), up.data_ptr(), d_gate.data_ptr(),
                                        d_up.data_ptr(), gate.numel(), torch.get_num_threads())
        return d_gate, d_up


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = cos.contiguous(), sin.contiguous()
        ctx.save_for_backward(cos, sin)
        return _rotated(q, cos, sin, False), _rotated(k, cos, sin, False)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dq: torch.Tensor, dk: torch.Tensor) -> tuple[Any, ...]:
        cos, sin = ctx.saved_tensors
        return _rotated(dq, cos, sin, True), _rotated(dk, cos, sin, True), None, None


def _rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, transpose: bool) -> torch.Tensor:
    """x (B, H, L, D) rotated (or by the transpose), read at its own strides (transformers' q and k are (B, L, H,
    D) tensors transposed); the result is (B, L, H, D) memory seen as (B, H, L, D), the layout it came in."""
    batch, heads, length, dim = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = x.new_empty((batch, length, heads, dim))
    _kernel("grpo_rotary")(x.data_ptr(), x.stride(0), x.stride(2), x.stride(1), cos.data_ptr(), sin.data_ptr(),
                           0 if cos.size(0) == 1 else cos.stride(0), cos.stride(1), out.data_ptr(), batch, length,
                           heads, dim, int(transpose), torch.get_num_threads())
    return out.transpose(1, 2)


# ---- the scope's replacements --------------------------------------------------------------------------------
def _norm_forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


@contextmanager
def forward_replaced(module: torch.nn.Module, forward: Callable[..., Any]) -> Iterator[None]:
    """`forward` bound as `module`'s own forward within it; the class's forward is back on exit."""
    module.forward = types.MethodType(forward, module)
    try:
        yield
    finally:
        del module.forward


@contextmanager
def _rotary_replaced(modeling: types.ModuleType) -> Iterator[None]:
    """The modeling module's apply_rotary_pos_emb (its attention's forward looks it up at each call) replaced;
    entered once per module however many layers use it (the ExitStack restores in reverse order)."""
    original = getattr(modeling, "apply_rotary_pos_emb", None)
    if original is None or original is rotary:
        yield
        return
    modeling.apply_rotary_pos_emb = rotary
    try:
        yield
    finally:
        modeling.apply_rotary_pos_emb = original


# ---- helpers -------------------------------------------------------------------------------------------------
def _fusable(*tensors: torch.Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors) and (
        _kernel("grpo_swiglu_forward") is not None)


def _rotary_shapes(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """q and k (B, H, L, D) with D even, cos and sin (1 or B, L, D): what the kernel reads."""
    return (q.dim() == k.dim() == 4 and cos.dim() == 3 and cos.shape == sin.shape and q.size(-1) % 2 == 0
            and cos.size(-1) == q.size(-1) == k.size(-1) and cos.size(0) in (1, q.size(0))
            and cos.size(1) == q.size(2) == k.size(2) and k.size(0) == q.size(0))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.size(-1) // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


FLOAT, LONG = ctypes.c_float, ctypes.c_long
SIGNATURES = {
    "grpo_rms_norm_forward": ([POINTER, POINTER, POINTER, POINTER, LONG, INT, FLOAT, INT], None),
    "grpo_rms_norm_backward": ([POINTER, POINTER, POINTER, POINTER, POINTER, POINTER, LONG, INT, INT], INT),
    "grpo_swiglu_forward": ([POINTER, POINTER, POINTER, LONG, INT], None),
    "grpo_swiglu_backward": ([POINTER, POINTER, POINTER, POINTER, POINTER, LONG, INT], None),
    "grpo_rotary": ([POINTER, STRIDE, STRIDE, STRIDE, POINTER, POINTER, STRIDE, STRIDE, POINTER, INT, INT, INT,
                     INT, INT, INT], None),
}


@functools.cache
def _kernel(name: str) -> Any:
    """The compiled entry point `name`, or None where the CPU kernels cannot be built."""
    return entry(name, *SIGNATURES[name])
