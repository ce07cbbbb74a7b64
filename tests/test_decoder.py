"""The lean decode step against transformers' own forward, for each architecture and weight layout it covers."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from grpo import GRPOConfig
from grpo.models import STANDARD_RMS_NORMS
from grpo.rollout import RolloutEngine, decode_linear
from grpo.rollout import decoder as decoder_module
from grpo.rollout.base import left_pad
from grpo.rollout.decoder import FoldedRMSNorm, LeanDecoder, _norm, interleaved_pairs
from grpo.rollout.engine import _preallocated_cache
from grpo.rollout.kv_cache import CopiedKV, GroupKV
from test_rollout import SamplingRecorder

VOCAB, PAD, BOS, EOS = 96, 0, 1, 2
COMMON = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
              pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, max_position_embeddings=256)
ARCHS = {
    # grouped-query attention and biased projections everywhere
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**COMMON, num_key_value_heads=2, attention_bias=True,
                                                  mlp_bias=True, tie_word_embeddings=False)),
    # q/k/v biases, tied input and output embeddings, scaled rope
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**COMMON, num_key_value_heads=4, tie_word_embeddings=True,
                                                  rope_scaling={"rope_type": "linear", "factor": 2.0})),
    # per-head q/k RMSNorm
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**COMMON, num_key_value_heads=2, head_dim=16,
                                                  tie_word_embeddings=False)),
    # a sliding window longer than any sequence here
    "mistral": lambda: MistralForCausalLM(MistralConfig(**COMMON, num_key_value_heads=1, sliding_window=128,
                                                        tie_word_embeddings=False)),
}
PROMPTS = [[BOS, 5, 6, 7], [BOS, 9], [BOS, 10, 11, 12, 13, 14, 15, 16, 17]]


def build(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = ARCHS[arch]().eval()
    with torch.no_grad():  # random biases and norm weights, so that a dropped term would show
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.normal_(0.0, 0.5)
    return model


def decode_logits(decoder: LeanDecoder, model: torch.nn.Module, continuation: torch.Tensor, shared: bool = False,
                  prefill_atol: float = 1e-4) -> list[torch.Tensor]:
    """Prefill PROMPTS through the lean layers (checking the logits against transformers' to `prefill_atol`),
    then feed `continuation` (rows, steps) one token at a time through the lean step, over a copied (or
    `shared`: one per prompt) KV cache; the logits after each token."""
    ids, mask = left_pad(PROMPTS, PAD)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = _preallocated_cache(model.config, ids.size(1) + (0 if shared else continuation.size(1)))
    prompt_logits = decoder.prefill(ids, mask, positions, cache)
    expected = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
    torch.testing.assert_close(prompt_logits, expected, rtol=prefill_atol, atol=prefill_atol)
    kv = GroupKV.from_prefill(cache, mask, 1, continuation.size(1)) if shared else CopiedKV(cache, mask)
    logits, position = [], positions[:, -1]
    for token in continuation.unbind(1):
        position = position + 1
        logits.append(decoder.step(token, position, kv))
    return logits


def full_forward_logits(model: torch.nn.Module, continuation: torch.Tensor) -> torch.Tensor:
    """transformers' logits at the continuation's positions, from one forward over prompt + continuation."""
    ids, mask = left_pad(PROMPTS, PAD)
    ids, mask = torch.cat([ids, continuation], 1), torch.cat([mask, torch.ones_like(continuation)], 1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    return logits[:, -continuation.size(1):]


@pytest.mark.parametrize("kv", ["copied", "shared"])
@pytest.mark.parametrize("layout", ["kernel", "packed", "transposed", "original"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
@torch.no_grad()
def test_lean_step_logits_equal_transformers_forward(arch, layout, kv, attention, monkeypatch):
    model = build(arch)
    if layout == "kernel" and not decode_linear.available():
        pytest.skip("no C compiler to build the decode-linear kernel with")
    if layout in ("packed", "transposed"):  # the fallbacks without a C compiler, and without oneDNN either
        monkeypatch.setattr(decode_linear, "available", lambda *args: False)
    if layout == "transposed":
        monkeypatch.setattr(decoder_module, "_onednn_packed", lambda weight, rows: None)
    decoder = LeanDecoder.from_model(model, capacity=32, rows=len(PROMPTS), copy=layout != "original")
    assert decoder is not None and decoder.lm_head.layout == layout
    assert decoder.folded == (layout != "original")  # norms folded in, rotary pairs interleaved
    layer = decoder.layers[0]
    if layout == "packed":  # but small projections into the residual stream are left to BLAS
        assert layer.qkv[0].layout == "packed"
        assert layer.o.layout == layer.down.layout == "transposed"
    if layout == "kernel":  # every linear, the gate and up projections one gated projection
        assert [p.layout for p in (*layer.qkv, layer.o, *layer.gate_up, layer.down)] == ["kernel"] * 4
        assert layer.gate_up[0].gated
    # all layers in one call into C where every linear is the kernel's, but for Qwen3's per-head q/k norms
    assert (decoder.one_call is not None) == (layout == "kernel" and arch != "qwen3")
    one_call_steps = []
    if decoder.one_call is not None:  # it runs over the shared prompt cache with its attention kernel
        runs = decoder.one_call.runs
        monkeypatch.setattr(decoder.one_call, "runs", lambda cache: one_call_steps.append(runs(cache)) or runs(cache))
    continuation = torch.randint(3, VOCAB, (len(PROMPTS), 5), generator=torch.Generator().manual_seed(1))
    ours = torch.stack(decode_logits(decoder, model, continuation, shared=kv == "shared"), dim=1)
    torch.testing.assert_close(ours, full_forward_logits(model, continuation), rtol=1e-4, atol=1e-4)
    expected = decoder.one_call is not None and kv == "shared" and attention == "kernel"
    assert one_call_steps == ([expected] * 5 if decoder.one_call is not None else [])


@torch.no_grad()
def test_lora_adapters_are_merged_and_disabling_them_gives_the_base_model():
    from peft import LoraConfig, get_peft_model

    base = build("llama")
    continuation = torch.randint(3, VOCAB, (len(PROMPTS), 3), generator=torch.Generator().manual_seed(2))
    base_logits = full_forward_logits(base, continuation)
    targets = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]
    lora = LoraConfig(r=4, target_modules=targets, init_lora_weights=False)  # random B: the adapter matters
    model = get_peft_model(base, lora).eval()
    adapted = full_forward_logits(model, continuation)
    assert (adapted - base_logits).abs().max() > 1e-2
    ours = torch.stack(decode_logits(LeanDecoder.from_model(model, capacity=32), model, continuation), dim=1)
    torch.testing.assert_close(ours, adapted, rtol=1e-4, atol=1e-4)
    with model.disable_adapter():
        plain = torch.stack(decode_logits(LeanDecoder.from_model(model, capacity=32), model, continuation), dim=1)
    torch.testing.assert_close(plain, base_logits, rtol=1e-4, atol=1e-4)


def test_unsupported_structures_fall_back_to_transformers():
    from peft import LoraConfig, PromptTuningConfig, get_peft_model

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4))
    assert LeanDecoder.from_model(gpt2, capacity=32) is None
    sliding = Qwen2ForCausalLM(Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=16, max_window_layers=0))
    assert LeanDecoder.from_model(sliding, capacity=32) is None
    short_window = MistralForCausalLM(MistralConfig(**COMMON, sliding_window=16))
    assert LeanDecoder.from_model(short_window, capacity=32) is None
    assert LeanDecoder.from_model(short_window, capacity=16) is not None
    dora = get_peft_model(build("llama"), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    assert LeanDecoder.from_model(dora, capacity=32) is None
    prompt_tuning = get_peft_model(build("llama"), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    assert LeanDecoder.from_model(prompt_tuning, capacity=32) is None


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_f_rms_norm_is_bit_identical_to_the_models_own_norm(arch):
    model = build(arch)
    norms = [m for m in model.modules() if type(m).__name__ in STANDARD_RMS_NORMS]
    assert norms
    x = torch.randn(5, norms[0].weight.numel())
    for dtype in (torch.float32, torch.bfloat16):
        norm = norms[0].to(dtype)
        assert torch.equal(_norm(norm, x.to(dtype)), norm(x.to(dtype)))


def test_folded_rms_norm_by_hand():
    # RMSNorm([3, 4]) with w = [1, 2], eps = 0.5: [3, 4] / sqrt((9 + 16) / 2 + 0.5) * [1, 2] = [3, 8] / sqrt(13);
    # folded: [3, 4] / sqrt(25 + 2 * 0.5) = [3, 4] / sqrt(26), times sqrt(2) w = [sqrt(2), 2 sqrt(2)]
    norm = torch.nn.Module()
    norm.weight, norm.variance_epsilon = torch.nn.Parameter(torch.tensor([1.0, 2.0])), 0.5
    x = torch.tensor([[3.0, 4.0]])
    torch.testing.assert_close(FoldedRMSNorm.of(norm)(x), torch.tensor([[3.0, 4.0]]) / 26 ** 0.5)
    full = FoldedRMSNorm.of(norm, order=torch.tensor([0, 1]))
    torch.testing.assert_close(full(x), torch.tensor([[3.0, 8.0]]) / 13 ** 0.5)
    assert interleaved_pairs(6).tolist() == [0, 3, 1, 4, 2, 5]  # rotate-half pairs (i, i + 3) side by side


@pytest.mark.parametrize("kv", ["copied", "shared"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@torch.no_grad()
def test_bf16_copies_stay_close_to_the_float32_step(arch, kv, attention):
    """copy_dtype bfloat16: the layers' copies multiply in bfloat16 (where oneDNN can; float32 copies elsewhere),
    the activations and the LM head stay float32. Logits of these random models (|logit| < 0.4) agree with
    transformers' float32 forward to 5e-3 (measured: 7e-4; bfloat16 keeps 8 bits of mantissa, 2 layers deep)."""
    model = build(arch)
    decoder = LeanDecoder.from_model(model, capacity=32, rows=len(PROMPTS), copy_dtype=torch.bfloat16)
    expected = torch.bfloat16 if decoder_module.bf16_copies_supported() else torch.float32
    layer = decoder.layers[0]
    assert [p.weight.dtype for p in (*layer.qkv, layer.o, *layer.gate_up, layer.down)] == [expected] * 4
    assert decoder.lm_head.weight.dtype == torch.float32
    continuation = torch.randint(3, VOCAB, (len(PROMPTS), 5), generator=torch.Generator().manual_seed(1))
    ours = torch.stack(decode_logits(decoder, model, continuation, shared=kv == "shared", prefill_atol=5e-3), dim=1)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, full_forward_logits(model, continuation), rtol=0, atol=5e-3)


