"""A lean decode step for Llama-family models (Llama, Mistral, Qwen2, Qwen3), straight from their weights.

One decoded token costs the same matrix multiplies in transformers' forward and here; what differs is what
surrounds them. transformers rebuilds a 4D attention mask, walks a cache object and dispatches three q/k/v and
two gate/up projections per layer at every token. Here a step is: embed, then per layer RMSNorm, one fused
q/k/v projection, rotary embedding, a write into the preallocated KV cache, attention over the valid cache
columns, the output projection, RMSNorm and one fused gate/up projection; then the final norm and the LM head.
On CPU the fused weights are copied into oneDNN's blocked layout, which multiplies the few rows of a decode
step several times faster than BLAS on the plain weights (see `_onednn_packed`).

The rotary table and the activation come from the model's own modules, so rope scaling types come for free;
RMSNorm is `F.rms_norm` for the four models' own RMSNorm classes (bit-identical, tested) and the module itself
otherwise. A model whose structure is anything else (sliding-window layers shorter than the sequence,
quantised or DoRA linears, other architectures) gets `None` from `LeanDecoder.from_model`, and the engine
decodes through transformers' forward instead. LoRA adapters are merged into the copied weights, so
sampling from an adapted policy costs no extra matmuls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class Projection:
    """y = x W^T + b for one linear or several fused ones (outputs concatenated).

    `layout`: "original", the model's own W (out, in); "packed", a copy in oneDNN's blocked layout (CPU float32);
    "transposed", a copy of W^T, (in, out) contiguous, where oneDNN is missing.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    layout: str

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "packed":
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        if self.layout == "transposed":
            return x @ self.weight if self.bias is None else torch.addmm(self.bias, x, self.weight)
        return F.linear(x, self.weight, self.bias)

    def residual(self, x: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """x + self(inputs), the addition folded into the matrix multiply where it can be."""
        if self.layout == "packed":
            return torch.ops.mkldnn._linear_pointwise.binary(inputs, x, self.weight, self.bias, "add")
        if self.layout == "transposed" and self.bias is None:
            return torch.addmm(x, inputs, self.weight)
        return x + self(inputs)

    @classmethod
    def fuse(cls, linears: list[tuple[torch.Tensor, torch.Tensor | None]], copy: bool, rows: int
             ) -> list[Projection]:
        """One projection for all of `linears` when `copy` (laid out for decoding about `rows` rows), else one
        per linear on the original tensors (no memory spent)."""
        if not copy:
            return [cls(weight, bias, "original") for weight, bias in linears]
        weight = torch.cat([w for w, _ in linears])
        biases = [b if b is not None else w.new_zeros(w.size(0)) for w, b in linears]
        bias = torch.cat(biases) if any(b is not None for _, b in linears) else None
        packed = _onednn_packed(weight, rows)
        if packed is not None:
            return [cls(packed, bias, "packed")]
        return [cls(weight.t().contiguous(), bias, "transposed")]


def _onednn_packed(weight: torch.Tensor, rows: int) -> torch.Tensor | None:
    """`weight` in oneDNN's blocked layout for `rows`-row inputs, or None where this torch build cannot.

    These are the (private) ops torch.compile's CPU backend uses for frozen linears. For the few rows of a
    decode step they are far faster than BLAS on a plain weight, which streams it poorly: measured on a 2-core
    CPU for the 384 x 32000 LM head, 4.0 ms against 11.2 ms at 32 rows and 1.5 against 8.1 ms at 8 rows.
    """
    if weight.dtype != torch.float32 or weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)
    except (AttributeError, RuntimeError):
        return None


