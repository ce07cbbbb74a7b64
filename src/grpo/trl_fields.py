"""Every field of TRL 1.16's `GRPOConfig` (transformers' `TrainingArguments` included) and what grpo does with it.

A field is one of:
- honoured: `GRPOConfig` declares it and acts on it (its docstring in config.py says how); the note says where
  grpo's meaning or accepted values differ;
- ignored: accepted, kept on the config (callbacks read some of them), and it changes nothing here; the note says
  why;
- refused: TRL's default (or any "off" value) is accepted silently; any other value is an error that says what to
  do instead.

This table is the one place that knows. `GRPOConfig` inherits the ignored and refused fields from `TRLFields`,
built below with TRL's defaults; `grpo trl-fields` writes docs/trl_fields.md from it, and
tests/trl_parity/test_parity_fields.py fails when TRL has a field this table does not list or the document is
stale.
"""

from __future__ import annotations

import dataclasses
from typing import Any

HONOURED, IGNORED, REFUSED = "honoured", "ignored", "refused"

# ---- honoured: declared in config.py ---------------------------------------------------------------------------
HONOURED_FIELDS: dict[str, str] = {
    # run, logging, evaluation, checkpoints
    "output_dir": "",
    "run_name": "",
    "report_to": "tensorboard, wandb, trackio, all or none",
    "logging_steps": "a value in (0, 1) is a fraction of max_steps, as in transformers",
    "logging_strategy": '"steps" or "no"; "epoch" is refused (use steps)',
    "logging_first_step": "",
    "log_completions": "writes completions.jsonl in output_dir and prints a table",
    "num_completions_to_print": "",
    "log_unique_prompts": "the printed table shows each prompt once",
    "disable_tqdm": "",
    "eval_strategy": '"steps" or "no"; "epoch" is refused (use steps)',
    "eval_steps": "",
    "eval_delay": "",
    "eval_on_start": "",
    "per_device_eval_batch_size": "",
    "num_generations_eval": "",
    "save_strategy": '"steps" or "no"; "epoch" and "best" are refused (use steps)',
    "save_steps": "",
    "save_total_limit": "the best checkpoint is kept when load_best_model_at_end",
    "save_only_model": "such checkpoints cannot be resumed, as in transformers",
    "resume_from_checkpoint": "",
    "load_best_model_at_end": "",
    "metric_for_best_model": "",
    "greater_is_better": "",
    "restore_callback_states_from_checkpoint": "",
    # the optimisation loop
    "num_train_epochs": "",
    "max_steps": "",
    "per_device_train_batch_size": "completions, not prompts, as in TRL",
    "gradient_accumulation_steps": "",
    "learning_rate": "",
    "lr_scheduler_type": "",
    "lr_scheduler_kwargs": "",
    "warmup_steps": "",
    "weight_decay": "",
    "optim": '"adamw_torch" and "adamw_torch_fused"; other optimizers are refused (pass optimizers=(...))',
    "adam_beta1": "",
    "adam_beta2": "",
    "adam_epsilon": "",
    "max_grad_norm": "",
    "seed": "",
    "full_determinism": "",
    "bf16": "None: on where the device supports bf16 (CUDA), off on CPU",
    "tf32": "CUDA only",
    "gradient_checkpointing": "None (TRL: True): on only when a training forward's activations would not fit in "
                              "half the free memory",
    "gradient_checkpointing_kwargs": "",
    "torch_empty_cache_steps": "",
    "use_cpu": "",
    # model and data
    "model_init_kwargs": "",
    "trust_remote_code": "",
    "disable_dropout": "",
    "cast_lm_head_to_fp32": "",
    "use_liger_kernel": "accepted: grpo's own chunked log-probs never build the (batch x length x vocab) logits "
    "(docs/objectives.md); no Liger kernels are applied",
    "router_aux_loss_coef": "",
    "remove_unused_columns": "",
    "shuffle_dataset": "",
    "chat_template_kwargs": "",
    "max_tool_calling_iterations": "tool turns per completion with tools= or environment_factory= (docs/tools.md)",
    # generation
    "num_generations": "",
    "generation_batch_size": "",
    "steps_per_generation": "",
    "max_completion_length": "",
    "temperature": "",
    "top_p": "",
    "top_k": "",
    "min_p": "",
    "repetition_penalty": "",
    "generation_kwargs": "any GenerationConfig name; the few the engine cannot run switch to "
    'generation_backend="transformers"',
    "cache_implementation": 'switches to generation_backend="transformers", whose generate takes it',
    "use_vllm": "True is refused: the vLLM backend is not implemented yet",
    # the objective
    "beta": "",
    "num_iterations": "",
    "epsilon": "",
    "epsilon_high": "",
    "delta": "",
    "loss_type": "",
    "importance_sampling_level": "",
    "sapo_temperature_pos": "",
    "sapo_temperature_neg": "",
    "vespo_k_pos": "",
    "vespo_lambda_pos": "",
    "vespo_k_neg": "",
    "vespo_lambda_neg": "",
    "scale_rewards": "",
    "multi_objective_aggregation": "",
    "reward_weights": "",
    "mask_truncated_completions": "",
    "top_entropy_quantile": "over the optimizer step (TRL: the micro-batch)",
    "entropy_coef": "",
    "use_adaptive_entropy": "",
    "entropy_coef_min": "",
    "entropy_coef_max": "",
    "entropy_coef_delta": "",
    "entropy_target": "",
    "off_policy_mask_threshold": "",
    "use_bias_correction_kl": "",
    "sync_ref_model": "",
    "ref_model_mixup_alpha": "",
    "ref_model_sync_steps": "",
}

