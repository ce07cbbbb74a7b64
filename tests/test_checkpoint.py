"""Checkpoints and resume: atomic saves, exact continuation after SIGKILL, and refusal of mismatched resumes."""

from __future__ import annotations

import json
import math
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
from transformers import AutoModelForCausalLM

import grpo.checkpoint as checkpoint_module
from grpo import GRPOConfig, GRPOTrainer
from grpo.checkpoint import checkpoints
from grpo.embedded import TASKS

TRAIN_SCRIPT = textwrap.dedent('''
    import random, sys, time
    import numpy as np
    from grpo import GRPOConfig, GRPOTrainer
    from grpo.embedded import TASKS

    def reward_len(completions, **kwargs):
        time.sleep(0.05)  # rounds take long enough for the test to kill the run between two of them
        # python and numpy draws: a resumed run must restore their RNG states too
        return [-abs(20 - len(c)) + 0.01 * random.random() + 0.01 * float(np.random.rand()) for c in completions]

    output_dir, resume = sys.argv[1], sys.argv[2] == "resume"
    args = GRPOConfig(output_dir=output_dir, num_generations=4, per_device_train_batch_size=8,
                      steps_per_generation=2, max_completion_length=12, max_steps=10, save_steps=3,
                      logging_steps=1, learning_rate=2e-3, gradient_checkpointing=False, disable_tqdm=True,
                      log_completions=True, seed=7)
    trainer = GRPOTrainer(model="grpo:tiny", reward_funcs=reward_len, args=args,
                          train_dataset=TASKS["length"].make(40, seed=1))
    trainer.train(resume_from_checkpoint=True if resume else None)
''')


def _run_script(script: Path, output_dir: Path, mode: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(script), str(output_dir), mode], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _records(path: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, path.read_text().splitlines())}


def _assert_same_metrics(expected: dict[int, dict], actual: dict[int, dict]) -> None:
    assert sorted(actual) == sorted(expected)
    for step, record in expected.items():
        for name, value in record.items():
            if name == "step_time":  # wall time
                continue
            other = actual[step][name]
            if isinstance(value, float) and isinstance(other, float):
                assert math.isclose(value, other, rel_tol=1e-5, abs_tol=1e-6), (step, name, value, other)
            else:
                assert value == other, (step, name, value, other)


