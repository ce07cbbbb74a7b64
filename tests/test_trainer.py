"""The trainer end to end: TRL's course program, prompt formats, reward shapes, invariance, validation order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset, IterableDataset, load_dataset
from transformers import AutoModelForCausalLM

from grpo import GRPOConfig, GRPOTrainer
from grpo.embedded import length_task

EXPECTED_METRICS = {
    "step", "epoch", "reward", "reward_std", "rewards/reward_len/mean", "rewards/reward_len/std",
    "frac_reward_zero_std", "entropy", "completions/mean_length", "completions/min_length",
    "completions/max_length", "completions/clipped_ratio", "completions/mean_terminated_length",
    "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "loss", "grad_norm",
    "learning_rate", "step_time", "num_tokens",
}


def reward_len(completions, **kwargs):
    return [-abs(20 - len(c)) for c in completions]


def trained_history(trainer) -> list[dict]:
    """train(), then the log history without its last entry, transformers' run summary."""
    trainer.train()
    assert "train_runtime" in trainer.state.log_history[-1]
    return trainer.state.log_history[:-1]


def small_args(tmp_path, **overrides) -> GRPOConfig:
    settings = dict(output_dir=str(tmp_path / "run"), save_strategy="no", overwrite_output_dir=True,
                    num_generations=4, per_device_train_batch_size=8,
                    max_completion_length=16, max_steps=2, logging_steps=1, learning_rate=1e-3,
                    gradient_checkpointing=False, disable_tqdm=True)
    settings.update(overrides)
    return GRPOConfig(**settings)


def test_course_program_runs_unchanged(tmp_path, tiny_model_dir):
    """The Hugging Face course's program, with only the import changed, on a local dataset and model dir."""
    data_file = tmp_path / "prompts.jsonl"
    data_file.write_text("".join(json.dumps({"prompt": f"Tell me about {t}."}) + "\n" for t in "abcd"))
    dataset = load_dataset("json", data_files=str(data_file), split="train")

    def reward_func(completions, **kwargs):
        return [float(len(c)) for c in completions]

    args = GRPOConfig(output_dir=str(tmp_path / "output"), num_train_epochs=3, num_generations=4,
                      per_device_train_batch_size=4, gradient_accumulation_steps=2,
                      learning_rate=1e-5, logging_steps=10)
    trainer = GRPOTrainer(model=tiny_model_dir, args=args, train_dataset=dataset, reward_funcs=reward_func)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()

    # 4 prompts, 2 per round (8 completions / G=4) -> 2 rounds per epoch, 1 optimizer step each, 3 epochs.
    assert trainer.state.global_step == 6
    assert trainer.state.epoch == pytest.approx(3.0)
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    lines = (tmp_path / "output" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [6]  # logging_steps=10, plus the final step
    assert trainer.state.log_history[-2]["step"] == 6
    assert {"train_runtime", "train_loss", "total_flos"} <= set(trainer.state.log_history[-1])  # the run summary


def test_end_to_end_metrics_config_and_saved_model(tmp_path, tiny_model_dir):
    args = small_args(tmp_path, max_steps=3)
    trainer = GRPOTrainer(model=tiny_model_dir, reward_funcs=reward_len, args=args, train_dataset=length_task(8))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    output = trainer.train()
    state = trainer.state

    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p)]
    assert len(changed) > len(before) // 2
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert EXPECTED_METRICS <= set(records[0])
    assert "kl" not in records[0]  # beta = 0: no reference model, no kl
    assert records == state.log_history[:-1]  # then the run summary, as in transformers
    assert records[-1]["num_tokens"] > records[0]["num_tokens"] > 0
    # as in transformers, whose printer callback pops total_flos from the returned metrics (log_history keeps it)
    assert (output.global_step, output.metrics) == (
        3, {k: v for k, v in state.log_history[-1].items() if k not in ("step", "total_flos")})
    assert "total_flos" in state.log_history[-1]
    assert output.training_loss == pytest.approx(sum(r["loss"] for r in records) / 3)
    config = json.loads((run / "grpo_config.json").read_text())
    assert config["num_generations"] == 4 and config["reward_funcs"] == ["reward_len"]
    reloaded = AutoModelForCausalLM.from_pretrained(run)
    for name, param in reloaded.named_parameters():
        torch.testing.assert_close(param, trainer.model.state_dict()[name])
    prompt = torch.tensor([[1, 60, 61]])
    generated = reloaded.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert generated.shape[1] > prompt.shape[1]  # the saved run directory is a model that generates


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_update_does_not_depend_on_micro_batch_split(tmp_path, tiny_model_dir, loss_type):
    """GA 1 x batch 8 and GA 4 x batch 2 see the same 8 completions and must take the same optimizer step."""
    updates = []
    for ga, batch in [(1, 8), (4, 2)]:
        args = small_args(tmp_path, gradient_accumulation_steps=ga, per_device_train_batch_size=batch,
                          loss_type=loss_type, max_steps=1, max_grad_norm=0.0, num_iterations=1, seed=3)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        trainer = GRPOTrainer(model=model, reward_funcs=reward_len, args=args, train_dataset=length_task(8),
                              processing_class=tiny_model_dir_tokenizer(tiny_model_dir),
                              optimizers=(optimizer, scheduler))
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        trainer.train()
        updates.append({n: p.detach() - start[n] for n, p in model.named_parameters()})
    largest = max(u.abs().max().item() for u in updates[0].values())
    assert largest > 1e-4  # the step really moved the weights
    for name in updates[0]:
        torch.testing.assert_close(updates[1][name], updates[0][name], atol=1e-6 * max(largest, 1.0), rtol=1e-4)


