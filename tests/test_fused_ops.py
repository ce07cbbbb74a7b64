"""The fused element-wise kernels of the training forward (grpo/fused_ops.py): each against transformers' own
computation (outputs and gradients), and the `fused_ops` scope over whole models against the same models outside
it, with and without gradient checkpointing."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.models.llama import modeling_llama
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

import grpo.fused_ops as fused
from grpo.fused_ops import fused_ops, rms_norm, rotary, swiglu
from grpo.logprobs import completion_logps
from grpo.packing import grouped_attention

needs_kernels = pytest.mark.skipif(fused._kernel("grpo_swiglu_forward") is None,
                                   reason="no C compiler to build the kernels with")
COMMON = dict(vocab_size=200, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, pad_token_id=0)


def grads(fn, inputs, upstream):
    """fn(*inputs) and the gradient of <fn(*inputs), upstream> with respect to each input."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    outputs = fn(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    torch.autograd.backward(outputs, upstream)
    return [o.detach() for o in outputs], [leaf.grad for leaf in leaves]


def assert_all_close(ours, theirs, atol=1e-5, rtol=1e-5):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


@needs_kernels
@pytest.mark.parametrize("shape", [(3, 5, 64), (7, 33)])  # 33: a row length the vector width does not divide
def test_rms_norm_equals_transformers(shape):
    torch.manual_seed(0)
    norm = LlamaRMSNorm(shape[-1], eps=1e-5)
    norm.weight.data = torch.randn(shape[-1])
    x, upstream = torch.randn(shape) * 3, torch.randn(shape)
    theirs = grads(lambda x, w: torch.func.functional_call(norm, {"weight": w}, (x,)), [x, norm.weight], [upstream])
    ours = grads(lambda x, w: rms_norm(x, w, 1e-5), [x, norm.weight], [upstream])
    assert_all_close(ours[0] + ours[1], theirs[0] + theirs[1])
    # a transposed input (not contiguous) and a frozen weight: the kernel copies x, and computes no dw
    x_t = torch.randn(shape[-1], *shape[:-1]).movedim(0, -1)
    frozen = rms_norm(x_t.requires_grad_(), norm.weight.detach(), 1e-5)
    frozen.backward(upstream)
    expected = grads(lambda x: norm(x), [x_t.detach()], [upstream])
    assert_all_close([frozen.detach(), x_t.grad], expected[0] + expected[1])


@needs_kernels
def test_swiglu_equals_silu_times_up():
    torch.manual_seed(0)
    gate, up, upstream = torch.randn(5, 37) * 4, torch.randn(5, 37), torch.randn(5, 37)
    theirs = grads(lambda g, u: torch.nn.functional.silu(g) * u, [gate, up], [upstream])
    ours = grads(swiglu, [gate, up], [upstream])
    assert_all_close(ours[0] + ours[1], theirs[0] + theirs[1])


@needs_kernels
@pytest.mark.parametrize("cos_batch", [1, 3])
def test_rotary_equals_transformers(cos_batch):
    """q and k as transformers hands them over, (B, L, H, D) projections transposed to (B, H, L, D)."""
    torch.manual_seed(0)
    batch, length, heads, kv_heads, dim = 3, 7, 4, 2, 8
    q = torch.randn(batch, length, heads, dim).transpose(1, 2)
    k = torch.randn(batch, length, kv_heads, dim).transpose(1, 2)
    angles = torch.randn(cos_batch, length, dim // 2).repeat(1, 1, 2)
    cos, sin = angles.cos(), angles.sin() * torch.linspace(0.5, 1.5, dim)  # halves of sin unequal: the transpose shows
    upstream = [torch.randn(batch, heads, length, dim), torch.randn(batch, kv_heads, length, dim)]
    theirs = grads(lambda q, k: modeling_llama.apply_rotary_pos_emb(q, k, cos, sin), [q, k], upstream)
    ours = grads(lambda q, k: rotary(q, k, cos, sin), [q, k], upstream)
    assert_all_close(ours[0] + ours[1], theirs[0] + theirs[1], atol=1e-6, rtol=1e-6)
    assert ours[0][0].shape == theirs[0][0].shape


def test_each_falls_back_to_transformers_outside_float32():
    torch.manual_seed(0)
    norm, x = LlamaRMSNorm(16), torch.randn(4, 16, dtype=torch.bfloat16)
    torch.testing.assert_close(rms_norm(x, norm.weight, norm.variance_epsilon), norm(x))
    gate, up = torch.randn(4, 16, dtype=torch.bfloat16), torch.randn(4, 16, dtype=torch.bfloat16)
    torch.testing.assert_close(swiglu(gate, up), torch.nn.functional.silu(gate) * up)
    q, k = torch.randn(1, 2, 3, 8, dtype=torch.bfloat16), torch.randn(1, 2, 3, 8, dtype=torch.bfloat16)
    cos, sin = torch.randn(1, 3, 8, dtype=torch.bfloat16), torch.randn(1, 3, 8, dtype=torch.bfloat16)
    for ours, theirs in zip(rotary(q, k, cos, sin), modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)):
        torch.testing.assert_close(ours, theirs)


