"""DeepSpeed ZeRO-2 and ZeRO-3 (torchrun, gloo, CPU): two processes train exactly like one, write once, resume.

The processes get the variables `accelerate launch` sets for examples/accelerate/deepspeed_zero{2,3}.yaml. On a
CPU Accelerate starts DeepSpeed only when told the gloo backend, which grpo does (`grpo.zero.accelerator_kwargs`).
The launched script skips one thing: DeepSpeed's CPU backend compiles a shared-memory all-reduce for inference
when it starts (30-45 s, needs a compiler); training never uses it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_distributed import _launch, assert_resumed_metrics_match, launch_two_processes
from test_fsdp import GATHERING_SCRIPT, assert_eval_run, assert_same_update

ROOT = Path(__file__).resolve().parents[1]

NO_SHM_BUILD = '''
import sys
import deepspeed.comm.torch
sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # inference only; compiled at start-up otherwise
'''

LORA = '''
def run_lora(output_dir, per_device):
    """LoRA with a KL term (the reference is the base model, adapter off) and two micro-batches a step."""
    import peft
    args = GRPOConfig(output_dir=output_dir, num_generations=4, max_completion_length=12, max_steps=2,
                      logging_steps=1, gradient_checkpointing=False, disable_tqdm=True, seed=5, save_strategy="no",
                      lr_scheduler_type="constant", per_device_train_batch_size=per_device, learning_rate=1e-2,
                      beta=0.1, gradient_accumulation_steps=2)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    GRPOTrainer(model="grpo:tiny", reward_funcs=reward_len, args=args, peft_config=lora,
                train_dataset=TASKS["length"].make(16, seed=1), generator=PromptSeededGenerator()).train()
'''
SCRIPT = NO_SHM_BUILD + (GATHERING_SCRIPT.replace("\nroot, mode, per_device = ", LORA + "\nroot, mode, per_device = ")
                         .replace('elif mode == "resume":', 'elif mode == "lora":\n    run_lora(f"{root}/lora", '
                                                            'per_device)\nelif mode == "resume":'))

CASES = [  # the loss math is covered by test_distributed.py; these add what DeepSpeed's step touches:
    # several micro-batches to one step (the boundary flag), batch reward scaling
    dict(name="dr_grpo", loss_type="dr_grpo", gradient_accumulation_steps=2, scale_rewards="batch"),
    # the processes need different numbers of token-budget pieces: every backward reduces under ZeRO
    dict(name="token_budget", loss_type="dapo", gradient_accumulation_steps=2, max_tokens_per_micro_batch=50),
]


def deepspeed_env(stage: int) -> dict[str, str]:
    """The variables `accelerate launch --config_file examples/accelerate/deepspeed_zero{stage}.yaml` sets."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    config = ROOT / f"examples/accelerate/deepspeed_zero{stage}.yaml"
    args = launch_command_parser().parse_args(["--config_file", str(config), "x"])
    args, defaults, mixed_precision_from_config = _validate_launch_command(args)
    args.deepspeed_fields_from_accelerate_config = ",".join(  # as `accelerate launch` does
        [*defaults.deepspeed_config, *(["mixed_precision"] if mixed_precision_from_config else [])])
    _, env = prepare_deepspeed_cmd_env(args)
    return {k: v for k, v in env.items() if k.startswith("ACCELERATE_")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One plain process with batch 2B; two processes with batch B each, under ZeRO-2 and under ZeRO-3."""
    root = tmp_path_factory.mktemp("deepspeed")
    script = root / "train.py"
    script.write_text(SCRIPT)
    _launch(script, root / "one", 1, "updates", 8, [dict(c) for c in CASES])
    _launch(script, root / "one", 1, "lora", 8)
    for stage in (2, 3):
        env = deepspeed_env(stage)
        assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == str(stage)
        launch_two_processes(script, root / f"zero{stage}", CASES, extra_env=env)
        _launch(script, root / f"zero{stage}", 2, "lora", 4, extra_env=env)
    _launch(script, root / "zero3", 2, "eval", 4, extra_env=deepspeed_env(3))
    return root


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("case", [c["name"] for c in CASES])
def test_two_zero_processes_take_the_same_update_as_one_with_twice_the_batch(runs, case, stage):
    assert_same_update(runs / "one" / case, runs / f"zero{stage}" / case)  # ZeRO-3's gathered by save_model


@pytest.mark.parametrize("stage", [2, 3])
def test_lora_under_zero_takes_the_same_update_as_one_process(runs, stage):
    """Only the adapter trains and is saved; the reference passes run on the base model with the adapter off."""
    one = load_file(runs / "one" / "lora" / "adapter_model.safetensors")
    two = load_file(runs / f"zero{stage}" / "lora" / "adapter_model.safetensors")
    assert set(two) == set(one) and all("lora_" in name for name in one)
    assert max(one[n].abs().max().item() for n in one if "lora_B" in n) > 1e-3  # B starts at 0: it moved
    for name in one:  # AdamW's normalised steps amplify summation-order differences a little
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=1e-4)
    one_log = [json.loads(line) for line in (runs / "one" / "lora" / "metrics.jsonl").read_text().splitlines()]
    two_log = [json.loads(line) for line in (runs / f"zero{stage}" / "lora" / "metrics.jsonl").read_text().splitlines()]
    assert len(two_log) == len(one_log) == 2 and two_log[1]["kl"] > 0
    for expected, actual in zip(one_log, two_log):
        for name in ("reward", "loss", "kl", "grad_norm"):
            assert actual[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-6), name


@pytest.mark.parametrize("stage", [2, 3])
def test_two_zero_processes_write_once_and_resume_exactly(runs, stage):
    whole, split = runs / f"zero{stage}" / "whole", runs / f"zero{stage}" / "split"
    records = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # one writer: each step logged once
    checkpoint = whole / "checkpoint-4"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["deepspeed"] and not state["sharded"] and state["num_processes"] == 2
    partitions = sorted(p.name for p in (checkpoint / "deepspeed" / "state").glob("*optim_states.pt"))
    assert len(partitions) == 2 and not (checkpoint / "optimizer.pt").exists()  # one optimizer partition each
    saved, final = load_file(checkpoint / "model.safetensors"), load_file(whole / "model.safetensors")
    assert all(saved[n].numel() > 0 for n in saved) and set(saved) == set(final)  # full weights, even ZeRO-3's
    assert_resumed_metrics_match(records, split)
    final_split = load_file(split / "model.safetensors")
    for name in final:
        torch.testing.assert_close(final_split[name], final[name], atol=1e-6, rtol=1e-5)


def test_zero3_evaluates_on_the_main_process_and_mixes_the_reference(runs):
    """Evaluation on the main process alone inside a gather every process takes part in, the KL term's reference
    passes and TR-DPO mixing, all on ZeRO-3's gathered weights."""
    assert_eval_run(runs / "zero3" / "eval")


@pytest.mark.parametrize("change,message", [
    ({"zero_optimization": {"stage": 1}}, "stage 1"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}, "offload_param"),
    ({"fp16": {"enabled": True}}, "fp16"),
    ({"optimizer": {"type": "AdamW"}}, "'optimizer' section"),
    ({"gradient_clipping": 0.5}, "gradient_clipping=0.5"),
])
def test_deepspeed_settings_grpo_has_not_run_are_refused_with_the_fix(change, message):
    from types import SimpleNamespace

    from grpo import GRPOConfig
    from grpo.zero import check_deepspeed

    config = {"zero_optimization": {"stage": 2}, "gradient_clipping": "auto", **change}
    with pytest.raises((ValueError, NotImplementedError), match=message):
        check_deepspeed(SimpleNamespace(deepspeed_config=config), GRPOConfig(max_grad_norm=1.0))
    check_deepspeed(SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": 3}, "gradient_clipping": 1.0}),
                    GRPOConfig(max_grad_norm=1.0))  # the supported settings pass
