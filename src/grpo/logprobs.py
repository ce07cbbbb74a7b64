"""Forward passes of a causal LM that return per-token log-probs of completion tokens.

The vocabulary is the widest axis of a causal LM: the logits of B rows x C completion tokens are B*C*V floats
(8 x 512 x 32k float32 = 500 MiB; 2.3 GiB with a 152k vocabulary), and autograd would keep them and their log-softmax
for the backward pass. So the decoder body runs alone, and the final hidden states of the completion tokens go
through the LM head a chunk of tokens at a time, sized to a memory budget (`LOGITS_CHUNK_BYTES`):

    z = h W^T + b,   logp(y) = z_y / T - logsumexp_v(z_v / T),   H = logsumexp_v(z_v / T) - sum_v p_v z_v / T

with the log-sum-exp in float32. With gradients, `_LinearTokenLogps` saves h, W, b and the log-sum-exp and, under
gradient checkpointing, recomputes each chunk's logits in the backward pass, so no (B, C, V) tensor exists at
any time (unless the micro-batch's completion tokens fit in one chunk: then it keeps their probabilities, memory
within the same budget). Without checkpointing the layers keep their activations, and the head keeps every
chunk's probabilities alike (4 V bytes a completion token: 7-20% of a common model's activations per token,
counted in `models.activation_bytes`), which spares the backward a third of the head's FLOPs (SmolLM2, 2048
completion tokens: forward + backward of the head 3.4 -> 2.3 s on 2 CPU cores). Models whose
forward is not exactly `decoder -> lm_head` (logit soft-capping, logit scaling, prompt-learning adapters, ...) take
the full-logits path, as do models without a separate decoder body (`grpo.models.lm_body_and_head` tells them apart).
"""

from __future__ import annotations

import functools
import inspect
from contextlib import AbstractContextManager, ExitStack
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from grpo.algorithm import entropy_from_logits, selective_log_softmax
from grpo.fused_ops import fused_ops
from grpo.lora_ops import lora_linears
from grpo.models import (
    LINEAR_HEADS,
    LLAMA_FAMILY,
    Float32LMHead,
    accepts_logits_to_keep,
    checkpoints_activations,
    lm_body_and_head,
    text_config,
    vocab_size,
)
from grpo.packing import (
    pack_shared_prefixes,
    packing_saves_work,
    shared_prefix_hidden,
    supports_packing,
    uses_grouped_attention,
)

LOGITS_CHUNK_BYTES = 128 * 2**20
"""Budget for one chunk of float32 logits: tokens per chunk = LOGITS_CHUNK_BYTES / (4 * vocab). The LM head's
transient memory is about this (the logits, then their probabilities in place), whatever the batch and length."""

SOFTMAX_BLOCK_BYTES = 4 * 2**20
"""Rows of a logits chunk taken at a time by the softmax statistics: their temporaries are this size."""