def make_model(arch: str, checkpointing: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = {"llama": lambda: LlamaForCausalLM(LlamaConfig(**COMMON)),
             "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**COMMON)),  # q/k/v biases
             "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**COMMON, head_dim=12))}[arch]()  # q/k norms
    model.config._attn_implementation = "sdpa"
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    return model


def logps_and_grads(model, fused_scope: bool):
    """The trainer's micro-batch: two prompts of 5 and 3 tokens, three completions each, log-probs and a weighted
    sum's gradients, in one scope over forward and backward."""
    model.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(3, 200, (2, 5), generator=g).repeat_interleave(3, 0)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[3:, :2] = 0
    completion_ids = torch.randint(3, 200, (6, 6), generator=g)
    completion_mask = (torch.arange(6) < torch.tensor([6, 4, 5, 1, 6, 3]).unsqueeze(1)).long()
    with grouped_attention(model.model), fused_ops(model.model) if fused_scope else nullcontext():
        logps, _ = completion_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
        weights = torch.linspace(-1.0, 2.0, logps.numel()).view(logps.shape)
        (weights * logps * completion_mask).sum().backward()
    return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@needs_kernels
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_model_in_the_scope_gives_transformers_numbers(arch, checkpointing, monkeypatch):
    model = make_model(arch, checkpointing)
    calls = {"norm": 0, "swiglu": 0, "rotary": 0}
    for name, function in (("norm", fused._RMSNorm), ("swiglu", fused._SwiGLU), ("rotary", fused._Rotary)):

        def counted(*args, _original=function.forward, _name=name):
            calls[_name] += 1
            return _original(*args)

        monkeypatch.setattr(function, "forward", staticmethod(counted))
    ours = logps_and_grads(model, True)
    monkeypatch.undo()
    theirs = logps_and_grads(model, False)
    torch.testing.assert_close(ours[0], theirs[0], atol=1e-5, rtol=1e-5)
    assert ours[1].keys() == theirs[1].keys()
    for name in ours[1]:
        torch.testing.assert_close(ours[1][name], theirs[1][name], atol=1e-5, rtol=1e-4, msg=name)
    layers, passes = 2, 2 if checkpointing else 1  # checkpointing runs each layer's forward again in the backward
    norms_per_layer = 4 if arch == "qwen3" else 2
    assert calls == {"norm": passes * layers * norms_per_layer + 1, "swiglu": passes * layers,
                     "rotary": passes * layers}


def test_the_scope_restores_every_forward_and_touches_nothing_else():
    model = make_model("llama", checkpointing=False)
    layer = model.model.layers[0]
    accelerate_style = layer.mlp.forward  # a module whose forward is its own instance attribute is left alone
    layer.mlp.forward = accelerate_style
    original_rotary = modeling_llama.apply_rotary_pos_emb
    with fused_ops(model.model):
        if fused._kernel("grpo_swiglu_forward") is not None:
            assert modeling_llama.apply_rotary_pos_emb is rotary
            assert "forward" in vars(model.model.norm) and layer.mlp.forward is accelerate_style
            assert "forward" in vars(model.model.layers[1].mlp)
        with fused_ops(model.model):  # nested: the inner scope leaves the outer's replacements as it found them
            pass
        if fused._kernel("grpo_swiglu_forward") is not None:
            assert modeling_llama.apply_rotary_pos_emb is rotary
    assert modeling_llama.apply_rotary_pos_emb is original_rotary
    assert [type(m).__name__ for m in model.modules() if "forward" in vars(m)] == ["LlamaMLP"]
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with fused_ops(gpt2.transformer):
        assert not any("forward" in vars(m) for m in gpt2.modules())
    bfloat16 = make_model("llama", checkpointing=False).to(torch.bfloat16)  # the kernels are float32 code
    with fused_ops(bfloat16.model):
        assert not any("forward" in vars(m) for m in bfloat16.modules())
        assert modeling_llama.apply_rotary_pos_emb is original_rotary


def test_without_the_kernels_the_scope_changes_nothing(monkeypatch):
    monkeypatch.setattr(fused, "_kernel", lambda name: None)  # as where the library cannot be built
    model = make_model("llama", checkpointing=False)
    mlp = LlamaMLP(model.config)
    with fused_ops(model.model):
        assert not any("forward" in vars(m) for m in model.modules())
        assert modeling_llama.apply_rotary_pos_emb is not rotary
    x = torch.randn(2, 48)
    torch.testing.assert_close(rms_norm(x, model.model.norm.weight, 1e-6), model.model.norm(x))
    torch.testing.assert_close(swiglu(mlp.gate_proj(x), mlp.up_proj(x)),
                               mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
