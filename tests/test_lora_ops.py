"""The LoRA linear of the training step (grpo/lora_ops.py) against PEFT's own forward: outputs and every
gradient, one linear and whole models with and without gradient checkpointing, and what stays PEFT's."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from grpo.logprobs import completion_logps
from grpo.lora_ops import _plain_lora, lora_linear, lora_linears


def test_one_linear_equals_the_formula_in_float64():
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 5, 12), torch.randn(7, 12), torch.randn(7)
    a, bb, upstream = torch.randn(3, 12), torch.randn(7, 3), torch.randn(2, 5, 7)
    leaves = [t.clone().requires_grad_() for t in (x, a, bb)]
    out = lora_linear(leaves[0], w, b, leaves[1], leaves[2], 0.5)
    out.backward(upstream)
    ref = [t.double().clone().requires_grad_() for t in (x, a, bb)]
    expected = ref[0] @ w.double().t() + b.double() + 0.5 * (ref[0] @ ref[1].t()) @ ref[2].t()
    expected.backward(upstream.double())
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    for ours, theirs in zip(leaves, ref):
        torch.testing.assert_close(ours.grad.double(), theirs.grad, atol=1e-5, rtol=1e-5)


def lora_model(dropout: float = 0.0, **lora: object) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=200, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                lora_dropout=dropout, **lora))
    for name, param in model.named_parameters():  # B starts at zero: give it values so every gradient is nonzero
        if "lora_B" in name:
            param.data.normal_(0, 0.1)
    return model


def logps_and_grads(model, checkpointing: bool, scoped: bool):
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    g = torch.Generator().manual_seed(1)
    prompt, completion = torch.randint(3, 200, (4, 6), generator=g), torch.randint(3, 200, (4, 5), generator=g)
    with lora_linears(model) if scoped else nullcontext():
        logps, _ = completion_logps(model, prompt, torch.ones_like(prompt), completion, torch.ones_like(completion),
                                    1.0)
        (logps * torch.linspace(-1, 1, logps.numel()).view_as(logps)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return logps.detach(), grads


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_peft_model_inside_the_scope_equals_peft(checkpointing):
    model = lora_model()
    assert sum(_plain_lora(m) for m in model.modules()) == 14  # 7 linears x 2 layers
    theirs = logps_and_grads(model, checkpointing, scoped=False)
    ours = logps_and_grads(model, checkpointing, scoped=True)
    torch.testing.assert_close(ours[0], theirs[0], atol=1e-5, rtol=1e-5)
    assert ours[1].keys() == theirs[1].keys() and len(ours[1]) == 28
    for name in theirs[1]:
        assert theirs[1][name].abs().sum() > 0
        torch.testing.assert_close(ours[1][name], theirs[1][name], atol=1e-5, rtol=1e-4)
    assert all("forward" not in vars(m) for m in model.modules())  # PEFT's forwards are back


@pytest.mark.parametrize("case", ["dropout", "dora", "trainable_base"])
def test_what_the_function_does_not_cover_stays_peft(case):
    model = lora_model(0.1) if case == "dropout" else lora_model(use_dora=True) if case == "dora" else lora_model()
    if case == "trainable_base":
        model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.requires_grad_(True)
    covered = sum(_plain_lora(m) for m in model.modules())
    assert covered == {"dropout": 0, "dora": 0, "trainable_base": 13}[case]