def tiny_model_dir_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def test_conversational_prompts_and_extra_columns_reach_rewards(tmp_path, tiny_model_dir):
    seen = {}

    def check_reward(prompts, completions, completion_ids, answers, trainer_state, **kwargs):
        seen.update(prompts=prompts, completions=completions, answers=answers, state=trainer_state,
                    ids=completion_ids)
        return [1.0 if len(c[0]["content"]) > 3 else 0.0 for c in completions]

    rows = [{"prompt": [{"role": "user", "content": f"question {i}"}], "answers": f"answer {i}"} for i in range(4)]
    args = small_args(tmp_path, max_steps=1, chat_template_kwargs={"unused_flag": True})
    trainer = GRPOTrainer(model=tiny_model_dir, reward_funcs=check_reward, args=args,
                          train_dataset=Dataset.from_list(rows))
    trainer.train()
    assert len(seen["completions"]) == 8
    assert seen["completions"][0][0]["role"] == "assistant"
    for prompt, answer in zip(seen["prompts"], seen["answers"]):  # each column is aligned with its prompt
        assert answer == "answer " + prompt[0]["content"].split()[-1]
    assert seen["prompts"][0] == seen["prompts"][3]  # the G completions of a prompt are consecutive
    assert seen["state"] is trainer.state
    assert all(isinstance(i, int) for ids in seen["ids"] for i in ids)


def test_several_rewards_with_weights_async_none_and_a_reward_model(tmp_path, tiny_model_dir):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from grpo.embedded import build_tokenizer

    reward_dir = tmp_path / "reward-model"
    torch.manual_seed(0)
    LlamaForSequenceClassification(LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_labels=1, pad_token_id=0)).save_pretrained(reward_dir)
    build_tokenizer().save_pretrained(reward_dir)

    async def async_bonus(completions, **kwargs):
        return [0.5] * len(completions)

    def only_even(completions, **kwargs):
        return [1.0 if i % 2 == 0 else None for i in range(len(completions))]

    args = small_args(tmp_path, max_steps=1, reward_weights=[1.0, 2.0, 0.5, 0.1])
    trainer = GRPOTrainer(model=tiny_model_dir, args=args, train_dataset=length_task(8),
                          reward_funcs=[reward_len, async_bonus, only_even, str(reward_dir)])
    trainer.train()
    record = trainer.state.log_history[-2]
    assert record["rewards/async_bonus/mean"] == 0.5
    assert record["rewards/only_even/mean"] == 1.0  # None rows are skipped, not counted as 0
    assert "rewards/reward-model/mean" in record
    rollout, metrics = trainer.generate_and_score(list(length_task(2)))
    weighted = (rollout.rewards_per_func.nan_to_num(0.0) * torch.tensor([1.0, 2.0, 0.5, 0.1])).sum(1)
    assert metrics["reward"] == pytest.approx(weighted.mean().item(), rel=1e-5)


def test_beta_and_num_iterations_use_reference_and_old_logps(tmp_path, tiny_model_dir):
    args = small_args(tmp_path, beta=0.1, num_iterations=2, max_steps=4, epsilon=0.01)
    trainer = GRPOTrainer(model=tiny_model_dir, reward_funcs=reward_len, args=args, train_dataset=length_task(8))
    records = trained_history(trainer)
    assert all("kl" in r for r in records)
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy starts equal to the reference
    assert records[-1]["kl"] > 0
    assert any(r["clip_ratio/region_mean"] > 0 for r in records[1:])  # second pass: tiny epsilon clips


