"""A decode step's layers in one call into the compiled kernels (`decode_layers.c`).

At a step's few rows each kernel call is short (SmolLM2 at 16 rows: 30 layers x 5 kernels in ~24 ms), so the
Python and ctypes around them cost: 2 ms of a 34 ms step (`benchmarks/decode_step.py --linears`: 16 rows 34.4 ->
32.4 ms at 64 completion tokens; tiny model, 32 rows, 2.5 -> 2.1 ms). Where a `LeanDecoder`'s layers are all in the
kernel layout (float32 copies on CPU, norms folded, rotary pairs adjacent, a gated SiLU MLP, no per-head q/k
norms) and the cache is `GroupKV` with its attention kernel, `DecodeLayers` runs every layer in one C call: the
same kernels in the same order, plus the rotation in C. The numbers equal the layer-by-layer step up to the
rotation's rounding (a fused multiply-add in C), tested against transformers' forward like every other path.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from typing import Any

import torch

from grpo.cpu_kernels import INT, POINTER, STRIDE, entry
from grpo.rollout.kv_cache import GroupKV

PER_LAYER = 10  # pointers a layer passes (decode_layers.c)


class DecodeLayers:
    """The layers of a `LeanDecoder` for one call per step; `of(decoder)` is None where they do not qualify."""

    def __init__(self, layers: list[Any], heads: int, kv_heads: int, head_dim: int, scale: float):
        self.heads, self.kv_heads, self.head_dim, self.scale = heads, kv_heads, head_dim, scale
        self.hidden = layers[0].o.weight.out_features
        self.intermediate = layers[0].gate_up[0].weight.out_features
        packed = [(layer.qkv[0].weight, layer.o.weight, layer.gate_up[0].weight, layer.down.weight)
                  for layer in layers]
        self.packed = packed  # held: the table below points into these tensors
        self.weights = [[p for linear in linears for p in (linear.blocks.data_ptr(), _pointer(linear.bias))]
                        for linears in packed]
        self.norm_eps = (ctypes.c_float * (2 * len(layers)))(
            *[eps for layer in layers for eps in (layer.qkv[0].norm_eps, layer.gate_up[0].norm_eps)])
        self._bound: tuple[GroupKV, Any] | None = None  # the cache whose layers' pointers are in the table

    @classmethod
    def of(cls, decoder: Any) -> DecodeLayers | None:
        """For `decoder`'s layers, or None unless each is four kernel-layout projections (q/k/v and gate/up fused,
        their norms in the kernel) with no per-head q/k norms, and the library is built."""
        if not decoder.folded:
            return None
        for layer in decoder.layers:
            projections = [*layer.qkv, layer.o, *layer.gate_up, layer.down]
            if (len(projections) != 4 or any(p.layout != "kernel" for p in projections) or layer.q_norm is not None
                    or not layer.gate_up[0].gated or layer.qkv[0].norm_eps is None
                    or layer.gate_up[0].norm_eps is None):
                return None
        if kernel() is None:  # kernel-layout projections imply the library was built; checked all the same
            return None
        return cls(decoder.layers, decoder.heads, decoder.kv_heads, decoder.head_dim, decoder.scaling)

    def runs(self, kv: Any) -> bool:
        """Whether a step over `kv` goes through here: the shared prompt cache with its attention kernel."""
        return isinstance(kv, GroupKV) and kv.kernel

    def __call__(self, x: torch.Tensor, rotation: torch.Tensor, kv: GroupKV) -> torch.Tensor:
        """x (rows, hidden) float32 contiguous, updated in place through every layer and returned; `rotation`
        (rows, head_dim / 2) complex: each row's position's; the step's keys and values go into `kv`."""
        rows = x.size(0)
        prompt, own = kv.prompt_kv[0], kv.own_kv[0]
        width = (self.heads + 2 * self.kv_heads) * self.head_dim
        qkv, attended = x.new_empty((rows, width)), x.new_empty((rows, self.heads * self.head_dim))
        gated = x.new_empty((rows, self.intermediate))
        turn = torch.view_as_real(rotation).contiguous()
        failed = kernel()(len(self.weights), self._pointers(kv), self.norm_eps, x.data_ptr(), rows, self.hidden,
                          self.heads, self.kv_heads, self.head_dim, self.intermediate, turn.data_ptr(),
                          *prompt.stride()[:3], prompt.size(2), kv.prompt_start.data_ptr(), *own.stride()[:3],
                          kv.length + 1, kv.rows.data_ptr(), kv.g, self.scale, qkv.data_ptr(), attended.data_ptr(),
                          gated.data_ptr(), torch.get_num_threads())
        if failed:
            raise MemoryError(f"decode_layers: no memory for the norms of {rows} rows")
        return x

    def _pointers(self, kv: GroupKV) -> Any:
        """The (layers, PER_LAYER) pointer table with `kv`'s caches, built once per cache (a round's)."""
        if self._bound is None or self._bound[0] is not kv:
            if any(c.stride() != kv.prompt_kv[0].stride() for c in kv.prompt_kv) or any(
                    c.stride() != kv.own_kv[0].stride() for c in kv.own_kv):
                raise ValueError("decode_layers: the layers' caches must share one layout")
            table = [p for weights, prompt, own in zip(self.weights, kv.prompt_kv, kv.own_kv)
                     for p in (*weights, prompt.data_ptr(), own.data_ptr())]
            self._bound = (kv, (ctypes.c_void_p * len(table))(*table))
        return self._bound[1]


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


@functools.cache
def kernel() -> Callable[..., int] | None:
    """The compiled entry point, or None where the CPU kernels cannot be built (`cpu_kernels.library`)."""
    return entry("grpo_decode_layers", [INT, POINTER, POINTER, POINTER, *[INT] * 6, POINTER,  # layers, x, shapes
                                        STRIDE, STRIDE, STRIDE, INT, POINTER,  # the prompts' cache and starts
                                        STRIDE, STRIDE, STRIDE, INT, POINTER, INT,  # the rows' own cache
                                        ctypes.c_float, POINTER, POINTER, POINTER, INT], INT)  # scratch, threads
