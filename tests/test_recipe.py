"""`grpo train`: YAML recipe + command-line overrides -> a run, with the resolved recipe in the run directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from grpo.cli import main, parse_overrides
from grpo.recipe import build_run, load_recipe

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_yaml_plus_overrides_round_trip_to_the_run_directory(tmp_path):
    recipe = tmp_path / "run.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": "grpo:tiny", "dataset": "grpo:length", "reward_funcs": ["length"], "learning_rate": "1e-5",
        "num_generations": 4, "per_device_train_batch_size": 8, "max_completion_length": 8, "max_steps": 5,
        "gradient_checkpointing": False, "logging_steps": 1, "output_dir": str(tmp_path / "ignored"),
    }))
    run_dir = tmp_path / "run"
    code = main(["train", "--config", str(recipe), "--max_steps", "2", "--learning_rate=3e-4",
                 "--output_dir", str(run_dir), "--disable_tqdm", "true"])
    assert code == 0
    resolved = yaml.safe_load((run_dir / "run.yaml").read_text())
    assert resolved["max_steps"] == 2 and resolved["learning_rate"] == 3e-4  # overrides win, typed as numbers
    assert resolved["model"] == "grpo:tiny" and resolved["reward_funcs"] == ["length"]
    assert resolved["num_generations"] == 4 and resolved["generation_batch_size"] == 8  # derived fields resolved
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]


def test_yaml_numbers_in_exponent_form_are_read_as_numbers(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: grpo:tiny\ndataset: grpo:length\nreward_funcs: length\nlearning_rate: 1e-5\n"
                      "bf16: null\nmax_grad_norm: 2\n")
    loaded = load_recipe(str(recipe), {"beta": "0.04", "shuffle_dataset": "false", "min_p": "none"})
    assert loaded["learning_rate"] == 1e-5 and isinstance(loaded["learning_rate"], float)
    assert loaded["beta"] == 0.04 and loaded["shuffle_dataset"] is False and loaded["min_p"] is None
    assert loaded["max_grad_norm"] == 2.0


def test_local_data_file_column_mapping_and_import_path_rewards(tmp_path, monkeypatch):
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": f"{a}+1=", "answer": str(a + 1)}) + "\n" for a in range(8)))
    (tmp_path / "my_rewards.py").write_text(
        "def short(completions, **kwargs):\n    return [-len(c) / 10 for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = load_recipe(None, {
        "model": "grpo:tiny", "dataset": json.dumps({"path": str(data), "columns": {"question": "prompt"}}),
        "reward_funcs": '[{name: accuracy, weight: 1.0}, {name: "my_rewards:short", weight: 0.5}]',
        "num_generations": "4", "per_device_train_batch_size": "8",
    })
    run = build_run(recipe)
    assert run["train_dataset"].column_names == ["prompt", "answer"]
    assert [f.__name__ for f in run["reward_funcs"]] == ["accuracy_reward", "short"]
    assert run["args"].reward_weights == [1.0, 0.5]


@pytest.mark.parametrize("overrides, match", [
    ({"num_generation": "4"}, "Did you mean 'num_generations'"),
    ({"max_steps": "many"}, "expects int"),
    ({"reward_funcs": "lenght"}, "unknown reward 'lenght'"),
    ({"reward_funcs": "no_such_module:f"}, "cannot import reward"),
    ({"dataset": "grpo:unknown"}, "unknown built-in task"),
    ({"dataset": "/no/such/file.jsonl"}, "does not exist"),
])
def test_bad_recipes_fail_with_a_clear_message(overrides, match):
    base = {"model": "grpo:tiny", "dataset": "grpo:length", "reward_funcs": "length"}
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        build_run(load_recipe(None, base | overrides))


def test_missing_model_is_reported_and_cli_exits_2(capsys):
    assert main(["train", "--dataset", "grpo:length", "--reward_funcs", "length"]) == 2
    assert "the run needs 'model'" in capsys.readouterr().err


def test_override_parsing():
    assert parse_overrides(["--a", "1", "--b=x y", "--max-steps", "3"]) == {"a": "1", "b": "x y", "max_steps": "3"}
    with pytest.raises(SystemExit):
        parse_overrides(["--a"])


@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_examples_run_as_they_are(example, tmp_path):
    assert main(["train", "--config", str(example), "--max_steps", "2", "--output_dir", str(tmp_path / "run"),
                 "--disable_tqdm", "true"]) == 0
    assert (tmp_path / "run" / "metrics.jsonl").exists()


def test_help_is_complete(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "--config" in text and "--field value" in text and "run.yaml" in text


@pytest.mark.parametrize("example", sorted((EXAMPLES / "smollm2").glob("*.yaml")), ids=lambda p: p.name)
def test_real_model_recipes_are_valid(example, tmp_path):
    """Every setting, dataset and reward of the SmolLM2 recipes resolves; one short step on the tiny model (the
    real model's own training is covered by tests/test_real_model.py)."""
    assert load_recipe(str(example), {})["model"] == "smollm2-135m-instruct"
    if example.name == "tools.yaml":  # its prompts (tool schema, two worked examples) outgrow the tiny model's
        # character-level 1024-token context: check that everything resolves; tests/test_multiturn.py trains
        run = build_run(load_recipe(str(example), {}))
        assert [t.__name__ for t in run["tools"]] == ["calculator"] and run["args"].chat_template_path
        return
    assert main(["train", "--config", str(example), "--model", "grpo:tiny", "--max_steps", "1",
                 "--max_completion_length", "8", "--output_dir", str(tmp_path / "run"), "--disable_tqdm", "true"]) == 0
    assert (tmp_path / "run" / "metrics.jsonl").exists()