def test_iterable_dataset_and_list_of_dicts(tmp_path, tiny_model_dir):
    rows = [{"prompt": f"p{i}"} for i in range(8)]
    iterable = IterableDataset.from_generator(lambda: iter(rows))
    for dataset in (iterable, rows):
        trainer = GRPOTrainer(model=tiny_model_dir, reward_funcs=reward_len, args=small_args(tmp_path, max_steps=3),
                              train_dataset=dataset)
        assert trainer.train().global_step == 3


def test_gradient_checkpointing_trains(tmp_path, tiny_model_dir):
    args = small_args(tmp_path, gradient_checkpointing=True, max_steps=1)
    trainer = GRPOTrainer(model=tiny_model_dir, reward_funcs=reward_len, args=args, train_dataset=length_task(8))
    trainer.train()
    assert trainer.model.is_gradient_checkpointing
    assert trainer.state.log_history[-2]["grad_norm"] > 0


def test_activation_estimate_and_the_checkpointing_rule_by_hand():
    from types import SimpleNamespace

    from grpo.models import activation_bytes, needs_gradient_checkpointing

    # SmolLM2-135M's shape: 30 layers, h = 576, i = 1536 -> 10 h + 4 i = 5760 + 6144 = 11904 values a layer and
    # token; 1000 float32 tokens: 1000 x 30 x 11904 x 4 = 1 428 480 000 bytes
    smollm2 = SimpleNamespace(num_hidden_layers=30, hidden_size=576, intermediate_size=1536)
    assert activation_bytes(smollm2, 1000, 4) == 1_428_480_000
    assert activation_bytes(smollm2, 1000, 2) == 714_240_000
    # free 20 GB, 135M trainable parameters: (20e9 - 12 x 135e6) / 2 = (20e9 - 1.62e9) / 2 = 9.19e9 bytes
    assert not needs_gradient_checkpointing(9_190_000_000, 135_000_000, 20_000_000_000)
    assert needs_gradient_checkpointing(9_190_000_001, 135_000_000, 20_000_000_000)


@pytest.mark.parametrize("free_bytes, expected", [(64 * 2**30, False), (2**20, True)])
def test_gradient_checkpointing_by_default_is_chosen_by_memory(tmp_path, tiny_model_dir, monkeypatch, capsys,
                                                               free_bytes, expected):
    import grpo.trainer

    monkeypatch.setattr(grpo.trainer, "free_memory_bytes", lambda device: free_bytes)
    args = small_args(tmp_path, gradient_checkpointing=None, max_steps=1)
    trainer = GRPOTrainer(model=tiny_model_dir, reward_funcs=reward_len, args=args, train_dataset=length_task(8))
    assert not trainer.model.is_gradient_checkpointing  # decided when training starts, from the prompts
    trainer.train()
    assert trainer.model.is_gradient_checkpointing is expected
    assert f"gradient checkpointing {'on' if expected else 'off'}" in capsys.readouterr().out
    assert trainer.state.log_history[-2]["grad_norm"] > 0


def test_zero_reward_spread_warns(tmp_path, tiny_model_dir):
    def constant(completions, **kwargs):
        return [1.0] * len(completions)

    trainer = GRPOTrainer(model=tiny_model_dir, reward_funcs=constant, args=small_args(tmp_path, max_steps=1),
                          train_dataset=length_task(8))
    with pytest.warns(UserWarning, match="same reward for every completion"):
        trainer.train()
    assert trainer.state.log_history[-2]["frac_reward_zero_std"] == 1.0
    assert trainer.state.log_history[-2]["grad_norm"] == 0.0


# ---- bad input is rejected before the model loads ------------------------------------------------------------
MISSING_MODEL = "/nonexistent/model/dir"


@pytest.mark.parametrize("dataset, error, match", [
    (Dataset.from_dict({"question": ["a", "b"]}), ValueError, "rename_column\\('question', 'prompt'\\)"),
    (Dataset.from_dict({"text": ["a"]}).select([]), ValueError, "empty"),
    ([{"prompt": 3}], TypeError, "must be a string or a non-empty list of messages"),
    ("not a dataset", TypeError, "datasets.Dataset"),
    (None, ValueError, "train_dataset"),
])
def test_bad_datasets_fail_before_model_loading(tmp_path, dataset, error, match):
    with pytest.raises(error, match=match):
        GRPOTrainer(model=MISSING_MODEL, reward_funcs=reward_len, args=small_args(tmp_path), train_dataset=dataset)


