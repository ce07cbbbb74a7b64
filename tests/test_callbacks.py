"""Callbacks as in transformers: events with (args, state, control, **kwargs), TrainerControl flags honoured,
transformers' own callbacks (EarlyStopping with metric_for_best_model, Printer), best-model loading, stateful
callbacks across a resume, and evaluate()."""

from __future__ import annotations

import pytest
import torch
from transformers import EarlyStoppingCallback, PrinterCallback, TrainerCallback, TrainerControl, TrainerState

from grpo import GRPOConfig, GRPOTrainer
from grpo.checkpoint import load_weights
from grpo.embedded import length_task


def reward_len(completions, **kwargs):
    return [-abs(20 - len(c)) for c in completions]


def worse_every_step(completions, trainer_state, **kwargs):
    """A reward that falls with the step, so every evaluation is worse than the one before."""
    return [-float(trainer_state.global_step)] * len(completions)


class Recorder(TrainerCallback):
    """Records every event with the step it came at, and the kwargs transformers' CallbackHandler passes."""

    def __init__(self):
        self.events: list[tuple[str, int]] = []
        self.kwargs: dict[str, set[str]] = {}

    def __getattribute__(self, name):
        if name.startswith("on_"):
            def record(args, state, control, **kwargs):
                assert isinstance(state, TrainerState) and isinstance(control, TrainerControl)
                self.events.append((name, state.global_step))
                self.kwargs[name] = set(kwargs)
            return record
        return object.__getattribute__(self, name)


def args_for(tmp_path, **overrides) -> GRPOConfig:
    settings = dict(output_dir=str(tmp_path / "run"), save_strategy="no", overwrite_output_dir=True,
                    num_generations=2, per_device_train_batch_size=4, max_completion_length=6, max_steps=2,
                    logging_steps=1, learning_rate=1e-3, gradient_checkpointing=False, disable_tqdm=True,
                    per_device_eval_batch_size=4)
    settings.update(overrides)
    return GRPOConfig(**settings)


def trainer_for(tmp_path, model_dir, reward=reward_len, callbacks=None, **overrides) -> GRPOTrainer:
    args = args_for(tmp_path, **overrides)
    eval_dataset = length_task(2, seed=1) if args.eval_strategy != "no" else None
    return GRPOTrainer(model=model_dir, reward_funcs=reward, args=args, train_dataset=length_task(8),
                       eval_dataset=eval_dataset, callbacks=callbacks)


def test_events_come_in_transformers_order_with_its_kwargs(tmp_path, tiny_model_dir):
    recorder = Recorder()
    trainer = trainer_for(tmp_path, tiny_model_dir, callbacks=[recorder], eval_strategy="steps", eval_steps=1,
                          save_strategy="steps", save_steps=1)
    trainer.train()
    per_step = ["on_step_begin", "on_pre_optimizer_step", "on_optimizer_step", "on_step_end", "on_log",
                "on_prediction_step", "on_log", "on_evaluate", "on_save"]  # one eval batch: 2 prompts x 2
    assert [name for name, _ in recorder.events] == [
        "on_init_end", "on_train_begin", "on_epoch_begin", *per_step, *per_step, "on_epoch_end", "on_log",
        "on_train_end"]
    assert {"model", "processing_class", "optimizer", "lr_scheduler"} <= recorder.kwargs["on_step_end"]
    assert "metrics" in recorder.kwargs["on_evaluate"] and "logs" in recorder.kwargs["on_log"]


def test_control_flags_set_by_a_callback_are_honoured(tmp_path, tiny_model_dir):
    class Steer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_save = state.global_step == 1  # save_strategy is "no"
            control.should_evaluate = state.global_step == 1  # eval_strategy is "no"
            control.should_training_stop = state.global_step == 2

    args = args_for(tmp_path, max_steps=5, logging_steps=10)
    trainer = GRPOTrainer(model=tiny_model_dir, reward_funcs=reward_len, args=args, train_dataset=length_task(8),
                          eval_dataset=length_task(2, seed=1), callbacks=[Steer()])
    output = trainer.train()
    assert output.global_step == 2  # stopped early
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-1"]
    history = trainer.state.log_history
    assert [r["step"] for r in history if "eval_reward" in r] == [1]
    assert [r["step"] for r in history if "reward" in r] == [2]  # a stop logs its last step's window


