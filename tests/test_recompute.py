"""Gradient checkpointing only where memory needs it (grpo/recompute.py): the rule by hand, the activation estimate
as an upper bound of what layers keep, which layers recompute in which micro-batch, and gradients and training
equal to checkpointing every layer."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import grpo.recompute
import grpo.trainer
from grpo import GRPOConfig, GRPOTrainer
from grpo.embedded import length_task
from grpo.fused_ops import fused_ops
from grpo.logprobs import completion_logps
from grpo.models import activation_bytes, attention_widths
from grpo.packing import grouped_attention
from grpo.recompute import checkpointed_layers, layers_kept, recompute_where_memory_needs

SHAPE = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, pad_token_id=0)


def test_layers_kept_by_hand():
    # SmolLM2-135M, compare_trl's micro-batch of 547 packed tokens: a layer's gradients 3 540 096 x 4 bytes, 30 of
    # them 424 811 520, less the LM head's chunk (2^27): room 290 593 792. a = 547 x (10 x 576 + 4 x 1536) x 4 =
    # 26 045 952, c = 547 x 576 x 4 = 1 260 288: (290 593 792 - 30 c) / (a - c) = 252 785 152 / 24 785 664 = 10.2
    smollm2 = SimpleNamespace(num_hidden_layers=30, hidden_size=576, intermediate_size=1536)
    assert layers_kept(290_593_792, 547, smollm2, 4) == 10
    assert layers_kept(252_785_152 + 30 * 1_260_288 - 1, 547, smollm2, 4) == 10
    assert layers_kept(11 * 24_785_664 + 30 * 1_260_288, 547, smollm2, 4) == 11
    # attention by the packed layout keeps 3 626 496 bytes more a layer (rows' gathered q, k, v, output, mask):
    # 252 785 152 / (24 785 664 + 3 626 496) = 8.9
    assert layers_kept(290_593_792, 547, smollm2, 4, 3_626_496) == 8
    assert layers_kept(-2**27, 547, smollm2, 4) == 0  # the layers' gradients already allocated
    assert layers_kept(10**12, 547, smollm2, 4) == 29  # the bottom layer recomputes whatever the room


def saved_bytes_per_layer(model, run) -> tuple[int, int, object]:
    """(bytes the top decoder layer keeps for the backward, tokens it saw, the packed layout it was given) during
    `run()`, parameters not counted."""
    layer, seen, calls = model.model.layers[-1], {}, []
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    forward = layer.forward

    def keep(x):
        storage = x.untyped_storage()
        if storage.data_ptr() not in parameters:
            seen[storage.data_ptr()] = storage.nbytes()
        return x

    def counted(*args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        calls.append((hidden[..., 0].numel(), kwargs.get("attention_layout")))
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda x: x):
            return forward(*args, **kwargs)

    layer.forward = counted
    run()
    return sum(seen.values()), *calls[0]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("path", ["transformers", "trainer"])
def test_the_activation_estimate_bounds_what_a_layer_keeps(arch, path):
    torch.manual_seed(0)
    model = {"llama": lambda: LlamaForCausalLM(LlamaConfig(**SHAPE)),
             "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SHAPE))}[arch]()
    model.config._attn_implementation = "sdpa"
    model.train()
    prompt_ids = torch.randint(3, 100, (1, 9)).repeat(4, 1)
    completion_ids = torch.randint(3, 100, (4, 12))

    def run():
        if path == "transformers":
            model(input_ids=torch.cat([prompt_ids, completion_ids], 1))
        else:  # packed by the layout, fused element-wise kernels: the trainer's forward
            with grouped_attention(model.model), fused_ops(model.model):
                completion_logps(model, prompt_ids, torch.ones_like(prompt_ids), completion_ids,
                                 torch.ones_like(completion_ids))

    kept, tokens, layout = saved_bytes_per_layer(model, run)
    assert (layout is None) == (path == "transformers")
    attention = 0 if layout is None else layout.kept_bytes(*attention_widths(model.config), 4)
    estimate = activation_bytes(model.config, tokens, 4) // SHAPE["num_hidden_layers"] + attention
    assert 0.6 * estimate < kept <= estimate


def checkpointed_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE))
    model.config._attn_implementation = "sdpa"
    model.train()
    model.gradient_checkpointing_enable({"use_reentrant": False})
    return model


def two_micro_batches(model, scope) -> tuple[dict[str, torch.Tensor], list[list[int]]]:
    """A step's two micro-batches (forward and backward each, gradients accumulated) and, per micro-batch, how
    many times each layer's MLP ran (2: the backward recomputed the layer)."""
    model.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(1)
    runs: list[list[int]] = []
    hooks = [layer.mlp.register_forward_pre_hook(lambda module, args, i=i: runs[-1].__setitem__(i, runs[-1][i] + 1))
             for i, layer in enumerate(model.model.layers)]
    for _ in range(2):
        runs.append([0] * len(model.model.layers))
        prompt_ids = torch.randint(3, 100, (1, 10), generator=g).repeat(4, 1)
        completion_ids = torch.randint(3, 100, (4, 12), generator=g)
        with grouped_attention(model.model), fused_ops(model.model), scope(model.model):
            logps, _ = completion_logps(model, prompt_ids, torch.ones_like(prompt_ids), completion_ids,
                                        torch.ones_like(completion_ids), grads_in_place=True)
            (torch.linspace(-1, 1, logps.numel()).view(logps.shape) * logps).sum().backward()
    for hook in hooks:
        hook.remove()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, runs


