"""LoRA through PEFT: only the adapter trains, the reference is the adapter switched off, the adapter saves."""

from __future__ import annotations

import peft
import pytest
import torch

from grpo import GRPOConfig, GRPOTrainer
from grpo.embedded import length_task
from grpo.rewards import length_reward


def lora_trainer(tmp_path, model_dir, **overrides):
    settings = dict(output_dir=str(tmp_path / "run"), save_strategy="no", overwrite_output_dir=True,
                    num_generations=4, per_device_train_batch_size=8,
                    max_completion_length=8, max_steps=2, logging_steps=1, learning_rate=1e-2,
                    gradient_checkpointing=False, disable_tqdm=True)
    settings.update(overrides)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    return GRPOTrainer(model=model_dir, reward_funcs=length_reward, args=GRPOConfig(**settings),
                       train_dataset=length_task(8), peft_config=config)


def test_lora_trains_only_the_adapter_and_saves_it(tmp_path, tiny_model_dir):
    trainer = lora_trainer(tmp_path, tiny_model_dir)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all("lora_" in n for n in changed)  # the base weights never move
    saved = tmp_path / "run"
    assert (saved / "adapter_config.json").exists() and (saved / "adapter_model.safetensors").exists()
    reloaded = peft.AutoPeftModelForCausalLM.from_pretrained(saved)
    ids = torch.tensor([[1, 60, 61]])
    torch.testing.assert_close(reloaded(ids).logits, trainer.model.eval()(ids).logits)


def test_lora_reference_is_the_base_model_with_the_adapter_off(tmp_path, tiny_model_dir):
    trainer = lora_trainer(tmp_path, tiny_model_dir, beta=0.1, max_steps=3)
    assert trainer.ref_model is None  # no second copy of the weights
    trainer.train()
    records = trainer.state.log_history[:-1]  # the steps, without the run summary
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # LoRA's B starts at 0: policy == base
    assert records[-1]["kl"] > 0  # the trained adapter moved the policy away from the base
    rollout, _ = trainer.generate_and_score(list(length_task(2)))
    assert rollout.ref_logps is not None
    with trainer._reference_model() as ref:
        from grpo.logprobs import completion_logps

        off, _ = completion_logps(ref, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
                                  rollout.completion_mask)
    on, _ = completion_logps(trainer.model, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
                             rollout.completion_mask)
    mask = rollout.completion_mask.bool()
    torch.testing.assert_close(off[mask], rollout.ref_logps[mask], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(on[mask], off[mask])


def test_merged_export_loads_as_a_plain_causal_lm(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    trainer = lora_trainer(tmp_path, tiny_model_dir)
    trainer.train()
    trainer.save_model(str(tmp_path / "merged"), merge_adapter=True)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    ids = torch.tensor([[1, 60, 61, 62]])
    torch.testing.assert_close(merged(ids).logits, trainer.model.eval()(ids).logits, atol=1e-5, rtol=1e-5)
    assert any("lora_" in n for n, _ in trainer.model.named_parameters())  # the trainer keeps its adapter
    assert merged.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 7)