_NO_DATALOADER = "no DataLoader: prompts are read from the dataset in the trainer's process"
_VLLM_ONLY = "used only with use_vllm=True, which grpo does not support yet"
_HUB_ONLY = "used only with push_to_hub=True, which grpo refuses"
_LAUNCHER = "accelerate launch sets up the processes; grpo wraps its own loss module"
_AS_IN_TRL = "TRL's GRPOTrainer ignores it too"

# ---- ignored: (TRL's default, why it changes nothing) ----------------------------------------------------------
IGNORED_FIELDS: dict[str, tuple[Any, str]] = {
    "average_tokens_across_devices": (True, "grpo's loss normalisers always count the whole optimizer step on "
                                            "every process"),
    "label_smoothing_factor": (0.0, _AS_IN_TRL + ": there are no labels"),
    "label_names": (None, _AS_IN_TRL + ": there are no labels"),
    "prediction_loss_only": (False, "evaluation generates and scores; there are no predictions to return"),
    "bf16_full_eval": (False, "evaluation runs under the same autocast as training"),
    "use_cache": (False, "generation always uses a KV cache and the training forward never does"),
    "log_on_each_node": (True, "only the main process prints and writes"),
    "logging_nan_inf_filter": (True, "the logging window always leaves NaN/inf values out of its averages"),
    "include_num_input_tokens_seen": ("no", "tokens are always counted: num_tokens and "
                                            "state.num_input_tokens_seen"),
    "log_level": ("passive", "grpo prints its own lines from the main process"),
    "log_level_replica": ("warning", "grpo prints its own lines from the main process"),
    "project": ("huggingface", "wandb and trackio runs use WANDB_PROJECT / TRACKIO_PROJECT (default 'grpo')"),
    "eval_do_concat_batches": (True, "evaluation returns metrics, not predictions"),
    "eval_use_gather_object": (False, "evaluation runs on the main process"),
    "eval_accumulation_steps": (None, "evaluation returns metrics, not predictions"),
    "include_for_metrics": ([], "there is no compute_metrics: evaluation reports rewards and pass@1"),
    "batch_eval_metrics": (False, "there is no compute_metrics: evaluation reports rewards and pass@1"),
    "save_on_each_node": (False, "checkpoints are written by the main process, on one file system"),
    "hub_token": (None, _HUB_ONLY),
    "hub_private_repo": (None, _HUB_ONLY),
    "hub_model_id": (None, _HUB_ONLY),
    "hub_strategy": ("every_save", _HUB_ONLY),
    "hub_always_push": (False, _HUB_ONLY),
    "hub_revision": (None, _HUB_ONLY),
    "ignore_data_skip": (False, "a resume restores the data position exactly, without skipping batches"),
    "data_seed": (None, _AS_IN_TRL + ": the prompt order is seeded by seed"),
    "dataloader_drop_last": (False, "a last incomplete round is always dropped, as TRL's sampler does"),
    "dataloader_num_workers": (0, _NO_DATALOADER),
    "dataloader_pin_memory": (True, _NO_DATALOADER),
    "dataloader_persistent_workers": (False, _NO_DATALOADER),
    "dataloader_prefetch_factor": (None, _NO_DATALOADER),
    "dataloader_multiprocessing_context": (None, _NO_DATALOADER),
    "dataloader_in_order": (True, _NO_DATALOADER),
    "train_sampling_strategy": ("random", _AS_IN_TRL + ": shuffle_dataset decides the order"),
    "length_column_name": ("length", _AS_IN_TRL + ": there is no group_by_length"),
    "ddp_find_unused_parameters": (None, _LAUNCHER),
    "ddp_bucket_cap_mb": (None, _LAUNCHER),
    "ddp_broadcast_buffers": (None, _LAUNCHER),
    "ddp_static_graph": (None, _LAUNCHER),
    "ddp_backend": (None, _LAUNCHER),
    "ddp_timeout": (1800, _LAUNCHER),
    "skip_memory_metrics": (True, "memory metrics are never collected"),
    "do_train": (False, "transformers leaves it to scripts too"),
    "do_eval": (False, "transformers leaves it to scripts too; eval_strategy decides"),
    "do_predict": (False, "transformers leaves it to scripts too"),
    "local_rank": (-1, "read from the launcher's environment"),
    "pad_to_multiple_of": ("auto", "padding changes no result; rows are padded to the longest"),
    "log_multimodal": (True, "grpo trains text models; there are no images to log"),
    "use_transformers_continuous_batching": (False, "grpo's rollout engine already batches continuously: "
                                                    "finished rows leave the batch"),
    "transformers_continuous_batching_config": (None, "grpo's rollout engine already batches continuously"),
    "use_transformers_paged": (False, "deprecated alias of use_transformers_continuous_batching"),
    "liger_kernel_config": (None, "see use_liger_kernel"),
    "vllm_mode": ("colocate", _VLLM_ONLY),
    "vllm_model_impl": ("vllm", _VLLM_ONLY),
    "vllm_enable_sleep_mode": (False, _VLLM_ONLY),
    "vllm_structured_outputs_regex": (None, _VLLM_ONLY),
    "vllm_server_base_url": (None, _VLLM_ONLY),
    "vllm_server_host": ("0.0.0.0", _VLLM_ONLY),
    "vllm_server_port": (8000, _VLLM_ONLY),
    "vllm_server_timeout": (240.0, _VLLM_ONLY),
    "vllm_group_port": (51216, _VLLM_ONLY),
    "vllm_gpu_memory_utilization": (0.3, _VLLM_ONLY),
    "vllm_max_model_length": (None, _VLLM_ONLY),
    "vllm_tensor_parallel_size": (1, _VLLM_ONLY),
    "vllm_importance_sampling_correction": (True, _VLLM_ONLY),
    "vllm_importance_sampling_mode": ("sequence_mask", _VLLM_ONLY),
    "vllm_importance_sampling_clip_max": (3.0, _VLLM_ONLY),
    "vllm_importance_sampling_clip_min": (None, _VLLM_ONLY),
    "vllm_importance_sampling_cap": (None, _VLLM_ONLY),
}

