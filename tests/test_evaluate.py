"""`grpo eval`: mean reward and pass@k of a model on a dataset."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest

from grpo.cli import main
from grpo.evaluate import pass_at_k

LENGTH_RECIPE = str(Path(__file__).parent.parent / "examples" / "length.yaml")


@pytest.mark.parametrize("n, c, k, expected", [
    (8, 0, 1, 0.0),
    (8, 8, 4, 1.0),
    (8, 2, 1, 2 / 8),  # pass@1 is the fraction correct
    (4, 1, 2, 1 - 3 / 6),  # 1 - C(3,2)/C(4,2): only the 3 pairs without the correct one fail
    (5, 2, 3, 1 - 1 / 10),  # 1 - C(3,3)/C(5,3): one of the 10 triples is all wrong
    (5, 3, 3, 1.0),  # only 2 wrong completions: every triple holds a correct one
])
def test_pass_at_k_against_hand_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_needs_enough_samples():
    with pytest.raises(ValueError, match="at least 4 samples"):
        pass_at_k(2, 1, 4)


def test_eval_command_reports_reward_and_pass_at_k(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "eval.json"
    code = main(["eval", "--config", LENGTH_RECIPE, "--model", tiny_model_dir, "--num-prompts", "4",
                 "--num_generations", "4", "--max_completion_length", "8", "--k", "1", "4",
                 "--pass-threshold", "-15", "--output", str(out)])
    assert code == 0
    results = json.loads(out.read_text())
    assert results["num_prompts"] == 4 and results["num_generations"] == 4
    # at most 8 characters: every completion is 12..20 characters short of 20, so reward in [-20, -12]
    assert -20 <= results["mean_reward"] <= -12
    assert results["rewards/length_reward/mean"] == results["mean_reward"]
    assert 0.0 <= results["pass@1"] <= results["pass@4"] <= 1.0
    assert json.loads(capsys.readouterr().out) == results


def test_eval_numbers_on_a_fixed_tiny_set(tmp_path, tiny_model_dir):
    """A reward read from the dataset makes every number exact: prompts scoring 1, 0, 1, 1."""
    from grpo import GRPOConfig, GRPOTrainer
    from grpo.evaluate import evaluate

    def from_column(completions, score, **kwargs):
        return [float(s) for s in score]

    rows = [{"prompt": f"q{i}", "score": s} for i, s in enumerate([1, 0, 1, 1])]
    args = GRPOConfig(output_dir=str(tmp_path), num_generations=4, per_device_train_batch_size=4,
                      max_completion_length=4, gradient_checkpointing=False, disable_tqdm=True)
    trainer = GRPOTrainer(model=tiny_model_dir, reward_funcs=from_column, args=args, train_dataset=rows)
    score = partial(trainer.generate_and_score, for_loss=False)
    results = evaluate(score, rows, ks=[1, 2, 4], pass_threshold=1.0, num_generations=4,
                       reward_names=[r.name for r in trainer.reward_funcs], reward_weights=trainer.reward_weights,
                       prompts_per_batch=3)
    assert results["mean_reward"] == 0.75 and results["rewards/from_column/mean"] == 0.75
    assert results["pass@1"] == results["pass@2"] == results["pass@4"] == 0.75  # all or none of a group pass
    # per-prompt values 1, 0, 1, 1: sample std sqrt(0.25) = 0.5, over sqrt(4) prompts -> 0.25
    assert results["pass@1_stderr"] == pytest.approx(0.25)
    assert results["num_prompts"] == 4 and results["num_generations"] == 4
