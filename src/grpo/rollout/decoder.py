"""A lean decode step for Llama-family models (Llama, Mistral, Qwen2, Qwen3), straight from their weights.

One decoded token costs the same matrix multiplies in transformers' forward and here; what differs is what
surrounds them. transformers rebuilds a 4D attention mask, walks a cache object and dispatches three q/k/v and
two gate/up projections per layer at every token. Here a step is: embed, then per layer RMSNorm, one fused
q/k/v projection, rotary embedding, a write into the preallocated KV cache, attention over the valid cache
columns, the output projection, RMSNorm and one fused gate/up projection; then the final norm and the LM head.

On CPU (float32) the weights are copied once per round, and the copies are laid out so that a step issues as few
operations as possible, since there each small op costs several microseconds and a tiny model's step is mostly
small ops:
- each RMSNorm's weight (and sqrt(dim)) is folded into the projection that reads its output, so a norm is
  x / sqrt(|x|^2 + dim eps): three ops, where `F.rms_norm` issues nine on CPU (`FoldedRMSNorm`);
- the fused weights are packed for the compiled kernel of `rollout/decode_linear.py`, which streams them faster
  than oneDNN and applies on the way the norm's remaining factor, the bias, the residual addition and the gated
  MLP's silu(gate) * up: a layer is four kernel calls, the rotation and attention (measured on SmolLM2 at 16
  rows: a step 44 -> 34 ms), and over the shared prompt cache all of a step's layers are one call into C
  (`rollout/decode_layers.py`: 34.4 -> 32.4 ms). Without a C compiler: oneDNN's blocked layout, which multiplies
  the few rows of a decode step several times faster than BLAS on the plain weights (see `_onednn_packed`), but
  for small projections added to the residual stream, where BLAS adds for free (`SMALL_RESIDUAL_WEIGHT`);
- the rows of the q and k projections are reordered so that each rotary pair (i, i + head_dim/2) is adjacent:
  the rotation is then one in-place complex multiply, where rotate-half takes five ops, and k and v are written
  into the cache together, with one copy. The prompts' prefill runs through the same layers (`prefill`), so
  its keys are laid out alike; attention scores do not change, as q and k are reordered together.

With `copy_dtype` bfloat16 the layers' copies are bfloat16 where oneDNN multiplies them natively, between
float32 activations, the LM head float32: the step's matrix multiplies stream half the bytes. For generation from
fixed weights only: the trainer keeps float32 copies (`RolloutEngine` says why).

Elsewhere (on a GPU, under autocast, in bfloat16, or with a norm class of its own) the step uses the model's own
weights, rotate-half, and `F.rms_norm` for the four models' own RMSNorm classes (bit-identical, tested).
The rotary table and the activation come from the model's own modules, so rope scaling types come for free.
A model whose structure is anything else (sliding-window layers shorter than the sequence, quantised or DoRA
linears, other architectures) gets `None` from `LeanDecoder.from_model`, and the engine decodes through
transformers' forward instead. LoRA adapters are merged into the copied weights, so sampling from an adapted
policy costs no extra matmuls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from grpo.models import LLAMA_FAMILY, SILU_ACTIVATIONS, STANDARD_RMS_NORMS
from grpo.rollout import decode_linear
from grpo.rollout.decode_layers import DecodeLayers
from grpo.rollout.kv_cache import CopiedKV, GroupKV, attention_mask

Linear = tuple[torch.Tensor, torch.Tensor | None]  # (weight, bias)


@dataclass
class Projection:
    """y = x W^T + b for one linear or several fused ones (outputs concatenated), or silu(x Wg^T) * (x Wu^T) for a
    gated MLP's gate and up projections (`gated`, the "kernel" layout only).

    `layout`: "original", the model's own W (out, in); "kernel", a copy packed for the compiled kernel of
    `decode_linear.py` (CPU float32, `weight` a `PackedLinear`); "packed", a copy in oneDNN's blocked layout (CPU,
    no C compiler); "transposed", a copy of W^T, (in, out) contiguous, where oneDNN is missing too.
    """

    weight: Any
    bias: torch.Tensor | None
    layout: str
    norm_eps: float | None = None  # "kernel": the input is an RMSNorm's, normalised by the kernel (`fuse`)

    @property
    def gated(self) -> bool:
        return self.layout == "kernel" and self.weight.gated

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "kernel":
            return decode_linear.linear(x, self.weight, norm_eps=self.norm_eps)
        if self.layout == "packed":  # a bfloat16 copy multiplies in bfloat16 and hands back x's dtype
            out = torch.ops.mkldnn._linear_pointwise(x.to(self.weight.dtype), self.weight, self.bias, "none", [], "")
            return out.to(x.dtype)
        if self.layout == "transposed":
            return x @ self.weight if self.bias is None else torch.addmm(self.bias, x, self.weight)
        return F.linear(x, self.weight, self.bias)

    def residual(self, x: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """x + self(inputs), the addition folded into the matrix multiply where it can be (in place into x, which
        must then be contiguous, for the "kernel" layout)."""
        if self.layout == "kernel":
            return decode_linear.linear(inputs, self.weight, add_to=x, norm_eps=self.norm_eps)
        if self.layout == "packed" and self.weight.dtype == inputs.dtype:
            return torch.ops.mkldnn._linear_pointwise.binary(inputs, x, self.weight, self.bias, "add")
        if self.layout == "transposed" and self.bias is None:
            return torch.addmm(x, inputs, self.weight)
        return x + self(inputs)

    @classmethod
    def fuse(cls, linears: list[Linear], copy: bool, rows: int, input_scale: torch.Tensor | None = None,
             residual: bool = False, dtype: torch.dtype = torch.float32, gated: bool = False,
             norm: nn.Module | None = None) -> list[Projection]:
        """One projection for all of `linears` when `copy` (laid out for decoding about `rows` rows, the
        weight's columns multiplied by `input_scale` if given), else one per linear on the original tensors
        (no memory spent). `residual`: its output is added to the residual stream (`residual`), which BLAS
        does faster for a small weight (`SMALL_RESIDUAL_WEIGHT`). `dtype`: the copy's (bfloat16 only where
        oneDNN multiplies it natively, see `bf16_copies_supported`; float32 otherwise). `gated`: `linears` are a
        SiLU-gated MLP's gate and up projections, computed as silu(gate) * up where the kernel layout can. `norm`:
        the RMSNorm whose output this projection reads (`input_scale` its folded weight); the kernel layout
        normalises its input itself (`norm_eps` set), the caller then skips the norm's first factor."""
        if not copy:
            return [cls(weight, bias, "original") for weight, bias in linears]
        if dtype == torch.float32 and decode_linear.available(linears[0][0].dtype, linears[0][0].device):
            norm_eps = None if norm is None else norm.weight.numel() * norm.variance_epsilon
            return [cls(decode_linear.pack(linears, input_scale, gated), None, "kernel", norm_eps)]
        if len(linears) > 1:
            weight = torch.cat([w for w, _ in linears])
            if input_scale is not None:
                weight.mul_(input_scale)  # the concatenation is a copy already
        else:
            weight = linears[0][0] if input_scale is None else linears[0][0] * input_scale
        bias = None
        if any(b is not None for _, b in linears):
            bias = torch.cat([b if b is not None else w.new_zeros(w.size(0)) for w, b in linears])
        if dtype == torch.bfloat16 and bf16_copies_supported():
            packed = _onednn_packed(weight.to(dtype), rows)
            if packed is not None:
                return [cls(packed, None if bias is None else bias.to(dtype), "packed")]
        packed = None if residual and weight.numel() <= SMALL_RESIDUAL_WEIGHT else _onednn_packed(weight, rows)
        if packed is not None:
            return [cls(packed, bias, "packed")]
        return [cls(weight.t().contiguous(), bias, "transposed")]


