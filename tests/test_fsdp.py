"""FSDP2 (torchrun, gloo, CPU): two sharded processes train exactly like one, write once and resume exactly.

Accelerate turns FSDP on for GPUs only; grpo turns it on for CPU processes launched with the variables
`accelerate launch` sets for examples/accelerate/fsdp.yaml (`enable_fsdp_on_cpu`), so these tests run the
example config's FSDP settings. The generator here also does what a rollout engine does with the model: it reads
a weight directly and runs forwards, a different number on each process, which must see full, plain weights and
must not communicate.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_distributed import SCRIPT, _launch, assert_resumed_metrics_match, launch_two_processes

ROOT = Path(__file__).resolve().parents[1]

MODEL_READING = '''
from torch.distributed.tensor import DTensor

class ModelReadingGenerator(PromptSeededGenerator):
    """Completions as PromptSeededGenerator's; on the way it reads a weight and runs the model like an engine."""

    def generate(self, model, prompt_ids, num_generations):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT: the LoRA'd model
        weight = base.model.layers[0].self_attn.q_proj.weight
        assert not isinstance(weight, DTensor) and weight.shape == (128, 128), type(weight)  # full and plain
        with torch.no_grad():
            for ids in prompt_ids[:sum(prompt_ids[0]) % 3 + 1]:  # a data-dependent number of forwards
                model(input_ids=torch.tensor([ids]))
        return super().generate(model, prompt_ids, num_generations)

PromptSeededGenerator = ModelReadingGenerator

def run_with_eval(output_dir):
    """Evaluation on the main process only, a KL term and TR-DPO reference mixing: the other full-weight users."""
    args = GRPOConfig(output_dir=output_dir, num_generations=4, max_completion_length=12, max_steps=2,
                      logging_steps=1, gradient_checkpointing=False, disable_tqdm=True, seed=5, save_strategy="no",
                      per_device_train_batch_size=4, eval_strategy="steps", eval_steps=1,
                      per_device_eval_batch_size=4, beta=0.1, sync_ref_model=True, ref_model_sync_steps=1)

    def reward_vowels(completions, **kwargs):  # 12 visible characters every time: a length reward has no spread
        return [float(sum(c in "aeiou" for c in text)) for text in completions]

    trainer = GRPOTrainer(model="grpo:tiny", reward_funcs=reward_vowels, args=args,
                          train_dataset=TASKS["length"].make(16, seed=1), eval_dataset=TASKS["length"].make(4, seed=2))
    trainer.train()