def completion_logps(
    model: Any,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = False,
    *,
    chunk_bytes: int = LOGITS_CHUNK_BYTES,
    chunked: bool = True,
    share_prefix: bool = True,
    grads_in_place: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(completion_t | prompt, completion_<t) / temperature-scaled, shape (B, C) float32, and optionally
    entropy (carrying gradient only with `entropy_grad`, for the entropy bonus).

    Position ids come from the attention mask, so a left-padded prompt sees the same positions it saw during
    generation. On the chunked path (`chunked` and a model whose forward is `decoder -> lm_head`) only tokens with
    completion_mask = 1 go through the LM head, `chunk_bytes` of float32 logits at a time, and padded positions
    read 0. Otherwise the model returns the logits of the last C + 1 positions (where it supports
    `logits_to_keep`) and padded positions hold the log-probs of the pad token. On the chunked path, rows that
    share a prompt run as one packed sequence, the prompt computed once (`grpo.packing`; `share_prefix=False`
    turns it off). `grads_in_place`: the backward adds the LM head's and the input embedding's dL/dW straight
    into their `weight.grad` where that is safe (`_adds_grad_in_place`), for a training step that ends in
    `loss.backward()`.
    """
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    completion_ids, completion_mask = completion_ids.to(device), completion_mask.to(device)
    inputs = _model_inputs(prompt_ids, prompt_mask, completion_ids, completion_mask)
    parts = lm_body_and_head(model) if chunked else None
    if parts is None:
        return _full_logits_logps(model, inputs, completion_ids, temperature, with_entropy, entropy_grad)
    body, head = parts
    width = completion_ids.size(1)
    packed = pack_shared_prefixes(prompt_ids, prompt_mask, completion_ids, completion_mask) if share_prefix else None
    grouped = uses_grouped_attention(body)  # decided once: the cost model and the forward must agree
    embedding = _embedding_adding_in_place(body) if grads_in_place else None
    embed = None if embedding is None else functools.partial(_embed_adding_in_place, embedding)
    # fused element-wise kernels and LoRA linears where no backward will recompute the layers outside this call (the
    # trainer holds its own scope over a checkpointed forward and backward)
    with ExitStack() as scope:
        if not checkpoints_activations(body):
            scope.enter_context(fused_ops(body))
            scope.enter_context(lora_linears(body))
        if (packed is not None and supports_packing(body, packed.input_ids.size(1)) and packing_saves_work(
                packed, *inputs["input_ids"].shape, text_config(body.config), grouped=grouped)):
            hidden = shared_prefix_hidden(body, packed, grouped, embed=embed)
        else:
            if embed is not None:
                inputs["inputs_embeds"] = embed(inputs.pop("input_ids"))
            hidden = body(**inputs).last_hidden_state[:, -(width + 1):-1]  # position t predicts completion token t
    mask = completion_mask.bool()
    chunk_tokens = max(1, chunk_bytes // (4 * vocab_size(head)))
    # where the layers keep their activations for the backward, the LM head keeps its probabilities too
    logps, entropy = token_logps(hidden[mask], head, completion_ids[mask], temperature, chunk_tokens, entropy_grad,
                                 keep_probs=not checkpoints_activations(body), grad_in_place=grads_in_place)
    return _unpack(logps, mask), _unpack(entropy, mask) if with_entropy else None


def token_logps(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    targets: torch.Tensor,
    temperature: float,
    chunk_tokens: int,
    entropy_grad: bool = False,
    keep_probs: bool = False,
    grad_in_place: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (log p(target), entropy) of softmax(head(hidden) / T), both (N,) float32, from hidden (N, H) and
    targets (N,), `chunk_tokens` rows of logits at a time.

    Without autograd: plain chunks. With it: `_LinearTokenLogps` for an `nn.Linear` head (entropy detached), which
    keeps the probabilities for the backward with `keep_probs` or where all N tokens fit in one chunk (and with
    `grad_in_place` adds dL/dW into `head.weight.grad` itself where `_adds_grad_in_place` allows), and checkpointed
    chunks for other heads (a PEFT-wrapped lm_head) or when the entropy needs a gradient.
    """
    if not torch.is_grad_enabled():
        stats = [_chunk_stats(h, head, y, temperature) for h, y in _chunks(hidden, targets, chunk_tokens)]
        return torch.cat([s[0] for s in stats]), torch.cat([s[1] for s in stats])
    if type(head) in LINEAR_HEADS and not entropy_grad:
        keep = keep_probs or len(hidden) <= chunk_tokens
        dtype = _head_dtype(head, hidden.device)
        return _LinearTokenLogps.apply(hidden, head.weight, head.bias, targets, temperature, chunk_tokens, dtype,
                                       keep, grad_in_place and _adds_grad_in_place(head.weight, dtype))
    stats = [checkpoint(_differentiable_chunk_stats, h, head, y, temperature, use_reentrant=False)
             for h, y in _chunks(hidden, targets, chunk_tokens)]
    logps, entropy = torch.cat([s[0] for s in stats]), torch.cat([s[1] for s in stats])
    return logps, entropy if entropy_grad else entropy.detach()


@torch.no_grad()
def completion_logps_in_chunks(model: Any, rollout: Any, temperature: float, chunk_rows: int,
                               rows: torch.Tensor | None = None) -> torch.Tensor:
    """`completion_logps` over a whole round without gradients, `chunk_rows` rows at a time (old / reference);
    with `rows`, only those rows' (the others' are 0: rows no loss term will read)."""
    out = torch.zeros(rollout.completion_ids.shape, dtype=torch.float32)
    rows = torch.arange(len(rollout)) if rows is None else rows
    for chunk in rows.split(chunk_rows) if len(rows) else []:
        logps, _ = completion_logps(model, rollout.prompt_ids[chunk], rollout.prompt_mask[chunk],
                                    rollout.completion_ids[chunk], rollout.completion_mask[chunk], temperature)
        out[chunk] = logps.float().cpu()
    return out


# ---- the chunked LM head -------------------------------------------------------------------------------------
class _LinearTokenLogps(torch.autograd.Function):
    """(log p(y_i), H_i) of softmax(z_i / T) with z = h W^T + b, computed `chunk` tokens at a time.

    Forward per chunk: z / T in float32, lse = logsumexp(z / T), logp = z_y / T - lse, H = lse - sum_v p_v z_v / T.
    Saves h, W, b and lse (O(N) floats beyond the inputs); with `keep` it also keeps each chunk's p = softmax(z / T)
    (N V floats), so the backward pass need not recompute the logits (a third more LM-head FLOPs, and the passes
    over them). Otherwise backward recomputes each chunk's logits:

        dL/dz_iv = g_i (1[v = y_i] - p_iv) / T,  dL/dh = dL/dz W,  dL/dW = sum_chunks dL/dz^T h,  dL/db = sum_i dL/dz_i

    with g = dL/dlogp. H is returned without gradient. Under autocast the matmuls run in the autocast dtype, as
    `lm_head` would; dL/dW is accumulated in float32.

    With `grad_in_place` (a float32 head, `_adds_grad_in_place`) dL/dW is added into `weight.grad` itself and the
    backward returns None for the weight: no (V, H) gradient of its own is alive beside the kept probabilities,
    nor beside a tied input embedding's gradient at the end of the backward (SmolLM2: 108 MiB at each of the
    training step's two memory peaks).
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, temperature: float, chunk: int, dtype: torch.dtype, keep: bool,
                grad_in_place: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
        logps, entropies, lses, kept = [], [], [], []
        with _no_autocast(hidden.device):
            for h, y in _chunks(hidden, targets, chunk):
                logp, entropy, lse, probs = _softmax_stats(_linear_logits(h.to(dtype), w, b, temperature), y,
                                                           keep_probs=keep)
                logps.append(logp), entropies.append(entropy), lses.append(lse)
                kept += [probs] if keep else []
        ctx.save_for_backward(hidden, weight, bias, targets, torch.cat(lses), *kept)
        ctx.temperature, ctx.chunk, ctx.dtype, ctx.grad_in_place = temperature, chunk, dtype, grad_in_place
        entropy = torch.cat(entropies)
        ctx.mark_non_differentiable(entropy)
        return torch.cat(logps), entropy

    @staticmethod
    def backward(ctx: Any, grad_logps: torch.Tensor, _grad_entropy: Any) -> tuple[Any, ...]:
        hidden, weight, bias, targets, lse, *kept_probs = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        temperature, chunk, dtype = ctx.temperature, ctx.chunk, ctx.dtype
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = _grad_buffer(weight) if need_w and ctx.grad_in_place else None
        in_place = grad_w is not None
        if need_w and not in_place:
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        with _no_autocast(hidden.device):
            for index, start in enumerate(range(0, max(len(hidden), 1), chunk)):
                rows = slice(start, start + chunk)
                h = hidden[rows].to(dtype)
                if kept_probs:  # used up in place: a second backward would be refused by autograd
                    probs = kept_probs[index]
                else:
                    probs = _linear_logits(h, w, b, temperature).sub_(lse[rows].unsqueeze(1)).exp_()
                grad_z = _probs_grad(probs, targets[rows], grad_logps[rows].float(), temperature)
                if grad_b is not None:
                    grad_b += grad_z.sum(0)
                grad_z = grad_z.to(dtype)
                if grad_h is not None:
                    grad_h[rows] = grad_z @ w
                if grad_w is not None and dtype == grad_w.dtype:  # in place: no third (V, H) matrix at the peak
                    grad_w.addmm_(grad_z.t(), h)
                elif grad_w is not None:  # a bfloat16 product, summed in float32
                    grad_w += grad_z.t() @ h
        return (grad_h, None if grad_w is None or in_place else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None, None, None)


def _adds_grad_in_place(weight: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the LM head's backward may add dL/dW into `weight.grad` itself, bypassing autograd's accumulation:
    a float32 leaf weight computed in float32, in a single process (DDP, FSDP and DeepSpeed reduce gradients from
    hooks on that accumulation), with no hooks of its own."""
    return (weight.requires_grad and weight.is_leaf and weight.dtype == dtype == torch.float32
            and not (torch.distributed.is_available() and torch.distributed.is_initialized())
            and not weight._backward_hooks and not weight._post_accumulate_grad_hooks)


def _grad_buffer(weight: torch.Tensor) -> torch.Tensor | None:
    """`weight.grad` to add into (zeros if there is none yet), or None where it is not a plain tensor of the
    weight's shape and dtype (then the backward returns its gradient as usual)."""
    if weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    grad = weight.grad
    plain = grad.shape == weight.shape and grad.dtype == weight.dtype and grad.layout == torch.strided
    return grad if plain else None


class _TokenEmbedding(torch.autograd.Function):
    """weight[ids], an `nn.Embedding` lookup, whose backward adds each token's gradient into its row of
    `weight.grad` itself (`index_add_`; `padding_idx`'s row gets none, as in `nn.Embedding`) and returns None
    for the weight.

    autograd's backward of the lookup builds a dense (V, H) gradient, zero but for the micro-batch's few hundred
    distinct tokens, and then adds it into `.grad`, at the end of the backward, where the gradients of every
    layer are alive: SmolLM2, 108 MiB written twice and read once, 15.1 ms a micro-batch of 547 tokens on 2 CPU
    cores. Added in place, only the looked-up rows are touched: 0.7 ms."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, ids: torch.Tensor, padding_idx: int | None) -> torch.Tensor:
        ctx.save_for_backward(weight, ids)
        ctx.padding_idx = padding_idx
        return torch.nn.functional.embedding(ids, weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        weight, ids = ctx.saved_tensors
        ids, grad = ids.flatten(), grad.reshape(-1, weight.size(1)).to(weight.dtype)
        if ctx.padding_idx is not None:
            real = ids != ctx.padding_idx
            ids, grad = ids[real], grad[real]
        buffer = _grad_buffer(weight)
        if buffer is None:  # a .grad autograd must accumulate into: the dense gradient after all
            return torch.zeros_like(weight).index_add_(0, ids, grad), None, None
        buffer.index_add_(0, ids, grad)
        return None, None, None


def _embedding_adding_in_place(body: torch.nn.Module) -> torch.nn.Embedding | None:
    """`body`'s input embedding where `_TokenEmbedding` may stand in for it: a plain `nn.Embedding` (no max_norm,
    gradient scaling or sparse gradient, no hooks: NEFTune's noise is one) whose weight `_adds_grad_in_place`
    allows, in a decoder of the plain Llama-family text models whose forward takes `inputs_embeds` (others may
    read the token ids for more than the lookup)."""
    embedding = body.get_input_embeddings() if hasattr(body, "get_input_embeddings") else None
    if (type(embedding) is not torch.nn.Embedding or embedding.max_norm is not None or embedding.scale_grad_by_freq
            or embedding.sparse or embedding._forward_pre_hooks
            or not all(_only_requires_grad(hook) for hook in embedding._forward_hooks.values())):
        return None
    if getattr(getattr(body, "config", None), "model_type", None) not in LLAMA_FAMILY:
        return None
    if "inputs_embeds" not in inspect.signature(body.forward).parameters:
        return None
    return embedding if _adds_grad_in_place(embedding.weight, torch.float32) else None


def _only_requires_grad(hook: Any) -> bool:
    """transformers' `enable_input_require_grads` hook (gradient checkpointing adds it), which only marks the
    lookup's output as requiring grad: so is `_TokenEmbedding`'s, as its weight requires grad."""
    return getattr(hook, "__qualname__", "").endswith("enable_input_require_grads.<locals>.make_inputs_require_grads")


def _embed_adding_in_place(embedding: torch.nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    return _TokenEmbedding.apply(embedding.weight, ids, embedding.padding_idx)


def _linear_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   temperature: float) -> torch.Tensor:
    """(h W^T + b) / T as a fresh float32 (n, V) tensor, for use without autograd (it is divided in place)."""
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    return logits if temperature == 1.0 else logits.div_(temperature)  # a pass over N x V floats saved


def _softmax_stats(logits: torch.Tensor, targets: torch.Tensor, keep_probs: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(logp(y), entropy, lse, p if `keep_probs`) of softmax(logits), logits (n, V) float32, without autograd.

    lse = m + log sum_v e_v with e_v = exp(z_v - m), m = max_v z_v;  H = lse - sum_v e_v z_v / sum_v e_v;
    p = e / sum_v e_v. Computed `SOFTMAX_BLOCK_BYTES` of rows at a time, so the temporaries (e, e z) are a
    block's, not the chunk's: the chunk's logits are the only (n, V) tensor, and with `keep_probs` p overwrites
    them and they are returned as p.
    """
    picked = logits.gather(1, targets.unsqueeze(1)).squeeze(1)
    lse, weighted = torch.empty_like(picked), torch.empty_like(picked)
    rows = max(1, SOFTMAX_BLOCK_BYTES // (4 * logits.size(1)))
    for start in range(0, len(logits), rows):
        block, logits_block = slice(start, start + rows), logits[start:start + rows]
        peak = logits_block.amax(1, keepdim=True)
        exps = (logits_block - peak).exp_()
        total = exps.sum(1)
        lse[block] = peak.squeeze(1) + total.log()
        weighted[block] = (exps * logits_block).sum(1) / total
        if keep_probs:
            logits_block.copy_(exps.div_(total.unsqueeze(1)))
    return picked - lse, lse - weighted, lse, logits if keep_probs else None


def _probs_grad(probs: torch.Tensor, targets: torch.Tensor, grad: torch.Tensor, temperature: float
                ) -> torch.Tensor:
    """dL/dz = g (onehot(y) - p) / T with p = softmax(z / T) (float32), computed in place over `probs`."""
    grad_z = probs.mul_(-grad.unsqueeze(1))
    grad_z.scatter_add_(1, targets.unsqueeze(1), grad.unsqueeze(1))
    return grad_z if temperature == 1.0 else grad_z.div_(temperature)


def _chunk_stats(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor,
                 temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp(y), entropy) of one chunk without autograd; an `nn.Linear` head computes as `_LinearTokenLogps`."""
    if type(head) in LINEAR_HEADS:
        dtype = _head_dtype(head, hidden.device)
        bias = None if head.bias is None else head.bias.to(dtype)
        with _no_autocast(hidden.device):
            logits = _linear_logits(hidden.to(dtype), head.weight.to(dtype), bias, temperature)
    else:
        logits = head(hidden).float().div_(temperature)
    logp, entropy, _, _ = _softmax_stats(logits, targets)
    return logp, entropy


def _differentiable_chunk_stats(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor,
                                temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp(y), entropy) of one chunk through autograd: log_softmax(head(h) / T)[y], -sum_v p_v log p_v."""
    logp_all = torch.log_softmax(head(hidden).float() / temperature, dim=-1)
    picked = logp_all.gather(1, targets.unsqueeze(1)).squeeze(1)
    return picked, -(logp_all.exp() * logp_all).sum(-1)


def _chunks(hidden: torch.Tensor, targets: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive (hidden, targets) row chunks; one empty chunk when there are no rows, so outputs keep a graph."""
    return [(hidden[i:i + size], targets[i:i + size]) for i in range(0, max(len(hidden), 1), size)]


def _unpack(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Values of the masked-in positions back into mask's (B, C) shape, 0 elsewhere (differentiable)."""
    return values.new_zeros(mask.shape).masked_scatter(mask, values)


def _head_dtype(head: torch.nn.Linear, device: torch.device) -> torch.dtype:
    """The dtype `lm_head` would run its matmul in here: float32 for a `Float32LMHead`, else the autocast dtype
    where autocast is on, else the weight's."""
    if isinstance(head, Float32LMHead):
        return torch.float32
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else head.weight.dtype


def _no_autocast(device: torch.device) -> AbstractContextManager:
    return torch.autocast(device.type, enabled=False)


# ---- the full-logits path ------------------------------------------------------------------------------------
def _model_inputs(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
                  completion_mask: torch.Tensor) -> dict[str, Any]:
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)


def _full_logits_logps(model: Any, inputs: dict[str, Any], completion_ids: torch.Tensor, temperature: float,
                       with_entropy: bool, entropy_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's own logits for the last C + 1 positions, then a float32 log-softmax (rows chunked)."""
    width = completion_ids.size(1)
    kwargs = dict(inputs, logits_to_keep=width + 1) if accepts_logits_to_keep(model) else inputs
    logits = model(**kwargs).logits[:, -(width + 1):-1] / temperature
    logps = selective_log_softmax(logits, completion_ids)
    entropy = entropy_from_logits(logits if entropy_grad else logits.detach()) if with_entropy else None
    return logps, entropy


def router_aux_loss_logps(model: Any, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                          completion_ids: torch.Tensor, completion_mask: torch.Tensor, temperature: float = 1.0,
                          entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-probs, entropy, MoE router load-balancing loss) of a Mixture-of-Experts model, from its own forward
    with `output_router_logits=True` (the model computes `aux_loss` itself), through the full-logits path."""
    device = next(model.parameters()).device
    completion_ids = completion_ids.to(device)
    inputs = _model_inputs(prompt_ids.to(device), prompt_mask.to(device), completion_ids, completion_mask.to(device))
    width = completion_ids.size(1)
    kwargs = dict(inputs, logits_to_keep=width + 1) if accepts_logits_to_keep(model) else inputs
    out = model(**kwargs, output_router_logits=True)
    logits = out.logits[:, -(width + 1):-1] / temperature
    entropy = entropy_from_logits(logits if entropy_grad else logits.detach())
    return selective_log_softmax(logits, completion_ids), entropy, out.aux_loss


class PolicyLogps(torch.nn.Module):
    """`completion_logps` of a model as a module of its own. DDP must see the forward that produces the loss in
    order to synchronise gradients, and a DDP-wrapped causal LM would only offer its full-logits forward; wrapping
    this module instead keeps the chunked LM head under DDP. `router_aux_loss`: a Mixture-of-Experts model's
    forward, which also returns its router loss (`router_aux_loss_logps`). `grads_in_place`: see
    `completion_logps` (the trainer's single-process training forward)."""

    def __init__(self, model: torch.nn.Module, router_aux_loss: bool = False, grads_in_place: bool = False):
        super().__init__()
        self.model = model
        self.router_aux_loss = router_aux_loss
        self.grads_in_place = grads_in_place

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(log-probs, entropy or None, router loss or None)."""
        if self.router_aux_loss:
            kwargs.pop("with_entropy", None)
            return router_aux_loss_logps(self.model, *args, **kwargs)
        return (*completion_logps(self.model, *args, grads_in_place=self.grads_in_place, **kwargs), None)