def test_other_cheap_checks_fail_before_model_loading(tmp_path):
    with pytest.raises(ValueError, match="needs 2 unique prompts"):
        GRPOTrainer(model=MISSING_MODEL, reward_funcs=reward_len, args=small_args(tmp_path),
                    train_dataset=[{"prompt": "only one"}])
    with pytest.raises(ValueError, match="set GRPOConfig.max_steps"):
        GRPOTrainer(model=MISSING_MODEL, reward_funcs=reward_len, args=small_args(tmp_path, max_steps=-1),
                    train_dataset=IterableDataset.from_generator(lambda: iter([{"prompt": "a"}])))
    with pytest.raises(ValueError, match="3 weights for 1 reward functions"):
        GRPOTrainer(model=MISSING_MODEL, reward_funcs=reward_len, train_dataset=length_task(8),
                    args=small_args(tmp_path, reward_weights=[1.0, 1.0, 1.0]))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        GRPOTrainer(model=MISSING_MODEL, reward_funcs=reward_len, args=small_args(tmp_path),
                    train_dataset=length_task(8))


def test_model_that_is_not_a_causal_lm(tmp_path):
    from transformers import ViTConfig

    ViTConfig().save_pretrained(tmp_path / "vit")
    from grpo.embedded import build_tokenizer

    build_tokenizer().save_pretrained(tmp_path / "vit")
    with pytest.raises(ValueError, match="not a causal language model"):
        GRPOTrainer(model=str(tmp_path / "vit"), reward_funcs=reward_len, args=small_args(tmp_path),
                    train_dataset=length_task(8))


