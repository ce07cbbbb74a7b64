"""`grpo plot`: figures from real runs' metrics.jsonl."""

from __future__ import annotations

import pytest

from grpo import GRPOConfig, GRPOTrainer
from grpo.cli import main
from grpo.embedded import length_task
from grpo.plot import PANELS, read_metrics, series
from grpo.rewards import length_reward


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_model_dir):
    runs = []
    for lr in (1e-3, 1e-4):
        run_dir = tmp_path_factory.mktemp(f"run-{lr}")
        args = GRPOConfig(output_dir=str(run_dir), num_generations=4, per_device_train_batch_size=8,
                          max_completion_length=8, max_steps=3, logging_steps=1, learning_rate=lr,
                          gradient_checkpointing=False, disable_tqdm=True)
        GRPOTrainer(model=tiny_model_dir, reward_funcs=length_reward, args=args, train_dataset=length_task(8)).train()
        runs.append(str(run_dir))
    return runs


def test_plot_writes_pngs_for_one_and_several_runs(two_runs, tmp_path, capsys):
    assert main(["plot", *two_runs, "--output", str(tmp_path / "compare")]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "compare" / "metrics.png"), str(tmp_path / "compare" / "reward.png")]
    for path in printed:
        data = open(path, "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # a real figure, not an empty canvas
    assert main(["plot", two_runs[0]]) == 0  # default: into the run directory


def test_series_reads_the_logged_steps(two_runs):
    records = read_metrics(two_runs[0])
    steps, rewards = series(records, "reward")
    assert steps == [1, 2, 3] and len(rewards) == 3
    assert series(records, "kl") == ([], [])  # beta = 0: no kl logged, no panel
    plotted = {k for _, keys in PANELS for k in keys}
    assert {"reward", "entropy", "completions/mean_length", "clip_ratio/region_mean"} <= plotted & set(records[0])


def test_plot_of_a_folder_without_metrics_fails_clearly(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err