'''

# test_distributed's script with the model-reading generator and an "eval" mode
GATHERING_SCRIPT = (SCRIPT.replace("\nroot, mode, per_device = ", MODEL_READING + "\nroot, mode, per_device = ")
                    .replace('elif mode == "resume":', 'elif mode == "eval":\n    run_with_eval(f"{root}/eval")\n'
                                                       'elif mode == "resume":'))

CASES = [  # the loss math itself is covered by test_distributed.py; these add what sharding touches:
    # no_sync over micro-batches, batch reward scaling; then a second pass that uses the gathered old log-probs
    dict(name="dr_grpo", loss_type="dr_grpo", gradient_accumulation_steps=2, scale_rewards="batch"),
    dict(name="two_passes", loss_type="grpo", num_iterations=2, max_steps=2),
    # each forward of a sharded model all-gathers: processes whose rows need different numbers of token-budget
    # pieces must still run the same number of forwards
    dict(name="token_budget", loss_type="dapo", gradient_accumulation_steps=2, max_tokens_per_micro_batch=50),
    # and processes that leave out different numbers of rows with advantage 0 (test_distributed.py's case)
    dict(name="silent_rows", loss_type="dapo", gradient_accumulation_steps=2, coarse_reward=True),
    dict(name="silent_two_passes", loss_type="dapo", num_iterations=2, max_steps=2, coarse_reward=True),
    # the sampler's measures on one process only: every process runs the silent rows' (all-gathering) forward,
    # and pi_old's log-probs from a forward
    dict(name="silent_entropy_on_one", loss_type="dapo", gradient_accumulation_steps=2, coarse_reward=True,
         measured="rank0"),
    dict(name="old_logps_on_one", loss_type="dapo", num_iterations=2, max_steps=2, coarse_reward=True,
         measured="rank0"),
]


def fsdp_env() -> dict[str, str]:
    """The variables `accelerate launch --config_file examples/accelerate/fsdp.yaml` sets for its processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(ROOT / "examples/accelerate/fsdp.yaml"), "x"])
    args, _, _ = _validate_launch_command(args)
    return {k: v for k, v in prepare_multi_gpu_env(args).items() if k.startswith(("FSDP_", "ACCELERATE_"))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process with batch 2B (no FSDP: nothing to shard), two FSDP processes with batch B each."""
    root = tmp_path_factory.mktemp("fsdp")
    script = root / "train.py"
    script.write_text(GATHERING_SCRIPT)
    env = fsdp_env()
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    _launch(script, root / "one", 1, "updates", 8, [dict(c) for c in CASES])
    launch_two_processes(script, root / "two", CASES, extra_env=env)
    _launch(script, root / "two", 2, "eval", 4, extra_env=env)
    return root


def assert_same_update(one_dir: Path, two_dir: Path) -> None:
    """The model and metrics of a two-process run (sharded, gathered by save_model) are those of one process
    with twice the batch."""
    from grpo.embedded import tiny_model_path

    initial = load_file(Path(tiny_model_path()) / "model.safetensors")
    one, two = load_file(one_dir / "model.safetensors"), load_file(two_dir / "model.safetensors")
    assert set(two) == set(one)
    largest = max((one[n] - initial[n]).abs().max().item() for n in initial)
    assert largest > 1e-4  # the steps moved the weights
    for name in initial:
        torch.testing.assert_close(two[name] - initial[name], one[name] - initial[name],
                                   atol=1e-6 * max(largest, 1.0), rtol=1e-4)
    one_log = [json.loads(line) for line in (one_dir / "metrics.jsonl").read_text().splitlines()]
    two_log = [json.loads(line) for line in (two_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(two_log) == len(one_log)
    for expected, actual in zip(one_log, two_log):
        assert set(actual) == set(expected)
        for name in {"reward", "num_tokens", "loss", "grad_norm"} & set(expected):  # a second pass has no round
            assert actual[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-6), name


def assert_eval_run(run_dir: Path) -> None:
    """A run with evaluation every step, a KL term and TR-DPO mixing (`run_with_eval`) ran to the end."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_reward" in r]
    assert [r["step"] for r in train] == [1, 2] and [r["step"] for r in evals] == [1, 2]
    assert all(math.isfinite(r["kl"]) and math.isfinite(r["loss"]) for r in train)
    assert all(math.isfinite(r["eval_reward"]) for r in evals)
    assert train[1]["kl"] > 0  # the policy moved away from the reference after the first step
    assert (run_dir / "model.safetensors").is_file()


@pytest.mark.parametrize("case", [c["name"] for c in CASES])
def test_two_fsdp_processes_take_the_same_update_as_one_with_twice_the_batch(runs, case):
    assert_same_update(runs / "one" / case, runs / "two" / case)


def test_two_fsdp_processes_write_once_and_resume_exactly(runs):
    whole, split = runs / "two" / "whole", runs / "two" / "split"
    records = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # one writer: each step logged once
    state = json.loads((whole / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["sharded"] and state["num_processes"] == 2
    moments = torch.load(whole / "checkpoint-4" / "optimizer.pt", weights_only=True)
    saved = load_file(whole / "checkpoint-4" / "model.safetensors")
    assert set(saved) <= set(moments["state"]) | {"lm_head.weight"}  # full moments, keyed by parameter name
    assert all(moments["state"][n]["exp_avg"].shape == saved[n].shape for n in saved if n in moments["state"])
    assert_resumed_metrics_match(records, split)
    final_whole, final_split = load_file(whole / "model.safetensors"), load_file(split / "model.safetensors")
    for name in final_whole:
        torch.testing.assert_close(final_split[name], final_whole[name], atol=1e-6, rtol=1e-5)


def test_fsdp_evaluates_on_the_main_process_and_mixes_the_reference(runs):
    """Evaluation runs on the main process alone inside a gather all processes take part in (no deadlock); the
    KL term's reference passes and TR-DPO mixing run on gathered weights."""
    assert_eval_run(runs / "two" / "eval")