def test_sigkilled_run_resumes_to_the_same_metrics_as_an_uninterrupted_one(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    done = _run_script(script, reference, "fresh")
    assert done.wait(timeout=300) == 0, done.stderr.read()

    victim = _run_script(script, interrupted, "fresh")
    metrics = interrupted / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:  # kill once step 7 is logged: after checkpoint-6, mid-way to checkpoint-9
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 7:
            break
        assert victim.poll() is None, victim.stderr.read()
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    killed_at = len(metrics.read_text().splitlines())
    assert killed_at < 10, "the run finished before it could be killed"
    assert [p.name for p in checkpoints(interrupted)][-1] in ("checkpoint-6", "checkpoint-9")

    resumed = _run_script(script, interrupted, "resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    _assert_same_metrics(_records(reference / "metrics.jsonl"), _records(metrics))
    # the same completions were sampled, and the final weights are the same
    assert (reference / "completions.jsonl").read_text() == (interrupted / "completions.jsonl").read_text()
    final, expected = load_file(interrupted / "model.safetensors"), load_file(reference / "model.safetensors")
    for name, tensor in expected.items():
        torch.testing.assert_close(final[name], tensor, rtol=1e-5, atol=1e-6)


def reward_len(completions, **kwargs):
    return [-abs(20 - len(c)) for c in completions]


def _trainer(output_dir: Path, model: str = "grpo:tiny", peft_config=None, **overrides) -> GRPOTrainer:
    settings = dict(output_dir=str(output_dir), num_generations=4, per_device_train_batch_size=8,
                    steps_per_generation=2, max_completion_length=8, max_steps=4, save_steps=2, logging_steps=1,
                    learning_rate=2e-3, lr_scheduler_type="constant", gradient_checkpointing=False,
                    disable_tqdm=True, seed=3)
    settings.update(overrides)
    return GRPOTrainer(model=model, reward_funcs=reward_len, args=GRPOConfig(**settings),
                       train_dataset=TASKS["length"].make(24, seed=2), peft_config=peft_config)


def test_checkpoint_holds_what_resume_needs_and_loads_as_a_model(tmp_path):
    _trainer(tmp_path / "run", max_steps=3, save_steps=1, save_total_limit=2).train()
    assert [p.name for p in checkpoints(tmp_path / "run")] == ["checkpoint-2", "checkpoint-3"]  # limit 2
    newest = tmp_path / "run" / "checkpoint-3"
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pt", "round.pt", "trainer_state.json",
                 "grpo_config.json", "model.safetensors", "tokenizer.json"):
        assert (newest / name).is_file(), name
    state = json.loads((newest / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and len(state["log_history"]) == 3
    assert state["next_step"] == 1  # step 3 is the first of its round's two: the round travels in round.pt
    assert AutoModelForCausalLM.from_pretrained(newest).num_parameters() > 0
    assert not list((tmp_path / "run").glob(".checkpoint-*"))  # no temporaries left


@pytest.mark.parametrize("use_peft", [False, True])
def test_resume_in_process_continues_exactly(tmp_path, use_peft):
    """A run stopped at step 2 and resumed to step 4 equals a 4-step run (constant LR, so length may change)."""
    peft_config = None
    if use_peft:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    _trainer(tmp_path / "whole", peft_config=peft_config).train()
    _trainer(tmp_path / "split", peft_config=peft_config, max_steps=2).train()
    _trainer(tmp_path / "split", peft_config=peft_config).train(resume_from_checkpoint=True)
    _assert_same_metrics(_records(tmp_path / "whole" / "metrics.jsonl"),
                         _records(tmp_path / "split" / "metrics.jsonl"))


def test_a_round_saved_with_sampling_logps_still_loads():
    """Checkpoints written before Rollout.sampling_logps was removed hold it in round.pt: it is ignored."""
    ones = torch.ones(2, 3, dtype=torch.long)
    fields = dict(prompt_ids=ones, prompt_mask=ones, completion_ids=ones * 5, completion_mask=ones,
                  is_eos=torch.ones(2), advantages=torch.tensor([1.0, -1.0]), rewards_per_func=torch.ones(2, 1),
                  old_logps=None, ref_logps=None, prompts=["a", "b"], completions=["x", "y"])
    rollout = checkpoint_module._saved_rollout({**fields, "sampling_logps": torch.zeros(2, 3)})
    assert all(getattr(rollout, name) is value for name, value in fields.items())
    assert checkpoint_module._saved_rollout(None) is None


def test_crash_during_a_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    real_write = checkpoint_module._write_contents
    calls = []

    def write_then_crash(out, objects, *rest):
        calls.append(out)
        if len(calls) == 2:  # the second save dies half-way: model written, the rest not
            objects.model.save_pretrained(out)
            raise OSError("disk full")
        real_write(out, objects, *rest)

    monkeypatch.setattr(checkpoint_module, "_write_contents", write_then_crash)
    with pytest.raises(OSError, match="disk full"):
        _trainer(tmp_path / "run", save_steps=1).train()
    assert [p.name for p in checkpoints(tmp_path / "run")] == ["checkpoint-1"]
    assert not (tmp_path / "run" / "checkpoint-2").exists()
    monkeypatch.setattr(checkpoint_module, "_write_contents", real_write)
    state = _trainer(tmp_path / "run", save_steps=1).train(resume_from_checkpoint=True)  # the survivor loads
    assert state.global_step == 4
    assert not list((tmp_path / "run").glob(".checkpoint-*"))  # the half-written one was cleared


def test_resume_with_other_settings_is_refused_before_anything_is_written(tmp_path):
    _trainer(tmp_path / "run", max_steps=2).train()
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"different settings \(learning_rate: 0.002 -> 0.01\)"):
        _trainer(tmp_path / "run", learning_rate=1e-2).train(resume_from_checkpoint=True)
    after = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert before == after


def test_resume_with_a_smaller_token_budget_is_allowed(tmp_path):
    """A run that ran out of memory resumes with smaller micro-batches: memory only, the update is the same."""
    _trainer(tmp_path / "run", max_steps=2).train()
    state = _trainer(tmp_path / "run", max_steps=3, max_tokens_per_micro_batch=64).train(resume_from_checkpoint=True)
    assert state.global_step == 3


def test_resume_with_another_model_is_refused(tmp_path, tiny_model_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    _trainer(tmp_path / "run", max_steps=2).train()
    other = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    other.config._name_or_path = tiny_model_dir  # the tokenizer is the embedded one
    trainer = GRPOTrainer(model=other, reward_funcs=reward_len, args=_trainer(tmp_path / "x").args,
                          train_dataset=TASKS["length"].make(24, seed=2))
    with pytest.raises(ValueError, match="different model"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))


def test_resume_without_a_checkpoint_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        _trainer(tmp_path / "empty").train(resume_from_checkpoint=True)
    with pytest.raises(FileNotFoundError, match="is not a grpo checkpoint"):
        _trainer(tmp_path / "empty").train(resume_from_checkpoint=str(tmp_path))


def test_output_dir_of_another_run_is_not_overwritten_unless_asked(tmp_path):
    _trainer(tmp_path / "run", max_steps=2, save_strategy="no").train()
    _trainer(tmp_path / "run", max_steps=2, save_strategy="no").train()  # the same settings, no checkpoint: fine
    metrics = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    with pytest.raises(FileExistsError, match="other settings .*overwrite_output_dir=True"):
        _trainer(tmp_path / "run", max_steps=2, save_strategy="no", learning_rate=1e-2).train()
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == metrics
    _trainer(tmp_path / "run", max_steps=2).train()  # leaves checkpoint-2
    with pytest.raises(FileExistsError, match="checkpoint-2.*resume_from_checkpoint=True"):
        _trainer(tmp_path / "run", max_steps=2).train()  # a run to resume, perhaps: never replaced silently
    _trainer(tmp_path / "run", max_steps=1, overwrite_output_dir=True).train()
    assert [p.name for p in checkpoints(tmp_path / "run")] == ["checkpoint-1"]


def test_cli_resume(tmp_path):
    from grpo.cli import main

    recipe = Path(__file__).parent.parent / "examples" / "length.yaml"
    common = ["train", "--config", str(recipe), "--output_dir", str(tmp_path / "run"), "--disable_tqdm", "true",
              "--save_steps", "1", "--lr_scheduler_type", "constant", "--logging_steps", "1"]
    assert main([*common, "--max_steps", "1"]) == 0
    assert main([*common, "--max_steps", "1"]) == 2  # the run is there: refused, with a message
    assert main([*common, "--max_steps", "2", "--resume"]) == 0
    assert sorted(_records(tmp_path / "run" / "metrics.jsonl")) == [1, 2]
