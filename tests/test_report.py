"""`grpo report`: a self-contained HTML page, checked in headless Chromium (Debian's `chromium`)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from grpo import GRPOConfig, GRPOTrainer
from grpo.cli import main
from grpo.embedded import length_task
from grpo.rewards import length_reward

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CURVE_BLUE = (31, 119, 180)  # the first line colour of every chart


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    path = tmp_path_factory.mktemp("report-run")
    args = GRPOConfig(output_dir=str(path), num_generations=4, per_device_train_batch_size=8, max_completion_length=8,
                      max_steps=3, logging_steps=1, learning_rate=1e-3, gradient_checkpointing=False,
                      disable_tqdm=True, log_completions=True)
    GRPOTrainer(model=tiny_model_dir, reward_funcs=length_reward, args=args, train_dataset=length_task(8)).train()
    return path


def chromium(*args: str, profile) -> subprocess.CompletedProcess:
    binary = shutil.which("chromium")
    assert binary, "Debian's chromium is needed for this test (apt-get install chromium; .ci/run installs it)"
    return subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                          text=True, timeout=120)


def test_report_is_self_contained(run_dir):
    assert main(["report", str(run_dir)]) == 0
    page = (run_dir / "report.html").read_text()
    assert not re.search(r"(src|href)=\"https?://", page)  # nothing to fetch: it opens offline
    assert page.count("<svg") >= 6  # reward, length_reward, entropy, lengths, clip ratios, loss, ...
    assert '"completion":' in page and "grpo_config" not in page


def test_report_loads_in_chromium_without_console_errors(run_dir, tmp_path):
    main(["report", str(run_dir)])
    url = (run_dir / "report.html").as_uri()
    result = chromium("--enable-logging=stderr", "--v=0", "--dump-dom", url, profile=tmp_path / "p1")
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
    assert console == []  # no errors, no warnings, nothing logged by the page
    last_step = [json.loads(line) for line in (run_dir / "completions.jsonl").read_text().splitlines()][-1]
    assert f"<td>{last_step['prompt']}</td>" in result.stdout  # the script built the completions table
    assert "16 completions" not in result.stdout and "8 completions" in result.stdout


def test_report_screenshot_shows_the_curves(run_dir, tmp_path):
    from PIL import Image

    main(["report", str(run_dir)])
    shot = tmp_path / "shot.png"
    chromium("--window-size=1200,1400", f"--screenshot={shot}", (run_dir / "report.html").as_uri(),
             profile=tmp_path / "p2")
    image = Image.open(shot).convert("RGB")
    pixels = image.getdata()
    blue = sum(1 for p in pixels if all(abs(a - b) <= 12 for a, b in zip(p, CURVE_BLUE)))
    assert image.size == (1200, 1400)
    assert blue > 300  # several charts' curves are drawn in the first line colour


def test_report_of_a_folder_without_metrics_fails_clearly(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err
