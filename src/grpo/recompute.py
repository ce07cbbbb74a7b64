"""Which decoder layers recompute their forward in the backward (gradient checkpointing), micro-batch by micro-batch.

A checkpointed layer keeps only its input and runs its forward again in the backward. That pays where its
activations would raise the step's peak memory, and only there. Every step's backward ends with all trainable
gradients allocated (G bytes), so a step's peak is at least U + G, U the memory in use before it. A micro-batch
whose backward starts before its decoder layers' gradients exist (the first of a step; every one with
gradient_accumulation_steps=1) starts that backward holding

    U + H + R + L c + k (a - c)

when its top k layers keep their activations: H the gradients allocated before the layers' (the LM head's), R the
LM head's chunk (`LOGITS_CHUNK_BYTES`), L c the inputs the L checkpointed layers keep (c = tokens x hidden x bytes),
a a layer's activations (`models.activation_bytes`, an upper bound, plus what attention by a packed layout keeps,
`packing.GroupedAttention.kept_bytes`). With G_layers the decoder layers' gradients
(G = H + G_layers, or more), that stays within U + G while

    k <= (G_layers - R - L c) / (a - c)

so those k layers keep their activations without raising the peak of memory in use, and the backward skips their
recomputation. Through that backward (top layer first) memory moves from the kept activations to the gradients and
ends at U + G, as before. Micro-batches that start with the layers' gradients allocated (the rest of a step)
recompute every layer, as configured. On CPU the resident peak may gain up to the tensor cache's slack
(`allocator.py`): the blocks the kept activations leave stay mapped for reuse within it (`benchmarks/recompute.py`:
+15 MiB at 64 completion tokens, +58 at 20).

SmolLM2-135M, one group of 8 x 64 completion tokens behind a 35-token prompt (547 packed tokens, the micro-batch
of `benchmarks/compare_trl.py`): G_layers 425 MB, a 29.7 MB (its layers keep 22.7), c 1.3 MB: the first
micro-batch keeps 8 of 30 layers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from grpo.logprobs import LOGITS_CHUNK_BYTES
from grpo.models import activation_bytes, attention_widths, text_config


def layers_kept(room: int, tokens: int, config: Any, dtype_bytes: int, attention_bytes: int = 0) -> int:
    """k = floor((room - L c) / (a - c)), at least 0 and at most L - 1: how many of the top decoder layers may
    keep their activations, `room` the bytes of layer gradients still to be allocated less the LM head's chunk,
    a = activation_bytes(config, tokens) / L + attention_bytes (what a packed layout's attention keeps besides,
    `GroupedAttention.kept_bytes`), c = tokens x hidden x dtype_bytes. The bottom layer always recomputes: the
    model stays checkpointed, so the LM head keeps recomputing its chunks too (`logprobs`)."""
    text = text_config(config)
    layers = text.num_hidden_layers
    kept_input = tokens * text.hidden_size * dtype_bytes
    per_layer = activation_bytes(config, tokens, dtype_bytes) // layers + attention_bytes
    return max(0, min(layers - 1, (room - layers * kept_input) // max(per_layer - kept_input, 1)))


def checkpointed_layers(body: torch.nn.Module) -> list[torch.nn.Module]:
    """`body`'s decoder layers that gradient checkpointing recomputes, bottom to top."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in body.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]


def unallocated_gradient_bytes(modules: list[torch.nn.Module]) -> int:
    """Bytes of the trainable parameters of `modules` whose gradient is not allocated yet."""
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters()
               if p.requires_grad and p.grad is None)


@contextmanager
def recompute_where_memory_needs(body: torch.nn.Module) -> Iterator[None]:
    """Within it, each forward of `body` (a decoder body under gradient checkpointing, called with input_ids or
    inputs_embeds) lets its top `layers_kept` layers keep their activations, the room taken from the layers'
    gradients not allocated when the forward starts. Only for a training forward and backward inside the scope;
    the layers are checkpointed again on exit. Nothing changes where the estimate is no bound (eager attention
    keeps an attention matrix; a mixture of experts' MLP is not `intermediate_size` wide), where no layer is
    checkpointed, or for a forward given neither input_ids nor inputs_embeds."""
    layers = checkpointed_layers(body)
    text = text_config(body.config)
    experts = any(getattr(text, name, None) for name in ("num_experts", "num_local_experts", "n_routed_experts"))
    if not layers or experts or getattr(body.config, "_attn_implementation", None) == "eager":
        yield
        return

    def choose(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids, embeds = kwargs.get("input_ids", args[0] if args else None), kwargs.get("inputs_embeds")
        inputs = ids if isinstance(ids, torch.Tensor) else embeds[..., 0] if isinstance(embeds, torch.Tensor) else None
        kept = 0
        if inputs is not None and torch.is_grad_enabled():
            dtype_bytes = next(layers[0].parameters()).element_size()
            layout = kwargs.get("attention_layout")
            attention = 0 if layout is None else layout.kept_bytes(*attention_widths(body.config), dtype_bytes)
            room = unallocated_gradient_bytes(layers) - LOGITS_CHUNK_BYTES
            kept = layers_kept(room, inputs.numel(), body.config, dtype_bytes, attention)
        for i, layer in enumerate(layers):
            layer.gradient_checkpointing = i < len(layers) - kept

    handle = body.register_forward_pre_hook(choose, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        for layer in layers:
            layer.gradient_checkpointing = True