# A projection added to the residual stream with a weight this small (elements) is left to BLAS: addmm adds for
# free, where oneDNN's fused addition costs more than its multiply saves. Measured on a 2-core CPU, one decode
# step of the tiny benchmark model (192 x 192 and 512 x 192 o and down projections): 5-7% faster; with the small
# model's 1024 x 384 down projection BLAS was 4% slower (a scratch comparison of the two layouts in one process,
# the step of benchmarks/decode_step.py).
SMALL_RESIDUAL_WEIGHT = 128 * 1024


def _onednn_packed(weight: torch.Tensor, rows: int) -> torch.Tensor | None:
    """`weight` in oneDNN's blocked layout for `rows`-row inputs, or None where this torch build cannot.

    These are the (private) ops torch.compile's CPU backend uses for frozen linears. For the few rows of a
    decode step they are far faster than BLAS on a plain weight, which streams it poorly: measured on a 2-core
    CPU for the 384 x 32000 LM head, 4.0 ms against 11.2 ms at 32 rows and 1.5 against 8.1 ms at 8 rows.
    """
    if weight.dtype not in (torch.float32, torch.bfloat16) or weight.device.type != "cpu" or (
            not torch.backends.mkldnn.is_available()):
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)
    except (AttributeError, RuntimeError):
        return None


