"""`grpo demo`: the first thing a new user runs. It must train the embedded model and visibly improve."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from grpo.cli import build_parser, main
from grpo.demo import run_demo


def test_demo_length_task_clearly_improves_reward(tmp_path):
    result = run_demo("length", output_dir=str(tmp_path / "demo"), progress=False)
    # Measured on 2 CPU cores: about -20.5 before and -1 after 150 steps (README). Demand a clear rise.
    assert result["after"] - result["before"] > 10
    assert result["after"] > -6
    records = [json.loads(line) for line in (tmp_path / "demo" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 15
    assert records[-1]["reward"] > records[0]["reward"]
    assert (tmp_path / "demo" / "model.safetensors").exists()


def test_demo_command_line(tmp_path, capsys):
    assert main(["demo", "--task", "arithmetic", "--max-steps", "2", "--no-progress",
                 "--output-dir", str(tmp_path / "arith")]) == 0
    out = capsys.readouterr().out
    assert "Before training: mean reward" in out and "After training: mean reward" in out
    assert Path(tmp_path / "arith" / "grpo_config.json").exists()


def test_help_lists_the_demo(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    assert "demo" in capsys.readouterr().out
