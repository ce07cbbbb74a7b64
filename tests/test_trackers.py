"""report_to: each tracker receives the same metrics as metrics.jsonl and writes its own files."""

from __future__ import annotations

import json
import sys

import pytest

from grpo import GRPOConfig, GRPOTrainer
from grpo.embedded import length_task
from grpo.rewards import length_reward


def run(tmp_path, tiny_model_dir, report_to, **overrides):
    settings = dict(output_dir=str(tmp_path / "run"), save_strategy="no", overwrite_output_dir=True,
                    num_generations=4, per_device_train_batch_size=8,
                    max_completion_length=8, max_steps=2, logging_steps=1, learning_rate=1e-3,
                    gradient_checkpointing=False, disable_tqdm=True, report_to=report_to)
    settings.update(overrides)
    trainer = GRPOTrainer(model=tiny_model_dir, reward_funcs=length_reward, args=GRPOConfig(**settings),
                          train_dataset=length_task(8))
    trainer.train()
    return tmp_path / "run", trainer.state.log_history[:-1]  # without the run summary, which stays out of them


def test_tensorboard_event_files_hold_the_logged_metrics(tmp_path, tiny_model_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, history = run(tmp_path, tiny_model_dir, "tensorboard")
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    expected = {"reward", "entropy", "completions/mean_length", "rewards/length_reward/mean"}
    assert expected <= set(events.Tags()["scalars"])
    rewards = events.Scalars("reward")
    assert [e.step for e in rewards] == [1, 2]
    assert [e.value for e in rewards] == pytest.approx([r["reward"] for r in history])


def test_wandb_offline_run_directory(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir, _ = run(tmp_path, tiny_model_dir, ["wandb"], run_name="offline-test")
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    (record,) = runs[0].glob("run-*.wandb")
    assert record.stat().st_size > 0


def test_trackio_local_store(tmp_path, tiny_model_dir, monkeypatch):
    import sqlite3

    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    for name, module in list(sys.modules.items()):  # trackio reads TRACKIO_DIR once, when an earlier test imports it
        if name.startswith("trackio") and hasattr(module, "TRACKIO_DIR"):
            monkeypatch.setattr(module, "TRACKIO_DIR", tmp_path / "trackio")
    monkeypatch.setenv("TRACKIO_PROJECT", "grpo-test")
    _, history = run(tmp_path, tiny_model_dir, "trackio", run_name="trackio-test")
    store = sqlite3.connect(tmp_path / "trackio" / "grpo-test.db")
    rows = store.execute("select run_name, step, metrics from metrics order by step").fetchall()
    assert [(name, step) for name, step, _ in rows] == [("trackio-test", 1), ("trackio-test", 2)]
    assert [json.loads(m)["reward"] for _, _, m in rows] == pytest.approx([r["reward"] for r in history])


def test_log_completions_writes_completions_jsonl(tmp_path, tiny_model_dir):
    run_dir, _ = run(tmp_path, tiny_model_dir, "none", log_completions=True, num_completions_to_print=2)
    rows = [json.loads(line) for line in (run_dir / "completions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 8  # every completion of the last round, at each of the 2 logging steps
    assert set(rows[0]) == {"step", "prompt", "completion", "length_reward", "advantage"}
    assert [r["step"] for r in rows[::8]] == [1, 2]
    assert all(r["length_reward"] == -abs(20 - len(r["completion"])) for r in rows)


def test_unknown_tracker_is_rejected_with_a_suggestion():
    with pytest.raises(ValueError, match="Did you mean 'wandb'"):
        GRPOConfig(report_to="wandbb")
    assert GRPOConfig(report_to="all").report_to == ["tensorboard", "wandb", "trackio"]  # all three installed
    assert GRPOConfig(report_to="none").report_to == []
