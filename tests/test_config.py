"""GRPOConfig: TRL's defaults, the derived batch geometry and every error raised at construction."""

from __future__ import annotations

import importlib.util

import pytest

from grpo.config import GRPOConfig


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    # The batch geometry depends on WORLD_SIZE; the tests assume one process.
    monkeypatch.delenv("WORLD_SIZE", raising=False)


# --- defaults ----------------------------------------------------------------------------------------------------


def test_defaults_match_trl():
    config = GRPOConfig()
    assert config.learning_rate == 1e-6
    assert config.num_generations == 8
    assert config.loss_type == "dapo"
    assert config.beta == 0.0
    assert config.epsilon == 0.2
    assert config.epsilon_high == 0.2
    assert config.scale_rewards == "group"
    assert config.max_completion_length == 512
    assert config.temperature == 1.0
    assert config.top_k == 0
    assert config.top_p == 1.0
    assert config.logging_steps == 10
    assert config.gradient_checkpointing is None  # TRL: True; grpo decides by memory (test_trainer.py)
    assert config.num_iterations == 1
    assert config.shuffle_dataset is True


def test_epsilon_high_defaults_to_epsilon():
    assert GRPOConfig(epsilon=0.3).epsilon_high == 0.3
    config = GRPOConfig(epsilon=0.2, epsilon_high=0.28)
    assert config.epsilon == 0.2
    assert config.epsilon_high == 0.28


# --- batch geometry ----------------------------------------------------------------------------------------------


def test_steps_per_generation_defaults_to_gradient_accumulation_steps():
    config = GRPOConfig(per_device_train_batch_size=4, gradient_accumulation_steps=3, num_generations=4)
    assert config.steps_per_generation == 3
    assert config.generation_batch_size == 12


def test_generation_batch_size_is_batch_size_times_steps_per_generation():
    config = GRPOConfig(per_device_train_batch_size=4, steps_per_generation=4, gradient_accumulation_steps=2,
                        num_generations=4)
    assert config.generation_batch_size == 16
    assert config.steps_per_generation == 4


def test_generation_batch_size_derives_steps_per_generation():
    config = GRPOConfig(per_device_train_batch_size=4, generation_batch_size=16, num_generations=4)
    assert config.steps_per_generation == 4
    assert config.generation_batch_size == 16


def test_generation_batch_size_and_steps_per_generation_are_exclusive():
    with pytest.raises(ValueError, match="set only one"):
        GRPOConfig(per_device_train_batch_size=4, generation_batch_size=16, steps_per_generation=4,
                   num_generations=4)


def test_generation_batch_size_must_be_a_multiple_of_the_batch_size():
    with pytest.raises(ValueError, match="multiple of"):
        GRPOConfig(per_device_train_batch_size=4, generation_batch_size=18, num_generations=2)


def test_indivisible_generation_batch_names_num_generations_and_suggests_values():
    with pytest.raises(ValueError) as info:
        GRPOConfig(per_device_train_batch_size=6, num_generations=4)
    message = str(info.value)
    assert "generation batch of 6 completions" in message
    assert "num_generations=4" in message
    assert "setting num_generations to one of [2, 3, 6]" in message
    assert "per_device_train_batch_size to one of [4, 8, 12, 16]" in message
    assert "generation_batch_size to a multiple of 4" in message


def test_round_must_be_a_multiple_of_gradient_accumulation_steps():
    with pytest.raises(ValueError) as info:
        GRPOConfig(per_device_train_batch_size=8, gradient_accumulation_steps=2, steps_per_generation=3)
    message = str(info.value)
    assert "gradient_accumulation_steps=2" in message
    assert "3 x 1 = 3" in message


def test_num_iterations_can_make_the_round_a_multiple_of_gradient_accumulation_steps():
    config = GRPOConfig(per_device_train_batch_size=8, gradient_accumulation_steps=2, steps_per_generation=1,
                        num_iterations=2)
    assert config.steps_per_round == 1


# --- unknown, unsupported and removed fields ---------------------------------------------------------------------


def test_misspelled_field_suggests_the_right_name():
    with pytest.raises(TypeError, match="Did you mean 'num_generations'"):
        GRPOConfig(num_generation=4)


def test_unknown_field_without_a_close_match():
    with pytest.raises(TypeError, match="unknown field 'zzzzzz'"):
        GRPOConfig(zzzzzz=1)


