"""Shared-prefix packing (grpo.packing): the layout by hand, and log-probs and gradients equal to the unpacked
forward's to float rounding (stated: 1e-5 absolute on log-probs and gradients, float32, models of size ~50k).
Tests taking `device` run on GRPO_TEST_DEVICE too (tests/conftest.py)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from grpo import GRPOConfig, GRPOTrainer, packing
from grpo.logprobs import completion_logps
from grpo.packing import (
    GROUPED_ATTENTION,
    PADDING,
    PROMPT,
    GroupedAttention,
    grouped_attention,
    pack_shared_prefixes,
    packing_saves_work,
)

COMMON = dict(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)
ARCHS = {"llama": lambda: LlamaForCausalLM(LlamaConfig(**COMMON)),
         "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**COMMON))}
# rows 0, 1 and 3 share the prompt [5, 6, 7]; row 2 has [9, 10]; row 4 has [3, 4, 5, 6, 7]
PROMPTS = torch.tensor([[0, 0, 5, 6, 7], [0, 0, 5, 6, 7], [0, 0, 0, 9, 10], [0, 0, 5, 6, 7], [3, 4, 5, 6, 7]])
COMPLETION_MASK = torch.tensor([[1] * 4, [1] * 2 + [0] * 2, [1] * 3 + [0], [1] * 4, [1] + [0] * 3])


def completions() -> torch.Tensor:
    return torch.randint(11, 90, (5, 4), generator=torch.Generator().manual_seed(0))


def test_the_packed_layout_by_hand():
    prompt_ids = torch.tensor([[0, 5, 6], [0, 5, 6], [7, 8, 9]])
    completion_ids = torch.tensor([[11, 12], [13, 0], [14, 15]])
    completion_mask = torch.tensor([[1, 1], [1, 0], [1, 1]])
    packed = pack_shared_prefixes(prompt_ids, (prompt_ids > 0).long(), completion_ids, completion_mask)
    # sequence 0: prompt 5 6, row 0's 11 12, row 1's 13; sequence 1: prompt 7 8 9, row 2's 14 15
    assert packed.input_ids.tolist() == [[5, 6, 11, 12, 13], [7, 8, 9, 14, 15]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 2], [0, 1, 2, 3, 4]]
    assert packed.segments.tolist() == [[PROMPT, PROMPT, 1, 1, 2], [PROMPT, PROMPT, PROMPT, 3, 3]]
    # token 0 of rows 0 and 1 is predicted by the last prompt token (flat index 1), row 0's token 1 by its token 0
    # (index 2); row 2 lives in sequence 1 (flat offset 5): its tokens by indices 5 + 2 and 5 + 3
    assert packed.predictors[:, :2].tolist() == [[1, 2], [1, 0], [7, 8]]
    mask = packed.attention_mask()[0, 0].int().tolist()
    assert mask == [[1, 0, 0, 0, 0],   # prompt: causal
                    [1, 1, 0, 0, 0],
                    [1, 1, 1, 0, 0],   # row 0: the prompt and itself
                    [1, 1, 1, 1, 0],
                    [1, 1, 0, 0, 1]]   # row 1: the prompt and itself, never row 0
    additive = packed.attention_mask(additive_dtype=torch.float32)
    assert torch.equal(additive == 0, packed.attention_mask())


def test_padding_of_a_shorter_group_sees_only_the_prompt_and_padding():
    prompt_ids = torch.tensor([[5, 6], [5, 6], [7, 8]])
    packed = pack_shared_prefixes(prompt_ids, torch.ones_like(prompt_ids), torch.tensor([[11], [12], [13]]),
                                  torch.ones(3, 1, dtype=torch.long))
    assert packed.segments[1].tolist() == [PROMPT, PROMPT, 3, PADDING]
    assert packed.attention_mask()[1, 0, 3].tolist() == [True, True, False, True]  # no NaN row for padding


def test_nothing_to_share_or_an_empty_prompt_keeps_the_plain_layout():
    distinct = torch.tensor([[1, 2], [3, 4]])
    ones = torch.ones(2, 2, dtype=torch.long)
    assert pack_shared_prefixes(distinct, ones, distinct, ones) is None
    empty = torch.zeros(2, 2, dtype=torch.long)
    assert pack_shared_prefixes(empty, empty, distinct, ones) is None


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_log_probs_entropies_and_gradients_equal_the_unpacked_forward(arch, attention, device):
    torch.manual_seed(0)
    model = ARCHS[arch]().to(device)
    model.config._attn_implementation = attention
    prompts, ids, mask = PROMPTS.to(device), completions().to(device), COMPLETION_MASK.to(device)
    packed = pack_shared_prefixes(prompts, (prompts > 0).long(), ids, mask)
    assert packing_saves_work(packed, 5, 9, model.config)  # so share_prefix=True does take the packed path
    results = {}
    for share in (False, True):
        model.zero_grad()
        logps, entropy = completion_logps(model, prompts, (prompts > 0).long(), ids, mask, 0.7, with_entropy=True,
                                          share_prefix=share)
        (logps * mask).sum().backward()
        results[share] = (logps.detach() * mask, entropy * mask, [p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(results[True][0], results[False][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(results[True][1], results[False][1], rtol=0, atol=1e-5)
    for packed_grad, plain_grad in zip(results[True][2], results[False][2]):
        torch.testing.assert_close(packed_grad, plain_grad, rtol=0, atol=1e-5)


def test_lora_gradients_equal_the_unpacked_forward():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = peft.get_peft_model(ARCHS["llama"](), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                  init_lora_weights=False))
    ids, mask = completions(), COMPLETION_MASK
    grads = {}
    for share in (False, True):
        model.zero_grad()
        logps, _ = completion_logps(model, PROMPTS, (PROMPTS > 0).long(), ids, mask, share_prefix=share)
        (logps * mask).sum().backward()
        grads[share] = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    assert grads[True] and all(torch.allclose(a, b, rtol=0, atol=1e-5) for a, b in zip(grads[True], grads[False]))


def test_gather_rows_sums_a_repeated_row_in_a_fixed_order():
    """A group's last prompt token predicts the first token of each of its completions, so its row repeats in
    `predictors`. With several CPU threads the backward of rows[index] summed repeats in a varying order (at
    this size its gradients differed from the first repeat on, 2 threads); gather_rows' must not: five passes
    bit-identical, and equal to rows[index]'s values and (to rounding) gradients."""
    torch.manual_seed(0)
    rows = torch.randn(4000, 256, requires_grad=True)
    index, weights = torch.randint(0, 4000, (16, 300)), torch.randn(16, 300, 256)
    grads = []
    for _ in range(5):
        rows.grad = None
        (packing.gather_rows(rows, index) * weights).sum().backward()
        grads.append(rows.grad.clone())
    assert all(torch.equal(grad, grads[0]) for grad in grads[1:])
    rows.grad = None
    (rows[index] * weights).sum().backward()
    torch.testing.assert_close(grads[0], rows.grad)
    assert torch.equal(packing.gather_rows(rows, index), rows[index])


