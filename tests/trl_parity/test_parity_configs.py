"""Which configurations TRL 1.16 and grpo accept and which they refuse, up to a built trainer (no training: what is
compared here is decided before the first step).

A valid TRL configuration must never be an error in grpo, and a configuration TRL refuses is refused here too. The
configurations grpo refuses although TRL accepts them are in `GRPO_REFUSES`, each with the reason."""

from __future__ import annotations

import pytest
from parity import Case

ACCEPTED: dict[str, Case] = {
    # group sizes whose default eval batch (8) is not a multiple: fine without evaluation, as in TRL
    "G3-batch6-no-eval": Case({"num_generations": 3, "per_device_train_batch_size": 6}),
    "G5-batch10-no-eval": Case({"num_generations": 5, "per_device_train_batch_size": 10}),
    "G6-batch12-no-eval": Case({"num_generations": 6, "per_device_train_batch_size": 12}),
    "G7-batch7-GA2": Case({"num_generations": 7, "per_device_train_batch_size": 7, "gradient_accumulation_steps": 2}),
    "G8-default-eval-batch": Case({"num_generations": 8, "per_device_train_batch_size": 8, "eval_strategy": "steps"},
                                  eval_data=True),
    "G3-eval-batch6": Case({"num_generations": 3, "per_device_train_batch_size": 6, "eval_strategy": "steps",
                            "per_device_eval_batch_size": 6}, eval_data=True),
    "num-generations-eval-2": Case({"num_generations": 4, "num_generations_eval": 2, "eval_strategy": "steps",
                                    "per_device_eval_batch_size": 2}, eval_data=True),
    # generate() keywords beyond the sampling settings
    **{f"generation-kwargs-{name}": Case({"generation_kwargs": {name: value}}) for name, value in {
        "bad_words_ids": [[5, 6]], "no_repeat_ngram_size": 2, "min_new_tokens": 2, "stop_strings": ["."],
        "typical_p": 0.9, "num_beams": 2,
    }.items()},
    # TRL fields once answered with "unknown field, did you mean"
    "vllm-and-multimodal-fields": Case({"vllm_tensor_parallel_size": 2, "vllm_server_timeout": 60.0,
                                        "vllm_max_model_length": 64, "vllm_enable_sleep_mode": True,
                                        "log_multimodal": False, "use_transformers_paged": False}),
    # transformers' TrainingArguments fields GRPO users set
    "optimizer-and-schedule": Case({"optim": "adamw_torch", "adam_beta1": 0.8, "adam_beta2": 0.99,
                                    "adam_epsilon": 1e-6, "lr_scheduler_type": "cosine_with_min_lr",
                                    "lr_scheduler_kwargs": {"min_lr": 1e-5}, "warmup_steps": 2,
                                    "weight_decay": 0.01}),
    "logging-and-saving": Case({"logging_first_step": True, "save_only_model": True,
                                "save_strategy": "steps", "save_steps": 10, "save_total_limit": 2}),
    "dataloader-and-hub-defaults": Case({"dataloader_num_workers": 2, "dataloader_pin_memory": False,
                                         "push_to_hub": False, "hub_model_id": "me/model", "fp16": False,
                                         "torch_compile": False, "ddp_timeout": 600}),
    "fractional-logging-steps": Case({"logging_steps": 0.5, "max_steps": 4}),
    # the objectives
    "loss-luspo-sequence": Case({"loss_type": "luspo", "importance_sampling_level": "sequence"}),
    "loss-luspo-token-level": Case({"loss_type": "luspo"}),  # TRL warns that the paper uses sequence level
    "vespo-parameters": Case({"loss_type": "vespo", "vespo_k_pos": 2.0, "vespo_lambda_pos": 3.0}),
    "off-policy-mask-no-bias-correction": Case({"off_policy_mask_threshold": 0.5, "use_bias_correction_kl": False,
                                                "beta": 0.05}),
    "adaptive-entropy": Case({"use_adaptive_entropy": True, "entropy_target": 0.5}),
    "scale-rewards-bool": Case({"scale_rewards": False}),
    "sync-ref-model": Case({"sync_ref_model": True, "ref_model_sync_steps": 2, "beta": 0.1}),
    "cast-lm-head-log-unique-prompts": Case({"cast_lm_head_to_fp32": True, "log_completions": True,
                                             "log_unique_prompts": True}),
    "epsilon-high-delta": Case({"epsilon_high": 0.28, "delta": 1.5, "num_iterations": 2}),
    "scale-rewards-batch": Case({"scale_rewards": "batch"}),
    "normalize-then-sum": Case({"multi_objective_aggregation": "normalize_then_sum"}, rewards=("length", "async")),
    "entropy-coef": Case({"entropy_coef": 0.01}),
    "sampling-settings": Case({"top_p": 0.9, "top_k": 20, "min_p": 0.05, "temperature": 0.7,
                               "repetition_penalty": 1.2}),
    "generation-batch-size-8": Case({"generation_batch_size": 8}),
    "G7-batch14-GA2-iterations-2": Case({"num_generations": 7, "per_device_train_batch_size": 14,
                                         "gradient_accumulation_steps": 2, "num_iterations": 2}),
    "lora-beta": Case({"beta": 0.1}, peft=True),
    "conversational-beta-chat-template-kwargs": Case({"beta": 0.1, "chat_template_kwargs": {"x": 1}},
                                                     data="conversational"),
    "iterable-dataset-2-steps": Case({"max_steps": 2}, data="iterable"),
    "callbacks-and-eval-on-start": Case({"eval_strategy": "steps", "eval_on_start": True,
                                         "per_device_eval_batch_size": 4}, eval_data=True, callbacks=True),
}