def test_bfloat16_weights_are_used_as_they_are():
    decoder = LeanDecoder.from_model(build("qwen3").to(torch.bfloat16), capacity=32)
    assert decoder is not None and not decoder.folded and decoder.lm_head.layout == "original"


def test_the_engine_decodes_llama_family_models_with_the_lean_step(monkeypatch):
    steps = []
    original = LeanDecoder.step
    monkeypatch.setattr(LeanDecoder, "step", lambda self, *a: steps.append(1) or original(self, *a))
    args = GRPOConfig(num_generations=2, per_device_train_batch_size=2, max_completion_length=6,
                      generation_kwargs={"do_sample": False})

    class Tokenizer:
        pad_token_id, eos_token_id = PAD, EOS

    model = build("qwen3")
    recorder = SamplingRecorder(monkeypatch)
    lean = RolloutEngine(Tokenizer(), args.sampling_params).generate(model, PROMPTS, 2)
    lean_logps = recorder.logps(lean)
    assert steps
    plain = RolloutEngine(Tokenizer(), args.sampling_params, lean=False).generate(model, PROMPTS, 2)
    assert torch.equal(lean.completion_ids, plain.completion_ids)
    torch.testing.assert_close(lean_logps, recorder.logps(plain), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@torch.no_grad()
def test_one_call_step_equals_the_layer_by_layer_step(arch):
    """A step's layers in one call into C (decode_layers.py) against the same layers one kernel at a time, over
    the shared prompt cache: same logits to float32 rounding (the rotation's multiply-add), and the same keys and
    values written into the cache."""
    if not decode_linear.available():
        pytest.skip("no C compiler to build the decode kernels with")
    model = build(arch)
    decoder = LeanDecoder.from_model(model, capacity=32, rows=2 * len(PROMPTS))
    assert decoder is not None and decoder.one_call is not None
    ids, mask = left_pad(PROMPTS, PAD)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    caches = []
    for _ in range(2):
        cache = _preallocated_cache(model.config, ids.size(1))
        decoder.prefill(ids, mask, positions, cache)
        caches.append(GroupKV.from_prefill(cache, mask, 2, 4))
    one_call, layer_by_layer = caches
    assert one_call.kernel and decoder.one_call.runs(one_call)
    fused, tokens = decoder.one_call, torch.randint(3, VOCAB, (2 * len(PROMPTS), 4), generator=torch.Generator())
    position = positions[:, -1].repeat_interleave(2)
    for step, token in enumerate(tokens.unbind(1)):
        decoder.one_call = fused
        ours = decoder.step(token, position + step + 1, one_call)
        decoder.one_call = None
        theirs = decoder.step(token, position + step + 1, layer_by_layer)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(one_call.own_kv, layer_by_layer.own_kv):
        torch.testing.assert_close(ours[:, :, :4], theirs[:, :, :4], rtol=1e-5, atol=1e-5)