def test_packing_only_where_it_saves_work_by_hand():
    from types import SimpleNamespace

    # h 4, i 8, 2 heads of 2 (kv heads 2): p = 2 h^2 + 2 h kv + 3 h i = 32 + 32 + 96 = 160; k = 3 h / p = 0.075
    config = SimpleNamespace(hidden_size=4, intermediate_size=8, num_attention_heads=2, num_key_value_heads=2)
    packed = pack_shared_prefixes(torch.ones(2, 2, dtype=torch.long), torch.ones(2, 2, dtype=torch.long),
                                  torch.ones(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.long))
    assert packed.input_ids.shape == (1, 10)  # 2 prompt + 2 x 4 completion tokens: 10 x (1 + 0.75) = 17.5
    assert packing_saves_work(packed, 2, 8, config)  # unpacked 2 x 8 x (1 + 0.6) = 25.6
    assert not packing_saves_work(packed, 2, 6, config)  # 2 x 6 x (1 + 0.45) = 17.4
    assert packing_saves_work(packed, 2, 6, SimpleNamespace())  # sizes unknown: pack
    # attention by the layout (P 2, C 4, B 2): 1 x 2^2 + 2 x 4 x (2 + 4) = 52 pairs: 10 + 0.075 x 52 = 13.9
    assert packing_saves_work(packed, 2, 6, config, grouped=True)  # 17.4
    assert not packing_saves_work(packed, 2, 5, config, grouped=True)  # 2 x 5 + 0.075 x 2 x 25 = 13.75