REFUSED: dict[str, Case] = {
    "one-generation": Case({"num_generations": 1}),
    "router-aux-loss-coef-without-moe": Case({"router_aux_loss_coef": 0.01}),
    "batch-not-whole-groups": Case({"num_generations": 4, "per_device_train_batch_size": 3}),
    "generation-batch-and-steps-per-generation": Case({"generation_batch_size": 8, "steps_per_generation": 2}),
    "generation-batch-not-whole-groups": Case({"generation_batch_size": 6, "per_device_train_batch_size": 2,
                                               "num_generations": 4}),
    "eval-batch-not-whole-groups": Case({"num_generations": 3, "per_device_train_batch_size": 6,
                                         "eval_strategy": "steps"}, eval_data=True),
    "auto-find-batch-size": Case({"auto_find_batch_size": True}),
    "hub-completions-without-log-completions": Case({"log_completions_hub_repo": "me/completions"}),
    "vllm-not-installed": Case({"use_vllm": True}),
}

# Accepted by TRL, refused by grpo before training, on purpose: the reason says why and what to do instead.
GRPO_REFUSES: dict[str, tuple[Case, str]] = {
    "torch-compile": (Case({"torch_compile": True}), "torch_compile=True is not supported yet"),
    "fp16": (Case({"fp16": True}), "fp16=True is not supported yet"),
    "eval-strategy-epoch": (Case({"eval_strategy": "epoch"}, eval_data=True), "eval_strategy='epoch'"),
    "optimizer-sgd": (Case({"optim": "sgd"}), "optim='sgd' is not supported yet"),
    "neftune": (Case({"neftune_noise_alpha": 5.0}), "neftune_noise_alpha=5.0 is not supported yet"),
}


@pytest.mark.parametrize("case", ACCEPTED.values(), ids=ACCEPTED.keys())
def test_accepted_by_both(run_both, case):
    trl, grpo = run_both(case, train=False).values()
    assert trl.refused_at is None, f"not a valid TRL configuration: {trl.error}"
    assert grpo.refused_at is None, grpo.error


@pytest.mark.parametrize("case", REFUSED.values(), ids=REFUSED.keys())
def test_refused_by_both(run_both, case):
    trl, grpo = run_both(case, train=False).values()
    assert trl.refused_at in ("config", "trainer"), "TRL accepts this configuration"
    # before training; grpo checks the eval batch where evaluation is configured (the trainer), TRL in its config
    assert grpo.refused_at in ("config", "trainer"), grpo.error


@pytest.mark.parametrize("case, message", GRPO_REFUSES.values(), ids=GRPO_REFUSES.keys())
def test_grpo_refuses_with_what_to_do_where_trl_accepts(run_both, case, message):
    trl, grpo = run_both(case, train=False).values()
    assert trl.refused_at is None, f"TRL refuses it too now: {trl.error}; move the case to REFUSED"
    assert grpo.refused_at == "config" and message in grpo.error
