"""The same rollout through TRL 1.16's GRPOTrainer and grpo's gives the same weights: the whole optimizer step
(group advantages, the loss and its normaliser under gradient accumulation, clipping, AdamW and the schedule)
over two steps, with sampling taken out of the comparison by a `rollout_func` that returns fixed completions.

So a difference between the two trainers' reward curves comes from what they sample, not from how they learn
from it (on SmolLM2-135M-Instruct, `benchmarks/compare_trl.py`'s configuration, the same check agreed to 6e-5 of
the update after two steps; docs/performance.md, "Against TRL on the real model")."""

from __future__ import annotations

import random

import pytest
import torch
from parity import classes
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo.embedded import length_task

G, PROMPTS = 4, 2


def fixed_rollout(tokenizer):
    """rollout_func: each prompt's G completions drawn from a generator seeded by the prompt and the completion's
    place in its group, so both trainers get the same completions every round, whatever order they ask in."""
    def rollout_func(prompts, trainer):
        asked: dict[str, int] = {}
        out = dict(prompt_ids=[], completion_ids=[], logprobs=[])
        for prompt in prompts:
            place = asked.get(prompt, 0)
            asked[prompt] = place + 1
            rng = random.Random(f"{prompt}/{place % G}")
            ids = [rng.randrange(4, len(tokenizer)) for _ in range(rng.randint(1, 7))]
            ids += [tokenizer.eos_token_id] if rng.random() < 0.5 else []
            out["prompt_ids"].append(tokenizer(prompt)["input_ids"])
            out["completion_ids"].append(ids)
            out["logprobs"].append([0.0] * len(ids))
        return out

    return rollout_func


def reward_chars(completions, **kwargs):
    return [-abs(20 - len(c)) for c in completions]


def trained_weights(library: str, model_dir: str, output_dir: str, settings: dict) -> dict[str, torch.Tensor]:
    config_class, trainer_class = classes(library)
    extra = {"use_vllm": False} if library == "trl" else {}
    args = config_class(output_dir=output_dir, **settings, **extra)
    trainer = trainer_class(model=model_dir, reward_funcs=reward_chars, args=args,
                            train_dataset=length_task(PROMPTS, seed=3),
                            rollout_func=fixed_rollout(AutoTokenizer.from_pretrained(model_dir)))
    trainer.train()
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])  # bnpo, luspo: docs/objectives.md's differences
def test_same_rollout_same_weights(tmp_path, tiny_model_dir, loss_type):
    settings = dict(max_steps=2, num_generations=G, per_device_train_batch_size=G, gradient_accumulation_steps=2,
                    max_completion_length=8, learning_rate=1e-3, max_grad_norm=0.5, loss_type=loss_type,
                    logging_steps=1, report_to="none", save_strategy="no", bf16=False, disable_tqdm=True, seed=0,
                    gradient_checkpointing=False)
    initial = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())
    # completions of 1 to 8 tokens: a step's two micro-batches differ in tokens, which a normaliser counted per
    # micro-batch would show
    weights = {lib: trained_weights(lib, tiny_model_dir, str(tmp_path / lib), settings) for lib in ("trl", "grpo")}
    assert weights["trl"].keys() == weights["grpo"].keys() == initial.keys()
    update = torch.cat([(weights["trl"][n] - initial[n].detach()).flatten() for n in initial])
    difference = torch.cat([(weights["grpo"][n] - weights["trl"][n]).flatten() for n in initial])
    assert update.norm() > 1e-3  # both trained
    assert difference.norm() < 1e-4 * update.norm(), (difference.norm() / update.norm()).item()