def count_grouped_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = GroupedAttention.__call__
    monkeypatch.setattr(GroupedAttention, "__call__",
                        lambda self, *args, **kwargs: calls.append(1) or original(self, *args, **kwargs))
    return calls


def test_grouped_attention_equals_the_masked_attention_by_hand():
    """`GroupedAttention` against SDPA under the packed mask over every pair: three sequences (prompts of 3, 2
    and 5 tokens), rows of 4, 2, 3, 4 and 1 tokens and an empty one, 4 query heads on 2 key/value heads. Outputs
    and the gradients of queries, keys and values equal to 1e-6 at every token that is not padding."""
    prompts = torch.cat([PROMPTS, PROMPTS[:1]])
    mask = torch.cat([COMPLETION_MASK, torch.zeros(1, 4, dtype=torch.long)])
    packed = pack_shared_prefixes(prompts, (prompts > 0).long(), torch.randint(11, 90, (6, 4)), mask)
    sequences, width = packed.input_ids.shape
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(sequences, 4, width, 8, generator=generator, requires_grad=True)
    key, value = (torch.randn(sequences, 2, width, 8, generator=generator, requires_grad=True) for _ in range(2))
    weights = torch.randn(sequences, width, 4, 8, generator=generator) * (packed.segments != PADDING)[..., None, None]
    results = []
    for grouped in (True, False):
        if grouped:
            out = GroupedAttention.of(packed)(query, key, value, scale=0.3)
        else:
            out = torch.nn.functional.scaled_dot_product_attention(
                query, key.repeat_interleave(2, 1), value.repeat_interleave(2, 1),
                attn_mask=packed.attention_mask(), scale=0.3).transpose(1, 2)
        grads = torch.autograd.grad((out * weights).sum(), (query, key, value))
        results.append((out * (weights != 0), grads))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-6)
    for grouped_grad, masked_grad in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(grouped_grad, masked_grad, rtol=0, atol=1e-6)


def test_grouped_attention_runs_under_sdpa_only_and_restores_the_config(monkeypatch):
    """The packed forward of an SDPA model goes through `GroupedAttention` (once per layer) and leaves the
    model's attention implementation as it found it, also when the forward raises; eager attention keeps the
    masked path."""
    calls = count_grouped_calls(monkeypatch)
    torch.manual_seed(0)
    model = ARCHS["llama"]()
    ids = completions()
    for attention, expected in (("sdpa", 2), ("eager", 0)):
        calls.clear()
        model.config._attn_implementation = attention
        completion_logps(model, PROMPTS, (PROMPTS > 0).long(), ids, COMPLETION_MASK)
        assert len(calls) == expected and model.config._attn_implementation == attention
    model.config._attn_implementation = "sdpa"
    with pytest.raises(RuntimeError, match="boom"), grouped_attention(model.model):
        assert model.config._attn_implementation == GROUPED_ATTENTION
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"


def test_gradients_under_gradient_checkpointing_equal_the_unpacked_forward(monkeypatch):
    """Checkpointing recomputes each layer in the backward, which must save the tensors the forward saved: a
    packed forward alone keeps the masked attention (the backward is outside its reach), one inside a
    `grouped_attention` scope that also holds the backward (as the trainer's step does) goes by the layout."""
    calls = count_grouped_calls(monkeypatch)
    torch.manual_seed(0)
    model = ARCHS["llama"]()
    model.gradient_checkpointing_enable({"use_reentrant": False})
    model.train()
    ids = completions()
    grads = {}
    for share, scope in ((False, None), (True, None), (True, "grouped")):
        model.zero_grad()
        calls.clear()
        with grouped_attention(model) if scope else contextlib.nullcontext():
            logps, _ = completion_logps(model, PROMPTS, (PROMPTS > 0).long(), ids, COMPLETION_MASK,
                                        share_prefix=share)
            (logps * COMPLETION_MASK).sum().backward()
        assert len(calls) == (4 if scope else 0)  # 2 layers, each forward once and recomputed once
        grads[share, scope] = [p.grad.clone() for p in model.parameters()]
    for packed in ((True, None), (True, "grouped")):
        for packed_grad, plain_grad in zip(grads[packed], grads[False, None]):
            torch.testing.assert_close(packed_grad, plain_grad, rtol=0, atol=1e-5)