# ---- refused unless off: (TRL's default, what to do instead) ---------------------------------------------------
REFUSED_FIELDS: dict[str, tuple[Any, str]] = {
    "optim_args": (None, "pass your own optimizer: GRPOTrainer(optimizers=(optimizer, None))"),
    "optim_target_modules": (None, "pass your own optimizer: GRPOTrainer(optimizers=(optimizer, None))"),
    "fp16": (False, "use bf16=True (or float32)"),
    "fp16_full_eval": (False, "use bf16=True (or float32)"),
    "activation_checkpointing": (None, "use gradient_checkpointing"),
    "activation_checkpointing_kwargs": (None, "use gradient_checkpointing_kwargs"),
    "torch_compile": (False, "leave it off: grpo's decode step and chunked log-probs are not compiled"),
    "torch_compile_backend": (None, "leave it unset: grpo does not compile the model"),
    "torch_compile_mode": (None, "leave it unset: grpo does not compile the model"),
    "neftune_noise_alpha": (None, "leave it unset: NEFTune noise is for supervised fine-tuning"),
    "auto_find_batch_size": (False, "lower per_device_train_batch_size, or set max_tokens_per_micro_batch; a "
                                    "halved batch would split prompt groups (TRL refuses it too)"),
    "trackio_space_id": (None, "grpo's trackio tracker logs locally (TRACKIO_DIR); deploy with trackio itself"),
    "trackio_bucket_id": (None, "grpo's trackio tracker logs locally (TRACKIO_DIR)"),
    "trackio_static_space_id": (None, "grpo's trackio tracker logs locally (TRACKIO_DIR)"),
    "enable_jit_checkpoint": (False, "save more often with save_steps; every checkpoint is atomic"),
    "push_to_hub": (False, "upload output_dir after training: huggingface_hub.upload_folder(repo_id=..., "
                           "folder_path=output_dir)"),
    "accelerator_config": (None, "configure Accelerate with `accelerate launch --config_file ...`"),
    "parallelism_config": (None, "use `accelerate launch` with DDP, FSDP2 or DeepSpeed ZeRO (docs/distributed.md)"),
    "fsdp": (None, "launch with `accelerate launch --config_file examples/accelerate/fsdp.yaml`"),
    "fsdp_config": (None, "launch with `accelerate launch --config_file examples/accelerate/fsdp.yaml`"),
    "deepspeed": (None, "launch with `accelerate launch --config_file examples/accelerate/deepspeed_zero2.yaml` "
                        "(or deepspeed_zero3.yaml)"),
    "debug": ("", "leave it unset"),
    "ds3_gather_for_generation": (True, "leave it True: grpo gathers ZeRO-3 weights to generate"),
    "log_completions_hub_repo": (None, "log_completions=True writes completions.jsonl to output_dir; upload it "
                                       "yourself"),
}