def linear_weights(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The effective (weight, bias) of a plain `nn.Linear` or of a PEFT LoRA linear (its active adapters'
    deltas merged in); None for anything else (quantised layers, DoRA, LoRA biases)."""
    if type(module) is nn.Linear:
        return module.weight, module.bias
    base = getattr(module, "base_layer", None)
    if type(base) is not nn.Linear or not hasattr(module, "get_delta_weight"):
        return None
    if module.merged:  # the deltas are in the base weight already, unless the forward would unmerge them
        return None if module.disable_adapters else (base.weight, base.bias)
    if module.disable_adapters:
        return base.weight, base.bias
    adapters = [name for name in module.active_adapters if name in module.lora_A]
    if any(module.use_dora.get(name) or getattr(module, "lora_bias", {}).get(name) for name in adapters):
        return None
    weight = base.weight
    for name in adapters:
        weight = weight + module.get_delta_weight(name).to(weight.dtype)
    return weight, base.bias


@dataclass
class LayerWeights:
    input_norm: nn.Module
    qkv: list[Projection]  # one fused projection, or q, k, v
    q_norm: nn.Module | None  # Qwen3's per-head norms
    k_norm: nn.Module | None
    o: Projection
    post_norm: nn.Module
    gate_up: list[Projection]  # one fused projection, or gate, up
    down: Projection
    act: nn.Module


class LeanDecoder:
    """A Llama-family model's decode step over a `PreallocatedLayer` KV cache (see `rollout/engine.py`)."""

    def __init__(self, model: nn.Module, layers: list[LayerWeights], lm_head: Projection, capacity: int):
        backbone = model.model
        self.embed, self.norm = backbone.embed_tokens, backbone.norm
        self.layers, self.lm_head = layers, lm_head
        attention = backbone.layers[0].self_attn
        self.heads = model.config.num_attention_heads
        self.kv_heads = model.config.num_key_value_heads
        self.head_dim = attention.head_dim
        self.scaling = attention.scaling
        self.split = [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim]
        # the model's own rotary module (any rope scaling), evaluated once for every position a round can reach
        probe = backbone.embed_tokens.weight[:1].unsqueeze(0)
        positions = torch.arange(capacity, device=probe.device).unsqueeze(0)
        cos, sin = backbone.rotary_emb(probe, positions)
        self.cos, self.sin = cos[0], sin[0]

    @classmethod
    def from_model(cls, model: nn.Module, capacity: int, rows: int = 32, copy: bool | None = None
                   ) -> LeanDecoder | None:
        """The decoder for `model`'s current weights, or None when its structure is not one this step covers
        exactly. `capacity`: the longest sequence (prompt + completion) it will decode; `rows`: about how many
        rows it decodes at once. `copy`: fuse the weights into copies laid out for decoding (default on CPU,
        where that is much faster and memory is cheap; on a GPU the original weights are used, one kernel per
        linear, and nothing is copied but merged LoRA weights)."""
        if hasattr(model, "get_base_model"):  # a PEFT model: its LoRA linears are merged below
            if model.active_peft_config.is_prompt_learning:
                return None
            model = model.get_base_model()
        config = getattr(model, "config", None)
        if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES or not _plain_backbone(model):
            return None
        if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or []):
            return None
        window = getattr(config, "sliding_window", None)
        if window is not None and getattr(config, "use_sliding_window", True) and capacity > window:
            return None
        lm_head = linear_weights(model.lm_head)
        if lm_head is None:
            return None
        if copy is None:  # under autocast the matrix multiplies must stay autocast's to pick their dtype
            copy = lm_head[0].device.type == "cpu" and not torch.is_autocast_enabled("cpu")
        layers = []
        for layer in model.model.layers:
            layer_weights = _layer_weights(layer, copy, rows)
            if layer_weights is None:
                return None
            layers.append(layer_weights)
        return cls(model, layers, Projection.fuse([lm_head], copy, rows)[0], capacity)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, cache: Any, valid: torch.Tensor
             ) -> torch.Tensor:
        """Logits (rows, vocab) of the next token after `tokens` (rows,) at `positions` (rows,), appending their
        keys and values to `cache`. `valid` (rows, cache length + 1) marks the columns a row attends to."""
        rows, heads, kv_heads, head_dim = tokens.size(0), self.heads, self.kv_heads, self.head_dim
        x = self.embed(tokens)
        cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)  # (rows, 1, head_dim)
        attend = valid.view(rows, 1, 1, -1)
        if x.device.type == "cpu" and not torch.is_autocast_enabled("cpu"):
            # additive, built once per step: CPU attention would convert a boolean mask in every layer
            attend = torch.zeros(attend.shape, dtype=x.dtype).masked_fill_(~attend, float("-inf"))
        for layer, layer_cache in zip(self.layers, cache.layers):
            q, k, v = self._attention_inputs(layer, _norm(layer.input_norm, x), cos, sin)
            keys, values = layer_cache.update(k.unsqueeze(2), v.unsqueeze(2))
            attention = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=attend,
                                                       scale=self.scaling, enable_gqa=kv_heads != heads)
            x = layer.o.residual(x, attention.reshape(rows, heads * head_dim))
            gate, up = _project(_norm(layer.post_norm, x), layer.gate_up, None)
            x = layer.down.residual(x, layer.act(gate) * up)
        return self.lm_head(_norm(self.norm, x))

    def _attention_inputs(self, layer: LayerWeights, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (rows, heads, head_dim) and k, v (rows, kv_heads, head_dim), q and k rotated."""
        rows, heads, kv_heads, head_dim = h.size(0), self.heads, self.kv_heads, self.head_dim
        qkv = _project(h, layer.qkv, self.split)
        if len(qkv) == 1 and layer.q_norm is None:  # rotate q and k in one pass over the fused output
            qkv = qkv[0].view(rows, heads + 2 * kv_heads, head_dim)
            qk = _rotate(qkv[:, :heads + kv_heads], cos, sin)
            return qk[:, :heads], qk[:, heads:], qkv[:, heads + kv_heads:]
        q, k, v = qkv if len(qkv) == 3 else qkv[0].split(self.split, dim=-1)
        q, k, v = q.view(rows, heads, head_dim), k.view(rows, kv_heads, head_dim), v.view(rows, kv_heads, head_dim)
        if layer.q_norm is not None:
            q, k = _norm(layer.q_norm, q), _norm(layer.k_norm, k)
        return _rotate(q, cos, sin), _rotate(k, cos, sin), v


def _plain_backbone(model: nn.Module) -> bool:
    backbone = getattr(model, "model", None)
    return (hasattr(model, "lm_head") and backbone is not None
            and all(hasattr(backbone, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb"))
            and type(backbone.embed_tokens) is nn.Embedding)


def _layer_weights(layer: nn.Module, copy: bool, rows: int) -> LayerWeights | None:
    attention, mlp = layer.self_attn, layer.mlp
    linears = [_linear(module, name) for module, name in (
        (attention, "q_proj"), (attention, "k_proj"), (attention, "v_proj"), (attention, "o_proj"),
        (mlp, "gate_proj"), (mlp, "up_proj"), (mlp, "down_proj"))]
    if any(weights is None for weights in linears) or not hasattr(mlp, "act_fn"):
        return None
    q, k, v, o, gate, up, down = linears
    return LayerWeights(
        input_norm=layer.input_layernorm, qkv=Projection.fuse([q, k, v], copy, rows),
        q_norm=getattr(attention, "q_norm", None), k_norm=getattr(attention, "k_norm", None),
        o=Projection.fuse([o], copy, rows)[0], post_norm=layer.post_attention_layernorm,
        gate_up=Projection.fuse([gate, up], copy, rows), down=Projection.fuse([down], copy, rows)[0],
        act=mlp.act_fn)


def _linear(parent: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    module = getattr(parent, name, None)
    return None if module is None else linear_weights(module)


def _project(x: torch.Tensor, projections: list[Projection], split: list[int] | None) -> list[torch.Tensor]:
    """The outputs of several linears of the same input: one each, or (split None) the two halves of one
    fused projection, or (split given) the fused output whole, for the caller to split."""
    if len(projections) > 1:
        return [projection(x) for projection in projections]
    out = projections[0](x)
    return [out] if split else list(out.chunk(2, dim=-1))


# These models' RMSNorm normalises in float32, rounds to the input dtype, then multiplies by the weight: the same
# numbers as `F.rms_norm` (checked bit for bit in the tests), one call (a fused kernel on GPU) instead of seven.
STANDARD_RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


def _norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if type(norm).__name__ not in STANDARD_RMS_NORMS:
        return norm(x)
    if x.dtype == torch.float32:
        return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)
    return norm.weight * F.rms_norm(x, norm.weight.shape, None, norm.variance_epsilon)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (RoFormer, arXiv 2104.09864) of x (rows, heads, head_dim), transformers'
    rotate-half layout: x cos + rotate_half(x) sin."""
    half = x.size(-1) // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