def test_long_completions_of_a_short_prompt_are_packed_only_with_attention_by_the_layout(monkeypatch):
    """A 3-token prompt and 8 completions of 40 tokens: under eager attention one 323-token packed sequence would
    score more pairs than the 8 rows of 43 it replaces, so the forward stays unpacked; under SDPA attention runs by
    the layout (8 x 40 x 43 pairs), so it packs."""
    calls = []
    original = packing.shared_prefix_hidden
    monkeypatch.setattr("grpo.logprobs.shared_prefix_hidden", lambda body, packed, grouped, **kw: calls.append(
        (body.config._attn_implementation, grouped)) or original(body, packed, grouped, **kw))
    torch.manual_seed(0)
    model = ARCHS["llama"]()
    prompt = torch.tensor([[5, 6, 7]] * 8)
    ids = torch.randint(11, 90, (8, 40))
    for attention in ("eager", "sdpa"):
        model.config._attn_implementation = attention
        logps, _ = completion_logps(model, prompt, torch.ones_like(prompt), ids, torch.ones_like(ids))
        assert logps.shape == (8, 40)
    assert calls == [("sdpa", True)]


def test_bf16_autocast_log_probs_stay_close_to_float32(device):
    """bf16 has 8 bits of mantissa: log-probs of a random model (about -4.5) agree to within 0.05."""
    torch.manual_seed(0)
    model = ARCHS["llama"]().to(device)
    prompts, ids, mask = PROMPTS.to(device), completions().to(device), COMPLETION_MASK.to(device)
    with torch.no_grad():
        full, _ = completion_logps(model, prompts, (prompts > 0).long(), ids, mask)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            half, _ = completion_logps(model, prompts, (prompts > 0).long(), ids, mask)
    torch.testing.assert_close(half * mask, full * mask, rtol=0, atol=5e-2)


def test_the_trainer_packs_each_groups_prompt_once(tiny_model_dir, tmp_path, monkeypatch):
    """G = 4 and 4 rows a micro-batch: each training forward holds one group, packed into one sequence."""
    calls = []
    original = packing.shared_prefix_hidden

    def recording(body, packed, grouped, **kwargs):
        calls.append(packed.input_ids.size(0))
        return original(body, packed, grouped, **kwargs)

    monkeypatch.setattr("grpo.logprobs.shared_prefix_hidden", recording)
    args = GRPOConfig(output_dir=str(tmp_path), num_generations=4, per_device_train_batch_size=4,
                      gradient_accumulation_steps=2, max_completion_length=6, max_steps=1, report_to="none",
                      save_strategy="no", disable_tqdm=True, gradient_checkpointing=False)
    rows = [{"prompt": f"Write about {topic}:"} for topic in ("rain", "snow", "the sea", "a cat")]
    GRPOTrainer(model=tiny_model_dir, args=args, train_dataset=rows,
                reward_funcs=lambda completions, **kw: [len(c) for c in completions]).train()
    assert calls == [1, 1]  # two micro-batches, each one packed sequence (one prompt)


def test_the_trainer_attends_by_the_layout_under_gradient_checkpointing(tiny_model_dir, tmp_path, monkeypatch):
    """With checkpointing the step's backward recomputes each layer; the trainer's scope over forward and
    backward keeps attention by the layout in both (a mismatch would raise torch's CheckpointError)."""
    calls = count_grouped_calls(monkeypatch)
    args = GRPOConfig(output_dir=str(tmp_path), num_generations=4, per_device_train_batch_size=4,
                      gradient_accumulation_steps=1, max_completion_length=6, max_steps=1, report_to="none",
                      save_strategy="no", disable_tqdm=True, gradient_checkpointing=True,
                      skip_zero_advantage_rows=False)  # trained even where the completions' lengths tie
    trainer = GRPOTrainer(model=tiny_model_dir, args=args, train_dataset=[{"prompt": "Write about rain:"}] * 4,
                          reward_funcs=lambda completions, **kw: [len(c) for c in completions])
    trainer.train()
    layers = trainer.model.config.num_hidden_layers
    assert len(calls) == 2 * layers and trainer.model.config._attn_implementation == "sdpa"