def bf16_copies_supported() -> bool:
    """Whether oneDNN multiplies bfloat16 on this CPU (torch's own check). With native bfloat16 (AVX512-BF16,
    AMX) a decode step's bfloat16 linears run 1.8-1.9x faster than float32 ones, half the weight bytes streamed:
    measured on a 2-core AVX512-BF16 CPU for SmolLM2's shapes at 16 and 32 rows (576 x 1728: 0.170 -> 0.096 ms;
    576 x 49152: 6.0 -> 3.0 ms)."""
    mkldnn = getattr(torch.ops, "mkldnn", None)
    check = getattr(mkldnn, "_is_mkldnn_bf16_supported", None)
    return torch.backends.mkldnn.is_available() and check is not None and bool(check())


def linear_weights(module: nn.Module) -> Linear | None:
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


Norm = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class FoldedRMSNorm:
    """RMSNorm(x) w = x / sqrt(mean(x^2) + eps) w = x / sqrt(|x|^2 + dim eps) (sqrt(dim) w): this computes the
    first factor, over the last dim, and multiplies by `scale` (sqrt(dim) w) only when given: a norm followed by
    a projection has that factor folded into the projection's weight."""

    dim_eps: torch.Tensor  # sqrt(dim eps), 0-dim
    scale: torch.Tensor | None = None

    @classmethod
    def of(cls, norm: nn.Module, order: torch.Tensor | None = None) -> FoldedRMSNorm:
        """`norm`'s first factor; with `order`, its scale too, entries in that order (Qwen3's per-head q and k
        norms, which no projection follows)."""
        dim_eps = torch.tensor((norm.weight.numel() * norm.variance_epsilon) ** 0.5, device=norm.weight.device)
        return cls(dim_eps, None if order is None else folded_scale(norm)[order])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x / torch.hypot(torch.linalg.vector_norm(x, dim=-1, keepdim=True), self.dim_eps)
        return x if self.scale is None else x * self.scale


def folded_scale(norm: nn.Module) -> torch.Tensor:
    return norm.weight.detach() * norm.weight.numel() ** 0.5


@dataclass
class LayerWeights:
    input_norm: Norm
    qkv: list[Projection]  # one fused projection, or q, k, v
    q_norm: Norm | None  # Qwen3's per-head norms
    k_norm: Norm | None
    o: Projection
    post_norm: Norm
    gate_up: list[Projection]  # one fused projection, or gate, up
    down: Projection
    act: nn.Module