# ---- names TRL no longer has, still found in older course code -------------------------------------------------
REMOVED_FIELDS: dict[str, str] = {
    "max_prompt_length": "TRL removed it in v0.28 and grpo never truncates prompts: filter long prompts from the "
    "dataset instead",
    "use_liger_loss": "TRL renamed it use_liger_kernel",
    "evaluation_strategy": "transformers renamed it eval_strategy",
    "vllm_guided_decoding_regex": "TRL renamed it vllm_structured_outputs_regex (and grpo has no vLLM backend)",
}

# Fields of older transformers/TRL (not in TRL 1.16) that grpo still accepts, and grpo's own fields.
GRPO_ONLY_FIELDS: dict[str, str] = {
    "overwrite_output_dir": "transformers 4's field: start afresh in an output_dir that holds another run",
    "warmup_ratio": "transformers 4's field: a fraction of all steps for warm-up",
    "logging_dir": "transformers 4's field; ignored (TensorBoard writes to <output_dir>/tensorboard)",
    "max_consecutive_nonfinite_steps": "stop after this many NaN/inf steps in a row",
    "max_tokens_per_micro_batch": "bound a micro-batch's padded tokens; the update is unchanged",
    "skip_zero_advantage_rows": "leave rows with advantage 0 out of the training forward/backward; the update is "
                                "unchanged",
    "generation_backend": '"engine" (grpo\'s rollout engine) or "transformers" (model.generate)',
    "generation_max_batch_rows": "most rows the engine decodes at once",
    "cpu_keep_freed_memory": "CPU: freed tensors' memory reused during train() within the peak in use, "
                             "sparing page faults",
    "reward_timeout": "seconds one reward call may run",
    "reward_error": '"raise" or "none" for a failed reward call',
    "reward_num_workers": "worker processes for synchronous reward functions",
    "dynamic_sampling": "DAPO dynamic sampling",
    "max_dynamic_sampling_rounds": "extra generations dynamic sampling may run per round",
    "tool_timeout": "seconds one tool call may run before it is cut off as a failure (docs/tools.md)",
    "chat_template_path": "TRL's SFTConfig field: replace the tokenizer's chat template (e.g. grpo's chatml_tools)",
}