def test_early_stopping_with_metric_for_best_model_and_the_best_model_loaded(tmp_path, tiny_model_dir):
    """Every evaluation is worse than the last: EarlyStoppingCallback (patience 1) stops at step 2, and the model
    ends with the weights of checkpoint-1, the best."""
    stopper = EarlyStoppingCallback(early_stopping_patience=1)
    trainer = trainer_for(tmp_path, tiny_model_dir, reward=worse_every_step, callbacks=[stopper], max_steps=6,
                          eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1,
                          metric_for_best_model="reward", load_best_model_at_end=True, save_total_limit=1)
    output = trainer.train()
    assert output.global_step == 2 and stopper.early_stopping_patience_counter == 1
    state = trainer.state
    assert (state.best_metric, state.best_global_step) == (-1.0, 1)
    assert state.best_model_checkpoint == str(tmp_path / "run" / "checkpoint-1")
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    best = GRPOTrainer(model=tiny_model_dir, reward_funcs=reward_len, args=args_for(tmp_path / "other"),
                       train_dataset=length_task(8)).model
    load_weights(best, tmp_path / "run" / "checkpoint-1")
    for name, param in best.named_parameters():
        torch.testing.assert_close(param, trainer.model.state_dict()[name])


def test_early_stopping_counter_survives_a_resume(tmp_path, tiny_model_dir):
    settings = dict(reward=worse_every_step, eval_strategy="steps", eval_steps=1, save_strategy="steps",
                    save_steps=1, metric_for_best_model="reward", restore_callback_states_from_checkpoint=True)
    whole = EarlyStoppingCallback(early_stopping_patience=10)
    trainer_for(tmp_path / "whole", tiny_model_dir, callbacks=[whole], max_steps=4, **settings).train()
    trainer_for(tmp_path / "split", tiny_model_dir, callbacks=[EarlyStoppingCallback(10)], max_steps=2,
                **settings).train()
    resumed = EarlyStoppingCallback(early_stopping_patience=10)
    trainer = trainer_for(tmp_path / "split", tiny_model_dir, callbacks=[resumed], max_steps=4, **settings)
    trainer.train(resume_from_checkpoint=True)
    assert resumed.early_stopping_patience_counter == whole.early_stopping_patience_counter == 3
    assert trainer.state.best_metric == -1.0


def test_printer_callback_and_the_callback_list(tmp_path, tiny_model_dir, capsys):
    trainer = trainer_for(tmp_path, tiny_model_dir, max_steps=1)
    recorder = Recorder()
    trainer.add_callback(PrinterCallback)
    trainer.add_callback(recorder)
    assert trainer.pop_callback(Recorder) is recorder
    trainer.add_callback(recorder)
    trainer.remove_callback(recorder)
    trainer.train()
    assert recorder.events == []
    printed = capsys.readouterr().out
    assert "'train_runtime'" in printed and "'reward'" in printed


def test_evaluate_returns_trl_metrics_and_logs_them(tmp_path, tiny_model_dir):
    trainer = trainer_for(tmp_path, tiny_model_dir, max_steps=1, beta=0.1)
    metrics = trainer.evaluate(length_task(2, seed=1))
    assert {"eval_loss", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "eval_reward",
            "eval_reward_std", "eval_rewards/reward_len/mean", "eval_completions/mean_length", "eval_entropy",
            "eval_kl", "eval_clip_ratio/region_mean", "eval_pass@1", "epoch"} <= set(metrics)
    assert trainer.state.log_history[-1] == dict(metrics, step=0)
    with pytest.raises(ValueError, match="needs an eval_dataset"):
        trainer.evaluate()
    trainer.args.num_generations_eval = 3  # evaluation is where the batch must hold whole groups
    with pytest.raises(ValueError, match="multiple of num_generations_eval=3"):
        trainer.evaluate(length_task(2, seed=1))
