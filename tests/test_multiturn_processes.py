"""Multi-turn rounds in real processes: two processes (torchrun, gloo) count tool calls like one, and a run
SIGKILLed mid-round resumes to the same metrics, completions and weights as the run left alone.

The scripted tiny model (tests/scripted_model.py) forces each episode's tool-calling turn, so the calls (and the
tool metrics) are the same whatever the process layout; the answer after the tool result is sampled freely, so
the rewards differ within a group and training moves the weights.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_checkpoint import _assert_same_metrics, _records

TESTS = Path(__file__).resolve().parent
SCRIPT = textwrap.dedent('''
    import sys, time
    sys.path.insert(0, sys.argv[4])
    from grpo import GRPOConfig, GRPOTrainer
    from grpo.rollout import RolloutEngine
    from scripted_model import add, add_later, call, fail, script_episodes, scripted_model_and_tokenizer, tool_turn

    def reward(completions, **kwargs):
        time.sleep(0.2)  # rounds take long enough for the test to kill the run between two of them
        return [float(sum(map(ord, c[-1]["content"])) % 5) + 0.1 * len(c) for c in completions]

    output_dir, mode, per_device = sys.argv[1], sys.argv[2], int(sys.argv[3])
    tools = [add, add_later, fail]
    model, tokenizer = scripted_model_and_tokenizer()
    episodes = [  # the calling turn is forced; the answer after the result is the model's own
        [("model", call("add", '{"a":2,"b":3}'))],
        [("model", call("add_later", '{"a":1,"b":1}'))],
        [("model", call("fail", '{"x":"a"}'))],
        [("model", "42</s>")],
    ]
    args = GRPOConfig(output_dir=output_dir, num_generations=2, per_device_train_batch_size=per_device,
                      steps_per_generation=2, max_completion_length=110, max_steps=4, save_steps=1,
                      logging_steps=1, learning_rate=1e-2, lr_scheduler_type="constant",
                      gradient_checkpointing=False, disable_tqdm=True, log_completions=True, seed=11,
                      report_to="none", tool_timeout=5.0)
    rows, _ = script_episodes(model, tokenizer, episodes, args.max_completion_length, tools)
    trainer = GRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=reward, args=args,
                          train_dataset=rows, tools=tools,
                          generator=RolloutEngine(tokenizer, args.sampling_params, lean=False))
    trainer.train(resume_from_checkpoint=True if mode == "resume" else None)
''')


def _command(script: Path, output_dir: Path, mode: str, processes: int, per_device: int) -> list[str]:
    arguments = [str(script), str(output_dir), mode, str(per_device), str(TESTS)]
    if processes == 1:
        return [sys.executable, *arguments]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            *arguments]


def _start(script: Path, output_dir: Path, mode: str, processes: int = 1, per_device: int = 4) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.Popen(_command(script, output_dir, mode, processes, per_device), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _finish(process: subprocess.Popen) -> None:
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiturn")
    script = root / "train.py"
    script.write_text(SCRIPT)
    reference = _start(script, root / "reference", "fresh")
    two = _start(script, root / "two", "fresh", processes=2, per_device=2)
    _finish(reference)
    _finish(two)
    return root, script


def test_two_processes_count_tool_calls_as_one_does(runs):
    """The same rounds split over two processes: every tool metric (sums over both processes) is the one-process
    run's, and each step is written once."""
    root, _ = runs
    one, two = _records(root / "reference" / "metrics.jsonl"), _records(root / "two" / "metrics.jsonl")
    assert sorted(two) == [1, 2, 3, 4]
    for step in (1, 3):  # the steps that start a generation round (steps_per_generation=2) log its metrics
        tool_names = [name for name in one[step] if name.startswith("tools/")]
        assert len(tool_names) == 2 + 2 * 3  # the totals and each of the three tools
        assert {name: two[step][name] for name in tool_names} == {name: one[step][name] for name in tool_names}
        # a round is the 4 prompts x 2 completions; 3 prompts call a tool, one of the three tools fails
        assert one[step]["tools/call_frequency"] == 0.75 and one[step]["tools/failure_frequency"] == 1 / 3
        assert one[step]["tools/fail/failure_frequency"] == 1.0 and one[step]["tools/add/failure_frequency"] == 0


def test_sigkilled_multiturn_run_resumes_exactly(runs):
    """Killed with SIGKILL after step 3 (a checkpoint in the middle of a generation round: steps_per_generation
    is 2), then resumed: the same metrics, completions (tool turns included) and final weights as the run that
    was left alone."""
    root, script = runs
    reference, interrupted = root / "reference", root / "interrupted"
    victim = _start(script, interrupted, "fresh")
    metrics = interrupted / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        assert victim.poll() is None, victim.stderr.read()
        time.sleep(0.01)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(timeout=60)
    assert len(metrics.read_text().splitlines()) < 4, "the run finished before it could be killed"
    _finish(_start(script, interrupted, "resume"))
    _assert_same_metrics(_records(reference / "metrics.jsonl"), _records(metrics))
    expected = [json.loads(line) for line in (reference / "completions.jsonl").read_text().splitlines()]
    resumed = [json.loads(line) for line in (interrupted / "completions.jsonl").read_text().splitlines()]
    assert resumed == expected
    calls = [r["completion"] for r in expected if r["completion"].startswith('add({"a": 2, "b": 3}) / 5 / ')]
    assert len(calls) == 8  # each of the 4 rounds' 2 add episodes: the call, its result, the answer
    assert any(r["advantage"] != 0 for r in expected)  # the free answers gave the groups a signal
    final, reference_weights = load_file(interrupted / "model.safetensors"), load_file(reference / "model.safetensors")
    for name, tensor in reference_weights.items():
        torch.testing.assert_close(final[name], tensor, rtol=1e-5, atol=1e-6)