def _trl_field(name: str, default: Any) -> tuple[str, Any, dataclasses.Field]:
    if isinstance(default, list):
        return name, Any, dataclasses.field(default_factory=list, repr=False)
    return name, Any, dataclasses.field(default=default, repr=False)


# The fields GRPOConfig accepts and does not act on, with TRL's defaults; keyword-only, so that GRPOConfig's own
# fields keep their positions (GRPOConfig("out") is output_dir, as in transformers).
TRLFields = dataclasses.make_dataclass(
    "TRLFields",
    [_trl_field(name, default) for name, (default, _) in {**IGNORED_FIELDS, **REFUSED_FIELDS}.items()]
    + [("logging_dir", Any, dataclasses.field(default=None, repr=False))],
    kw_only=True,
)
TRLFields.__doc__ = "TRL's GRPOConfig fields that grpo accepts without acting on them (see grpo.trl_fields)."
TRLFields.__module__ = __name__


def is_off(value: Any, default: Any) -> bool:
    """Whether a refused field is at TRL's default, or at another "off" value (False, None, "", [], 0)."""
    return value == default or (not value and not default)


def refused_values(config: Any) -> list[str]:
    """One message per refused field that `config` sets away from TRL's default."""
    return [f"GRPOConfig.{name}={getattr(config, name)!r} is not supported yet: {fix}."
            for name, (default, fix) in REFUSED_FIELDS.items() if not is_off(getattr(config, name), default)]


def status(name: str) -> tuple[str, str]:
    """(status, note) of a TRL field; KeyError for a name TRL does not have."""
    if name in HONOURED_FIELDS:
        return HONOURED, HONOURED_FIELDS[name]
    if name in IGNORED_FIELDS:
        return IGNORED, IGNORED_FIELDS[name][1]
    return REFUSED, "any value but {!r}: {}".format(*REFUSED_FIELDS[name])


def render_markdown() -> str:
    """docs/trl_fields.md: every TRL field with grpo's status, then grpo's own fields and removed names."""
    names = sorted({**HONOURED_FIELDS, **IGNORED_FIELDS, **REFUSED_FIELDS})
    counts = {s: sum(status(n)[0] == s for n in names) for s in (HONOURED, IGNORED, REFUSED)}
    lines = [
        "# TRL's GRPOConfig fields in grpo",
        "",
        "Generated by `grpo trl-fields > docs/trl_fields.md` from `src/grpo/trl_fields.py`; a test fails when it is "
        "stale or when TRL has a field it does not list.",
        "",
        f"All {len(names)} fields of TRL 1.16's `GRPOConfig` (transformers' `TrainingArguments` included): "
        f"{counts[HONOURED]} honoured, {counts[IGNORED]} accepted and ignored (they change nothing here), "
        f"{counts[REFUSED]} refused unless left at TRL's default, each with what to do instead.",
        "",
        "| field | status | note |",
        "|---|---|---|",
        *(f"| `{name}` | {status(name)[0]} | {_cell(status(name)[1])} |" for name in names),
        "",
        "## Not in TRL 1.16",
        "",
        "| field | meaning in grpo |",
        "|---|---|",
        *(f"| `{name}` | {_cell(note)} |" for name, note in GRPO_ONLY_FIELDS.items()),
        *(f"| `{name}` | refused: {_cell(note)} |" for name, note in REMOVED_FIELDS.items()),
        "",
    ]
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")