class LeanDecoder:
    """A Llama-family model's decode step over a KV cache of `rollout/kv_cache.py`.

    `folded`: the weights are copies with the norms folded in and the rotary pairs interleaved (module
    docstring); otherwise the model's own weights and modules are used as they are."""

    def __init__(self, model: nn.Module, layers: list[LayerWeights], lm_head: Projection, norm: Norm,
                 capacity: int, folded: bool):
        backbone = model.model
        self.embed, self.norm, self.folded = backbone.embed_tokens, norm, folded
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
        half = self.head_dim // 2
        self.rotation = torch.complex(self.cos[:, :half], self.sin[:, :half]) if folded else None
        self.one_call = DecodeLayers.of(self)  # every layer of a step in one call into C, where they qualify

    @classmethod
    def from_model(cls, model: nn.Module, capacity: int, rows: int = 32, copy: bool | None = None,
                   copy_dtype: torch.dtype = torch.float32) -> LeanDecoder | None:
        """The decoder for `model`'s current weights, or None when its structure is not one this step covers
        exactly. `capacity`: the longest sequence (prompt + completion) it will decode; `rows`: about how many
        rows it decodes at once. `copy`: fold the weights into copies laid out for decoding (default on CPU in
        float32, where that is much faster and memory is cheap; on a GPU the original weights are used, one
        kernel per linear, and nothing is copied but merged LoRA weights). `copy_dtype` bfloat16: the layers'
        copies multiply in bfloat16 where oneDNN can (`bf16_copies_supported`), between float32 activations; the
        LM head stays float32, so logits are not rounded to bfloat16."""
        if hasattr(model, "get_base_model"):  # a PEFT model: its LoRA linears are merged below
            if model.active_peft_config.is_prompt_learning:
                return None
            model = model.get_base_model()
        config = getattr(model, "config", None)
        if getattr(config, "model_type", None) not in LLAMA_FAMILY or not _plain_backbone(model):
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
        copy = copy and _foldable(model)
        layers = []
        for layer in model.model.layers:
            layer_weights = _layer_weights(layer, copy, rows, copy_dtype)
            if layer_weights is None:
                return None
            layers.append(layer_weights)
        norm = model.model.norm
        final_norm = FoldedRMSNorm.of(norm) if copy else partial(_norm, norm)
        lm_head_projection = Projection.fuse([lm_head], copy, rows, folded_scale(norm) if copy else None,
                                             norm=norm if copy else None)[0]
        if lm_head_projection.norm_eps is not None:
            final_norm = _unchanged
        return cls(model, layers, lm_head_projection, final_norm, capacity, copy)

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any) -> torch.Tensor:
        """The prompts' forward: writes their keys and values into `cache` (of `PreallocatedLayer`s) and returns
        the logits (rows, vocab) after each prompt's last token. `ids`, `mask`, `positions` (rows, T),
        left-padded."""
        rows, length = ids.shape
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        # causal over the prompt's tokens; a padding position sees only itself, so that no row is all -inf
        seen = torch.ones(length, length, dtype=torch.bool, device=ids.device).tril()
        attend = seen & (mask.bool().unsqueeze(1) | torch.eye(length, dtype=torch.bool, device=ids.device))
        attend = attention_mask(attend.unsqueeze(1), self.embed.weight.dtype)

        def attention(i: int, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
            kv = kv.view(rows, length, 2 * kv_heads, head_dim).transpose(1, 2)
            keys, values = cache.layers[i].update(kv[:, :kv_heads], kv[:, kv_heads:])
            out = F.scaled_dot_product_attention(q.view(rows, length, heads, head_dim).transpose(1, 2), keys,
                                                 values, attn_mask=attend, scale=self.scaling,
                                                 enable_gqa=kv_heads != heads)
            return out.transpose(1, 2)

        x = self._layers(self.embed(ids).flatten(0, 1), positions.flatten(), attention)
        return self.lm_head(self.norm(x.view(rows, length, -1)[:, -1]))

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, kv: CopiedKV | GroupKV) -> torch.Tensor:
        """Logits (rows, vocab) of the next token after `tokens` (rows,) at `positions` (rows,), appending their
        keys and values to `kv` (either layout of `rollout/kv_cache.py`)."""
        x = self.embed(tokens)
        if self.one_call is not None and self.one_call.runs(kv):
            x = self.one_call(x, self.rotation[positions], kv)
        else:
            x = self._layers(x, positions, partial(kv.attend, scale=self.scaling))
        kv.advance()
        return self.lm_head(self.norm(x))

    def _layers(self, x: torch.Tensor, positions: torch.Tensor,
                attention: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The decoder layers over the tokens x (n, hidden) at `positions` (n,); `attention(layer, q, kv)` stores
        the new keys and values and returns the attention output for the queries q."""
        if self.folded:
            rotation: Any = self.rotation[positions].unsqueeze(1)  # (n, 1, head_dim / 2)
        else:
            rotation = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)  # (n, 1, head_dim)
        for i, layer in enumerate(self.layers):
            q, new_kv = self._attention_inputs(layer, layer.input_norm(x), rotation)
            x = layer.o.residual(x, attention(i, q, new_kv).reshape(x.size(0), self.heads * self.head_dim))
            h = layer.post_norm(x)
            if layer.gate_up[0].gated:
                hidden = layer.gate_up[0](h)
            else:
                gate, up = _project(h, layer.gate_up, None)
                hidden = layer.act(gate) * up
            x = layer.down.residual(x, hidden)
        return x

    def _attention_inputs(self, layer: LayerWeights, h: torch.Tensor, rotation: Any
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """q (rows, heads, head_dim), rotated, and the new keys and values side by side (rows, 2 kv_heads,
        head_dim), the keys rotated."""
        rows, heads, kv_heads, head_dim = h.size(0), self.heads, self.kv_heads, self.head_dim
        qkv = _project(h, layer.qkv, self.split)
        if self.folded:  # one projection, rotary pairs adjacent: normalise and rotate q and k in place
            qkv = qkv[0].view(rows, heads + 2 * kv_heads, head_dim)
            if layer.q_norm is not None:
                qkv[:, :heads] = layer.q_norm(qkv[:, :heads])
                qkv[:, heads:heads + kv_heads] = layer.k_norm(qkv[:, heads:heads + kv_heads])
            torch.view_as_complex(qkv[:, :heads + kv_heads].unflatten(-1, (-1, 2))).mul_(rotation)
            return qkv[:, :heads], qkv[:, heads:]
        cos, sin = rotation
        q, k, v = qkv if len(qkv) == 3 else qkv[0].split(self.split, dim=-1)
        q, k, v = q.view(rows, heads, head_dim), k.view(rows, kv_heads, head_dim), v.view(rows, kv_heads, head_dim)
        if layer.q_norm is not None:
            q, k = layer.q_norm(q), layer.k_norm(k)
        return _rotate(q, cos, sin), torch.cat([_rotate(k, cos, sin), v], dim=1)


def interleaved_pairs(head_dim: int, device: torch.device | None = None) -> torch.Tensor:
    """The order of a head's dimensions that puts each rotary pair (i, i + head_dim/2) of transformers'
    rotate-half layout side by side: 0, h, 1, h + 1, ... (h = head_dim/2)."""
    half = head_dim // 2
    return torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).flatten().to(device)


def _foldable(model: nn.Module) -> bool:
    """Float32 weights and only the standard RMSNorm, whose weight can be folded into a projection."""
    norms = [model.model.norm] + [norm for layer in model.model.layers for norm in (
        layer.input_layernorm, layer.post_attention_layernorm, getattr(layer.self_attn, "q_norm", None),
        getattr(layer.self_attn, "k_norm", None)) if norm is not None]
    return model.lm_head.weight.dtype == torch.float32 and all(
        type(norm).__name__ in STANDARD_RMS_NORMS for norm in norms)


def _plain_backbone(model: nn.Module) -> bool:
    backbone = getattr(model, "model", None)
    return (hasattr(model, "lm_head") and backbone is not None
            and all(hasattr(backbone, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb"))
            and type(backbone.embed_tokens) is nn.Embedding)


def _layer_weights(layer: nn.Module, fold: bool, rows: int, dtype: torch.dtype = torch.float32
                   ) -> LayerWeights | None:
    """The layer's weights: its own (`fold` False), or fused copies in `dtype` with the norms folded in and the
    q and k rows in interleaved rotary order."""
    attention, mlp = layer.self_attn, layer.mlp
    linears = [_linear(module, name) for module, name in (
        (attention, "q_proj"), (attention, "k_proj"), (attention, "v_proj"), (attention, "o_proj"),
        (mlp, "gate_proj"), (mlp, "up_proj"), (mlp, "down_proj"))]
    if any(weights is None for weights in linears) or not hasattr(mlp, "act_fn"):
        return None
    q, k, v, o, gate, up, down = linears
    q_norm, k_norm = getattr(attention, "q_norm", None), getattr(attention, "k_norm", None)
    post_attention_norm = layer.post_attention_layernorm
    input_scale = post_scale = None
    if fold:
        order = interleaved_pairs(attention.head_dim, q[0].device)
        q, k = _reorder_heads(q, order), _reorder_heads(k, order)
        input_scale, post_scale = (folded_scale(norm) for norm in (layer.input_layernorm, post_attention_norm))
        input_norm, post_norm = (FoldedRMSNorm.of(norm) for norm in (layer.input_layernorm, post_attention_norm))
        if q_norm is not None:
            q_norm, k_norm = FoldedRMSNorm.of(q_norm, order), FoldedRMSNorm.of(k_norm, order)
    else:
        input_norm, post_norm = partial(_norm, layer.input_layernorm), partial(_norm, post_attention_norm)
        if q_norm is not None:
            q_norm, k_norm = partial(_norm, q_norm), partial(_norm, k_norm)
    qkv = Projection.fuse([q, k, v], fold, rows, input_scale, dtype=dtype,
                          norm=layer.input_layernorm if fold else None)
    gate_up = Projection.fuse([gate, up], fold, rows, post_scale, dtype=dtype,
                              gated=type(mlp.act_fn).__name__ in SILU_ACTIVATIONS,
                              norm=post_attention_norm if fold else None)
    if qkv[0].norm_eps is not None:  # the kernel normalises the projections' inputs itself
        input_norm = _unchanged
    if gate_up[0].norm_eps is not None:
        post_norm = _unchanged
    return LayerWeights(
        input_norm=input_norm, qkv=qkv, q_norm=q_norm, k_norm=k_norm,
        o=Projection.fuse([o], fold, rows, residual=True, dtype=dtype)[0], post_norm=post_norm, gate_up=gate_up,
        down=Projection.fuse([down], fold, rows, residual=True, dtype=dtype)[0], act=mlp.act_fn)


def _unchanged(x: torch.Tensor) -> torch.Tensor:
    return x


def _reorder_heads(linear: Linear, order: torch.Tensor) -> Linear:
    """A q or k projection with each head's output dimensions in `order`."""
    weight, bias = linear
    head_dim = order.numel()
    weight = weight.view(-1, head_dim, weight.size(-1))[:, order].flatten(0, 1)
    return weight, None if bias is None else bias.view(-1, head_dim)[:, order].flatten()


def _linear(parent: nn.Module, name: str) -> Linear | None:
    module = getattr(parent, name, None)
    return None if module is None else linear_weights(module)


def _project(x: torch.Tensor, projections: list[Projection], split: list[int] | None) -> list[torch.Tensor]:
    """The outputs of several linears of the same input: one each, or (split None) the two halves of one
    fused projection, or (split given) the fused output whole, for the caller to split."""
    if len(projections) > 1:
        return [projection(x) for projection in projections]
    out = projections[0](x)
    return [out] if split else list(out.chunk(2, dim=-1))


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