def recording_layers_kept(monkeypatch) -> list[int]:
    """What each training forward in the scope decides, as `layers_kept` returns it."""
    kept, choose = [], grpo.recompute.layers_kept
    monkeypatch.setattr(grpo.recompute, "layers_kept", lambda *args: kept.append(choose(*args)) or kept[-1])
    return kept


def test_the_first_micro_batch_keeps_its_top_layers_and_the_gradients_are_the_same(monkeypatch):
    monkeypatch.setattr(grpo.recompute, "LOGITS_CHUNK_BYTES", 0)  # the tiny model's gradients leave no room else
    model, layers = checkpointed_llama(), SHAPE["num_hidden_layers"]
    every_layer, every_layer_runs = two_micro_batches(model, lambda body: contextlib.nullcontext())
    decided = recording_layers_kept(monkeypatch)
    ours, our_runs = two_micro_batches(model, recompute_where_memory_needs)
    kept = decided[0]
    assert 1 <= kept <= layers - 2 and decided[1] == 0  # some layers kept, some not: the test tells them apart
    assert every_layer_runs == [[2] * layers, [2] * layers]
    assert our_runs == [[2] * (layers - kept) + [1] * kept, [2] * layers]  # gradients allocated: all recompute
    for name, grad in every_layer.items():
        torch.testing.assert_close(ours[name], grad, rtol=0, atol=1e-7, msg=name)
    assert len(checkpointed_layers(model.model)) == layers  # checkpointed again on exit


def test_nothing_kept_where_the_estimate_is_no_bound_or_without_checkpointing(monkeypatch):
    monkeypatch.setattr(grpo.recompute, "LOGITS_CHUNK_BYTES", 0)
    model = checkpointed_llama()
    model.config._attn_implementation = "eager"  # its attention matrix is not in the estimate
    _, runs = two_micro_batches(model, recompute_where_memory_needs)
    assert runs[0] == [2] * SHAPE["num_hidden_layers"]
    model.config._attn_implementation = "sdpa"
    model.config.num_local_experts = 4  # as a mixture of experts' config says: its MLP is not the estimate's
    _, runs = two_micro_batches(model, recompute_where_memory_needs)
    assert runs[0] == [2] * SHAPE["num_hidden_layers"]
    del model.config.num_local_experts
    _, runs = two_micro_batches(model, recompute_where_memory_needs)
    assert runs[0] != [2] * SHAPE["num_hidden_layers"]  # the same model keeps layers without those
    model.gradient_checkpointing_disable()
    with recompute_where_memory_needs(model.model):
        assert checkpointed_layers(model.model) == []
    assert checkpointed_layers(model.model) == []  # the scope turns checkpointing on nowhere


def characters(completions, **kwargs):
    return [float(len(c)) for c in completions]


def test_training_with_layers_kept_equals_recomputing_every_layer(tmp_path, tiny_model_dir, monkeypatch):
    """GRPOTrainer, gradient checkpointing on, two micro-batches a step: the same losses, gradient norms and
    weights whether the first micro-batch keeps layers or every layer recomputes."""
    monkeypatch.setattr(grpo.recompute, "LOGITS_CHUNK_BYTES", 0)
    kept = recording_layers_kept(monkeypatch)
    results = []
    for scope in ("kept", "every layer"):
        if scope == "every layer":
            monkeypatch.setattr(grpo.trainer.GRPOTrainer, "_recompute_scope", lambda self: contextlib.nullcontext())
        args = GRPOConfig(output_dir=str(tmp_path / scope), save_strategy="no", num_generations=4,
                          per_device_train_batch_size=4, gradient_accumulation_steps=2, max_completion_length=16,
                          max_steps=2, logging_steps=1, learning_rate=1e-3, gradient_checkpointing=True,
                          disable_tqdm=True, seed=3, skip_zero_advantage_rows=False)  # two micro-batches a step
        trainer = GRPOTrainer(model=tiny_model_dir, reward_funcs=characters,
                              args=args, train_dataset=length_task(8))
        trainer.train()
        history = [(r["loss"], r["grad_norm"]) for r in trainer.state.log_history[:-1]]
        results.append((history, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}))
    assert len(kept) == 4 and min(kept[0::2]) >= 1 and kept[1::2] == [0, 0]  # the first micro-batch of each step
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    for name, weight in results[1][1].items():
        torch.testing.assert_close(results[0][1][name], weight, rtol=0, atol=1e-6, msg=name)