def test_not_yet_supported_trl_field_says_so_and_what_to_do():
    with pytest.raises(ValueError) as info:
        GRPOConfig(push_to_hub=True)
    message = str(info.value)
    assert "push_to_hub=True is not supported yet" in message
    assert "upload_folder" in message  # what to do instead
    assert "Did you mean" not in message


def test_trl_fields_at_their_default_are_accepted_silently():
    """Valid TRL configs are never an error: a refused field at TRL's default (or another "off" value) passes, and
    ignored fields keep their value for callbacks to read."""
    config = GRPOConfig(push_to_hub=False, fp16=False, deepspeed=None, fsdp="", torch_compile=False,
                        dataloader_num_workers=4, logging_dir="logs", router_aux_loss_coef=0.01,
                        vllm_tensor_parallel_size=2, vllm_server_timeout=60.0, vllm_max_model_length=1024,
                        vllm_enable_sleep_mode=True, log_multimodal=False, use_transformers_paged=False)
    assert config.dataloader_num_workers == 4 and config.vllm_tensor_parallel_size == 2
    assert "dataloader_num_workers" not in repr(config)  # the accepted TRL fields stay out of the way


def test_eval_batch_is_checked_only_where_evaluation_is_configured():
    config = GRPOConfig(num_generations=3, per_device_train_batch_size=6)  # eval batch 8: no eval, no error
    with pytest.raises(ValueError, match="per_device_eval_batch_size=8 must be a multiple of num_generations_eval=3"):
        config.check_evaluation_batch()


@pytest.mark.parametrize("settings, message", [
    (dict(optim="sgd"), "optim='sgd' is not supported yet"),
    (dict(optim="adamw_torh"), "Did you mean 'adamw_torch'"),
    (dict(eval_strategy="epoch"), "eval_strategy='epoch' is not supported yet"),
    (dict(save_strategy="best"), "save_strategy='best' is not supported yet"),
    (dict(logging_steps=1.5), "logging_steps must be a positive integer or a fraction"),
    (dict(load_best_model_at_end=True), "needs evaluations to rank checkpoints"),
    (dict(load_best_model_at_end=True, eval_strategy="steps", eval_steps=3, save_steps=4), "multiple of eval_steps"),
    (dict(generation_kwargs={"top_kk": 3}), "Did you mean 'top_k'"),
    (dict(generation_kwargs={"num_return_sequences": 2}), "num_generations sets"),
    (dict(off_policy_mask_threshold=-1.0), "off_policy_mask_threshold is a KL bound"),
])
def test_trl_values_grpo_cannot_honour_are_refused(settings, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        GRPOConfig(**settings)


def test_best_model_metric_defaults_as_in_transformers():
    config = GRPOConfig(load_best_model_at_end=True, eval_strategy="steps", eval_steps=2, save_steps=4)
    assert config.metric_for_best_model == "loss" and config.greater_is_better is False
    assert GRPOConfig(metric_for_best_model="reward").greater_is_better is True


def test_fractional_steps_are_kept_for_the_trainer_to_resolve():
    config = GRPOConfig(logging_steps=0.25, save_steps=1000.0)
    assert config.logging_steps == 0.25 and config.save_steps == 1000 and isinstance(config.save_steps, int)


def test_generation_kwargs_the_engine_cannot_run_switch_to_transformers_with_a_notice():
    with pytest.warns(UserWarning, match="num_beams"):
        config = GRPOConfig(generation_kwargs={"num_beams": 2})
    assert config.generation_backend == "transformers"
    assert GRPOConfig(generation_kwargs={"num_beams": 1, "no_repeat_ngram_size": 2}).generation_backend == "engine"


def test_removed_field_says_it_was_removed():
    with pytest.raises(TypeError) as info:
        GRPOConfig(max_prompt_length=256)
    message = str(info.value)
    assert "max_prompt_length" in message
    assert "removed" in message


# --- field validation --------------------------------------------------------------------------------------------


def test_num_generations_must_be_at_least_two():
    with pytest.raises(ValueError, match="at least 2"):
        GRPOConfig(num_generations=1)


def test_bad_loss_type_suggests_the_closest():
    with pytest.raises(ValueError) as info:
        GRPOConfig(loss_type="dapoo")
    message = str(info.value)
    assert "loss_type='dapoo'" in message
    assert "Did you mean 'dapo'" in message


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_valid_loss_types(loss_type):
    assert GRPOConfig(loss_type=loss_type).loss_type == loss_type


@pytest.mark.parametrize(("given", "expected"), [(True, "group"), (False, "none"), ("batch", "batch")])
def test_scale_rewards_booleans(given, expected):
    assert GRPOConfig(scale_rewards=given).scale_rewards == expected


def test_bad_scale_rewards_raises():
    with pytest.raises(ValueError, match="scale_rewards"):
        GRPOConfig(scale_rewards="groups")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_use_vllm_without_vllm_says_how_to_install_it():
    with pytest.raises(ValueError, match="pip install vllm"):
        GRPOConfig(use_vllm=True)


def test_report_to_a_tracker_that_is_not_installed_says_what_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match=r"needs wandb: pip install 'grpo\[wandb\]'"):
        GRPOConfig(report_to="wandb")