def test_conversational_prompts_need_a_chat_template(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        GRPOTrainer(model=tiny_model_dir, reward_funcs=reward_len, args=small_args(tmp_path),
                    processing_class=tokenizer, train_dataset=length_task(8, conversational=True))


def test_reward_function_with_wrong_length_fails_naming_it(tmp_path, tiny_model_dir):
    def broken(completions, **kwargs):
        return [0.0]

    trainer = GRPOTrainer(model=tiny_model_dir, reward_funcs=broken, args=small_args(tmp_path),
                          train_dataset=length_task(8))
    with pytest.raises(ValueError, match="'broken' returned 1 values for 8 completions"):
        trainer.train()


def test_embedded_model_id_builds_offline_and_deterministically(tmp_path):
    from grpo.embedded import tiny_model_path

    path = Path(tiny_model_path())
    assert (path / "config.json").exists() and (path / "tokenizer.json").exists()
    assert tiny_model_path() == str(path)  # cached
    first = AutoModelForCausalLM.from_pretrained(path).state_dict()
    from grpo.embedded import build_model

    second = build_model(vocab_size=first["model.embed_tokens.weight"].shape[0]).state_dict()
    for name, tensor in first.items():
        torch.testing.assert_close(tensor, second[name], rtol=0, atol=0)


def test_log_completions_prints_prompts_completions_rewards_and_advantages(tmp_path, tiny_model_dir, capsys):
    args = small_args(tmp_path, max_steps=1, log_completions=True, num_completions_to_print=3)
    GRPOTrainer(model=tiny_model_dir, reward_funcs=reward_len, args=args, train_dataset=length_task(8)).train()
    out = capsys.readouterr().out
    table = out[out.index("step | prompt"):].splitlines()
    assert [c.strip() for c in table[0].split("|")] == ["step", "prompt", "completion", "reward_len", "advantage"]
    assert len([line for line in table[2:5] if "Write about" in line]) == 3


def test_tokenizer_without_pad_token_falls_back_to_eos(tiny_model_dir):
    from transformers import AutoTokenizer

    from grpo.models import load_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = None
    loaded = load_tokenizer(tiny_model_dir, tokenizer)
    assert loaded.pad_token == loaded.eos_token and loaded.padding_side == "left"


def test_same_seed_gives_the_same_run(tmp_path, tiny_model_dir):
    histories = []
    for name in ("a", "b"):
        args = small_args(tmp_path / name, max_steps=3, seed=11)
        trainer = GRPOTrainer(model=tiny_model_dir, reward_funcs=reward_len, args=args, train_dataset=length_task(8))
        histories.append([{k: v for k, v in r.items() if k != "step_time"} for r in trained_history(trainer)])
    assert histories[0] == histories[1]


def test_bf16_autocast_trains_on_cpu(tmp_path, tiny_model_dir):
    args = small_args(tmp_path, bf16=True, max_steps=1)
    trainer = GRPOTrainer(model=tiny_model_dir, reward_funcs=reward_len, args=args, train_dataset=length_task(8))
    assert trainer.use_bf16
    record = trained_history(trainer)[-1]
    assert record["grad_norm"] > 0 and record["entropy"] > 0
    assert next(trainer.model.parameters()).dtype == torch.float32  # weights stay fp32; autocast computes in bf16
    assert trainer.generator.copy_dtype == torch.float32  # bf16 sampling weights would hide small updates


def test_entropy_bonus_pushes_when_rewards_carry_no_signal(tmp_path, tiny_model_dir):
    """With a constant reward every advantage is 0, so the only gradient is the entropy bonus'."""
    def constant(completions, **kwargs):
        return [1.0] * len(completions)

    args = small_args(tmp_path, max_steps=1, entropy_coef=0.1)
    trainer = GRPOTrainer(model=tiny_model_dir, reward_funcs=constant, args=args, train_dataset=length_task(8))
    with pytest.warns(UserWarning, match="same reward"):
        record = trained_history(trainer)[-1]
    assert record["policy_loss"] == 0.0
    assert record["loss"] == pytest.approx(-0.1 * record["entropy"], rel=1e-5)  # loss = -coef x mean entropy
    assert record["grad_norm"] > 0  # without the bonus this step's gradient is exactly 0 (see above)


def test_evaluation_during_training(tmp_path, tiny_model_dir):
    args = small_args(tmp_path, max_steps=3, eval_strategy="steps", eval_steps=2, num_generations_eval=2,
                      per_device_eval_batch_size=4)
    trainer = GRPOTrainer(model=tiny_model_dir, reward_funcs=reward_len, args=args, train_dataset=length_task(8),
                          eval_dataset=length_task(6, seed=1))
    history = trained_history(trainer)
    evals = [r for r in history if "eval_reward" in r]
    assert [r["step"] for r in evals] == [2, 3]  # every eval_steps, and after the last step
    for record in evals:
        assert record["eval_rewards/reward_len/mean"] == pytest.approx(record["eval_reward"])
        assert -20 <= record["eval_reward"] <= 0 and record["eval_pass@1"] == 0.0  # no completion scores >= 1
    train_records = [r for r in history if "reward" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3] and "eval_reward" not in train_records[0]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 5


def test_evaluation_settings_are_checked_early(tmp_path):
    with pytest.raises(ValueError, match="needs an eval_dataset"):
        GRPOTrainer(model=MISSING_MODEL, reward_funcs=reward_len, train_dataset=length_task(8),
                    args=small_args(tmp_path, eval_strategy="steps"))
    with pytest.raises(ValueError, match="multiple of num_generations_eval=3"):  # before the model loads
        GRPOTrainer(model=MISSING_MODEL, reward_funcs=reward_len, train_dataset=length_task(8),
                    eval_dataset=length_task(4), args=small_args(tmp_path, eval_strategy="steps",
                                                                 num_generations_eval=3, per_device_eval_batch_size=4))
    with pytest.raises(ValueError, match="Did you mean 'steps'"):
        small_args(tmp_path, eval_strategy="step")


def test_trust_remote_code_reaches_model_loading(tmp_path, tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM as Auto

    seen = {}
    real = Auto.from_pretrained.__func__

    def spy(cls, path, **kwargs):
        seen.update(kwargs)
        return real(cls, path, **kwargs)

    monkeypatch.setattr(Auto, "from_pretrained", classmethod(spy))
    args = small_args(tmp_path, trust_remote_code=True, model_init_kwargs={"dtype": "float32"})
    assert args.model_init_kwargs == {"dtype": "float32", "trust_remote_code": True}
    GRPOTrainer(model=tiny_model_dir, reward_funcs=reward_len, args=args, train_dataset=length_task(8))
    assert seen["trust_remote_code"] is True and seen["dtype"] == torch.float32


def test_no_forward_pass_the_math_does_not_need(tmp_path, tiny_model_dir, monkeypatch):
    """beta = 0: no reference model; fully on-policy: no old-policy pass. The only passes with the policy in
    training mode are the micro-batches' own forwards."""
    import grpo.trainer_rounds as trainer_module

    no_grad_passes, training_forwards = [], []
    real = trainer_module.completion_logps_in_chunks
    monkeypatch.setattr(trainer_module, "completion_logps_in_chunks",
                        lambda *a, **k: no_grad_passes.append(1) or real(*a, **k))
    args = small_args(tmp_path, beta=0.0, gradient_accumulation_steps=2, per_device_train_batch_size=4,
                      max_steps=3, skip_zero_advantage_rows=False)  # every row trained: a fixed count of passes
    trainer = GRPOTrainer(model=tiny_model_dir, reward_funcs=reward_len, args=args, train_dataset=length_task(8))
    assert trainer.ref_model is None and not args.needs_old_logps
    body = trainer.model.model  # the decoder body: every pass runs it, whether or not through model.forward
    body.register_forward_hook(lambda m, i, o: training_forwards.append(1) if m.training else None)
    trainer.train()
    assert no_grad_passes == []
    assert len(training_forwards) == 3 * 2  # 3 steps x 2 micro-batches


def test_old_logps_are_the_samplers_where_it_draws_from_the_policy(tmp_path, tiny_model_dir, monkeypatch):
    """num_iterations = 2 needs pi_old's log-probs. Where the engine samples from softmax(logits / T) itself (here:
    no token suppressed) and training is float32, they are the log-probs its sampler measured while drawing: no
    forward pass, a forward's values to float32 rounding, and the same training as with a forward's."""
    import grpo.rollout.engine
    import grpo.trainer_rounds as rounds

    forwards, real = [], rounds.completion_logps_in_chunks
    monkeypatch.setattr(rounds, "completion_logps_in_chunks", lambda *a, **k: forwards.append(1) or real(*a, **k))

    def run(name: str) -> tuple[list[dict], dict[str, torch.Tensor]]:
        # AdamW's epsilon raised: its first step g / (|g| + eps) would turn float rounding in gradients near 0
        # into weight differences of the learning rate's size (tests/test_silent_rows.py)
        args = small_args(tmp_path / name, num_iterations=2, max_steps=4, epsilon=0.01, max_grad_norm=0.0,
                          adam_epsilon=1e-4, generation_kwargs={"suppress_tokens": []}, skip_zero_advantage_rows=False)
        trainer = GRPOTrainer(model=tiny_model_dir, reward_funcs=reward_len, args=args, train_dataset=length_task(8))
        score = trainer.generate_and_score

        def checked(*a, **k):
            rollout, metrics = score(*a, **k)
            if rollout.old_logps is not None and not forwards:  # the sampler's: what a forward gives
                forward = real(trainer.model, rollout, args.temperature, 4)
                mask = rollout.completion_mask.bool()
                torch.testing.assert_close(rollout.old_logps[mask], forward[mask], atol=2e-5, rtol=1e-5)
                assert rollout.old_logps[~mask].eq(0).all()
            return rollout, metrics

        trainer.generate_and_score = checked
        return trained_history(trainer), {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    sampled = run("sampled")
    assert forwards == []
    generate = grpo.rollout.engine.RolloutEngine.generate

    def without_logps(*a, **k):  # the same samples, pi_old's log-probs left to a forward
        generation = generate(*a, **k)
        generation.logps = None
        return generation

    monkeypatch.setattr(grpo.rollout.engine.RolloutEngine, "generate", without_logps)
    forward = run("forward")
    assert len(forwards) == 2  # one pass a round
    for a, b in zip(sampled[0], forward[0], strict=True):
        for key in ("loss", "grad_norm", "clip_ratio/region_mean", "reward", "entropy"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    assert any(r["clip_ratio/region_mean"] > 0 for r in forward[0])  # the second pass moved the ratios
    for name, weight in forward[1].items():
        torch.testing.assert_close(sampled[1][name], weight, rtol=1e-4, atol=1e-6, msg=name)


def test_logged_learning_rate_is_the_one_the_step_used(tmp_path, tiny_model_dir):
    """As transformers and TRL log it: a linear schedule over 2 steps from 1e-3 used 1e-3, then 5e-4 (not the
    rate after the scheduler's step: 5e-4, then 0)."""
    trainer = GRPOTrainer(model=tiny_model_dir, args=small_args(tmp_path, warmup_steps=0), train_dataset=length_task(4),
                          reward_funcs=reward_len)
    rates = [entry["learning_rate"] for entry in trained_history(trainer) if "learning_rate" in entry]
    assert rates == pytest.approx([1e-3, 5e-4])
