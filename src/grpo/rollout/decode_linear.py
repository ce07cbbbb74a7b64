"""The decode step's linear layers on CPU through the compiled kernel of `decode_linear.c`.

A step multiplies a few rows (the live rows of a round, 16 at G = 8 and two prompts) by every weight of the
model, each streamed from memory once: there oneDNN's and BLAS's kernels wait on the stream. The kernel packs a
weight in blocks of `kernel_lanes()` outputs, one sequential stream each, prefetched ahead, and fuses what
follows the multiply: the bias, the residual addition, a gated MLP's silu(gate) * up, and what precedes it, an
RMSNorm's remaining factor. A whole SmolLM2-135M decode step at 16 rows (`benchmarks/decode_step.py --linears
--size smollm2 --prompts 2`, layer by layer): 30.9-35.0 ms against 44.0-48.0 with oneDNN's packed weights.

`pack(linears, input_scale, gated)` lays float32 (out, in) weights out, once per round; `linear(x, packed)`
multiplies. A row's outputs are summed in one order whatever the number of rows or threads, so a completion's
logits do not depend on the rows decoded beside it (tested).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from grpo.cpu_kernels import INT, POINTER, STRIDE, entry, library

STORE, ADD, GATED_SILU = 0, 1, 2  # the kernel's epilogues (decode_linear.c)


@dataclass
class PackedLinear:
    """A weight (and bias) in the kernel's layout: `blocks` (out / lanes, in, lanes), zero-padded; `gated`: the
    gate and up projections of a gated MLP, their blocks interleaved, `out_features` counting one of them."""

    blocks: torch.Tensor
    bias: torch.Tensor | None
    out_features: int
    gated: bool = False

    @property
    def dtype(self) -> torch.dtype:
        return self.blocks.dtype


def pack(linears: list[tuple[torch.Tensor, torch.Tensor | None]], input_scale: torch.Tensor | None = None,
         gated: bool = False) -> PackedLinear:
    """The (out, in) weights and (out,) biases of `linears` in the kernel's layout, each weight's columns
    multiplied by `input_scale` (in,) if given: one projection whose outputs are theirs concatenated, or
    (`gated`) the gate and up projections of silu(gate) * up, their blocks interleaved.

    Each weight goes into its blocks in one pass (packing is redone every round, as the weights change), unless
    a linear other than the last ends inside a block: then the weights are concatenated first."""
    lanes = kernel_lanes()
    weights, biases = [w.detach() for w, _ in linears], [b for _, b in linears]
    if not gated and any(w.size(0) % lanes for w in weights[:-1]):
        biases = [None if all(b is None for b in biases) else torch.cat(
            [w.new_zeros(w.size(0)) if b is None else b for w, b in zip(weights, biases)])]
        weights = [torch.cat(weights)]
    columns = 2 if gated else 1  # packed blocks per block of outputs
    in_features = weights[0].size(1)
    out_features = weights[0].size(0) if gated else sum(w.size(0) for w in weights)
    block_count = -(-out_features // lanes)
    grouped = weights[0].new_empty((block_count, columns, in_features, lanes), dtype=torch.float32)
    packed_bias = None if all(b is None for b in biases) else grouped.new_zeros((block_count, columns, lanes))
    scale = None if input_scale is None else input_scale.detach().float().contiguous()
    start = 0
    for index, (weight, bias) in enumerate(zip(weights, biases)):
        column, size = (index, weight.size(0)) if gated else (0, weight.size(0))
        first = 0 if gated else start // lanes
        weight = weight.float().contiguous()
        packer()(weight.data_ptr(), weight.stride(0), size, in_features, None if scale is None else scale.data_ptr(),
                 grouped[first, column].data_ptr(), columns * in_features * lanes, torch.get_num_threads())
        if bias is not None:
            flat = torch.nn.functional.pad(bias.detach().float(), (0, -size % lanes)).view(-1, lanes)
            packed_bias[first:first + flat.size(0), column] = flat
        start += size
    bias = None if packed_bias is None else packed_bias.flatten()
    return PackedLinear(grouped.flatten(0, 1), bias, out_features, gated=gated)


def linear(x: torch.Tensor, packed: PackedLinear, add_to: torch.Tensor | None = None,
           norm_eps: float | None = None) -> torch.Tensor:
    """x (rows, in) float32, its last dim contiguous, times `packed`: x W^T + b, or silu(x Wg^T + bg) *
    (x Wu^T + bu) for a gated pair. With `add_to` (rows, out), contiguous, the product is added to it in place
    and it is returned. With `norm_eps` each row of x is taken as x / sqrt(|x|^2 + norm_eps) (an RMSNorm whose
    weight and sqrt(in) are folded into W: `decoder.FoldedRMSNorm`)."""
    rows, in_features = x.shape
    if x.dtype != torch.float32 or in_features != packed.blocks.size(1):
        raise ValueError(f"decode_linear: x is {tuple(x.shape)} {x.dtype}, the weight takes float32 rows of "
                         f"{packed.blocks.size(1)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    if add_to is None:
        out = x.new_empty((rows, packed.out_features))
        epilogue = GATED_SILU if packed.gated else STORE
    else:
        if packed.gated or add_to.shape != (rows, packed.out_features) or add_to.stride(-1) != 1 or (
                add_to.dtype != torch.float32):
            raise ValueError(f"decode_linear: cannot add a {rows} x {packed.out_features} product into "
                             f"{tuple(add_to.shape)} {add_to.dtype} (strides {add_to.stride()})")
        out, epilogue = add_to, ADD
    failed = kernel()(x.data_ptr(), x.stride(0), packed.blocks.data_ptr(),
                      None if packed.bias is None else packed.bias.data_ptr(), out.data_ptr(), out.stride(0), rows,
                      in_features, packed.out_features, epilogue, -1.0 if norm_eps is None else norm_eps,
                      torch.get_num_threads())
    if failed:
        raise MemoryError(f"decode_linear: no memory for the norms of {rows} rows")
    return out


def available(x_dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> bool:
    """Whether the kernel is built and takes float32 on `device` (CPU)."""
    return x_dtype == torch.float32 and torch.device(device).type == "cpu" and kernel() is not None


@functools.cache
def kernel() -> Callable[..., int] | None:
    return entry("grpo_decode_linear", [POINTER, STRIDE, POINTER, POINTER, POINTER, STRIDE, *[INT] * 4,
                                        ctypes.c_float, INT], INT)


@functools.cache
def packer() -> Callable[..., None] | None:
    return entry("grpo_decode_linear_pack", [POINTER, STRIDE, INT, INT, POINTER, POINTER, STRIDE, INT])


@functools.cache
def kernel_lanes() -> int:
    """The block width the library was built with: 16 floats with AVX-512, 8 otherwise."""
    compiled = library()
    return 16 if compiled is None else int(compiled.grpo_decode_linear_lanes())