def test_report_to_none_is_an_empty_list():
    assert GRPOConfig(report_to="none").report_to == []
    assert GRPOConfig().report_to == []
    assert GRPOConfig(report_to=["none"]).report_to == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"per_device_train_batch_size": 0},
        {"gradient_accumulation_steps": 0},
        {"num_iterations": 0},
        {"temperature": 0.0},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"min_p": 2.0},
        {"beta": -0.1},
        {"learning_rate": -1.0},
        {"warmup_ratio": 1.5},
        {"max_steps": -1, "num_train_epochs": 0},
        {"lr_scheduler_type": "cosine_annealing"},
        {"generation_backend": "vllm"},
        {"generation_kwargs": {"top_kk": 4}},
    ],
)
def test_out_of_range_values_raise(kwargs):
    with pytest.raises(ValueError):
        GRPOConfig(**kwargs)


def test_transformers_backend_accepts_any_generation_kwargs():
    config = GRPOConfig(generation_backend="transformers", generation_kwargs={"num_beams": 4})
    assert config.generation_kwargs == {"num_beams": 4}


# --- derived properties ------------------------------------------------------------------------------------------


def test_prompts_per_generation():
    config = GRPOConfig(per_device_train_batch_size=8, gradient_accumulation_steps=2, num_generations=4)
    assert config.generation_batch_size == 16
    assert config.prompts_per_generation == 4


def test_steps_per_round():
    assert GRPOConfig().steps_per_round == 1
    assert GRPOConfig(num_iterations=3).steps_per_round == 3
    config = GRPOConfig(gradient_accumulation_steps=2, steps_per_generation=4, num_iterations=2)
    assert config.steps_per_round == 4


def test_needs_old_logps_is_false_by_default():
    assert GRPOConfig().needs_old_logps is False


def test_needs_old_logps_with_several_iterations():
    assert GRPOConfig(num_iterations=2).needs_old_logps is True


def test_needs_old_logps_when_a_round_spans_several_optimizer_steps():
    config = GRPOConfig(gradient_accumulation_steps=2, steps_per_generation=4)
    assert config.needs_old_logps is True


def test_needs_old_logps_is_false_when_a_round_is_one_optimizer_step():
    assert GRPOConfig(gradient_accumulation_steps=4).needs_old_logps is False


# --- warm-up -----------------------------------------------------------------------------------------------------


def test_warmup_ratio():
    assert GRPOConfig(warmup_ratio=0.1).warmup_steps_for(100) == 10


def test_warmup_steps():
    assert GRPOConfig(warmup_steps=5).warmup_steps_for(100) == 5


def test_warmup_steps_below_one_is_a_ratio():
    assert GRPOConfig(warmup_steps=0.2).warmup_steps_for(100) == 20


def test_warmup_steps_takes_precedence_over_warmup_ratio():
    assert GRPOConfig(warmup_steps=5, warmup_ratio=0.5).warmup_steps_for(100) == 5


def test_no_warmup_by_default():
    assert GRPOConfig().warmup_steps_for(100) == 0


def test_to_dict_holds_the_derived_geometry():
    data = GRPOConfig(num_generations=4, per_device_train_batch_size=4).to_dict()
    assert data["generation_batch_size"] == 4
    assert data["steps_per_generation"] == 1
    assert data["epsilon_high"] == 0.2


def test_reward_settings_default_to_trls_behaviour_and_are_validated():
    config = GRPOConfig()
    assert (config.reward_timeout, config.reward_error, config.reward_num_workers) == (None, "raise", 0)
    assert GRPOConfig(reward_timeout=2.5, reward_error="none", reward_num_workers=4).reward_timeout == 2.5
    for bad in (dict(reward_num_workers=-1), dict(reward_num_workers=1.5), dict(reward_timeout=-1),
                dict(reward_error="ignore")):
        with pytest.raises(ValueError, match="GRPOConfig.reward_"):
            GRPOConfig(**bad)
