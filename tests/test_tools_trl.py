"""The same tool-calling program run by TRL 1.16's GRPOTrainer and by grpo's, side by side on CPU: the arguments
both accept, what reward functions receive (the whole exchange as messages), and the metrics' names and values.

Both trainers get the same scripted tiny model (tests/scripted_model.py, here with SmolLM2's vocabulary) and
SmolLM2's tokenizer with TRL's Qwen2.5 chat template (a template TRL knows how to parse tool calls from), so both
see the model make the same calls: one that succeeds, one whose tool raises, and a turn with no call.
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer, LlamaConfig

from scripted_model import ScriptedLlama, add, fail, script_episodes

trl = pytest.importorskip("trl")
from trl.chat_template_utils import qwen2_5_chat_template  # noqa: E402

import grpo  # noqa: E402
from grpo.rollout import RolloutEngine  # noqa: E402


class Counter:
    def reset(self, **row) -> None:
        self.total = 0

    def bump(self, by: int) -> str:
        """Add to the counter.

        Args:
            by: How much.
        """
        self.total += by
        return str(self.total)

    def get_reward(self) -> float:
        return float(self.total)


def qwen_call(name: str, arguments: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call><|im_end|>'


def qwen_result(content: str) -> str:
    return f"\n<|im_start|>user\n<tool_response>\n{content}\n</tool_response><|im_end|>\n<|im_start|>assistant\n"


EPISODES = [
    [("model", qwen_call("add", '{"a": 2, "b": 3}')), ("tool", qwen_result("5")), ("model", "5<|im_end|>")],
    [("model", qwen_call("fail", '{"x": "a"}')), ("tool", qwen_result(str({"error": "boom"}))),
     ("model", "no<|im_end|>")],
    [("model", "7<|im_end|>")],
]
ENV_EPISODES = [[("model", qwen_call("bump", '{"by": 3}')), ("tool", qwen_result("3")), ("model", "3<|im_end|>")],
                [("model", "0<|im_end|>")]]


def setup(smollm2_dir, episodes, tools):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    tokenizer.chat_template = qwen2_5_chat_template
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = ScriptedLlama(config)
    rows, _ = script_episodes(model, tokenizer, episodes, 96, tools)
    return model, tokenizer, rows


def run(package, smollm2_dir, tmp_path, episodes, shown, **trainer_kwargs):
    """One step of `package`'s GRPOTrainer; returns what the reward function saw and the logged metrics."""
    model, tokenizer, rows = setup(smollm2_dir, episodes, shown)
    seen = []

    def reward(completions, **kwargs):
        seen.append(dict(kwargs, completions=completions))
        return [float(len(c)) for c in completions]

    settings = dict(output_dir=str(tmp_path / package.__name__), per_device_train_batch_size=2 * len(rows),
                    num_generations=2, max_completion_length=96, max_steps=1, logging_steps=1, report_to="none",
                    learning_rate=1e-5, beta=0.0, save_strategy="no", bf16=False, use_cpu=True, disable_tqdm=True,
                    max_tool_calling_iterations=2)
    args = package.GRPOConfig(**settings)
    extra = {}
    if package is grpo:  # the forced logits go through the model's forward, not the engine's lean decoder
        extra["generator"] = RolloutEngine(tokenizer, args.sampling_params, lean=False)
    trainer = package.GRPOTrainer(model=model, reward_funcs=reward, args=args, processing_class=tokenizer,
                                  train_dataset=Dataset.from_list(rows), **trainer_kwargs, **extra)
    trainer.train()
    return seen[0], trainer.state.log_history[0]


def by_prompt(seen) -> dict:
    return {repr(p): c for p, c in zip(seen["prompts"], seen["completions"])}


def test_tools_behave_as_in_trl(smollm2_dir, tmp_path):
    theirs, their_metrics = run(trl, smollm2_dir, tmp_path, EPISODES, [add, fail], tools=[add, fail])
    ours, our_metrics = run(grpo, smollm2_dir, tmp_path, EPISODES, [add, fail], tools=[add, fail])
    assert set(ours) == set(theirs), "the reward functions' keyword arguments"
    assert by_prompt(ours) == by_prompt(theirs)  # the whole exchange, message by message
    exchange = by_prompt(ours)[repr(next(p for p in ours["prompts"] if p[-1]["content"] == "q"))]
    assert [m["role"] for m in exchange] == ["assistant", "tool", "assistant"]
    their_tool_metrics = {k: v for k, v in their_metrics.items() if k.startswith("tools/")}
    assert set(their_tool_metrics) == {"tools/call_frequency", "tools/failure_frequency"}
    for name, value in their_tool_metrics.items():
        assert our_metrics[name] == pytest.approx(value), name
    assert our_metrics["tools/call_frequency"] == pytest.approx(2 / 3)
    assert our_metrics["tools/failure_frequency"] == pytest.approx(1 / 2)
    for name in ("completions/mean_length", "completions/max_length", "reward"):  # lengths: model tokens only
        assert our_metrics[name] == pytest.approx(their_metrics[name]), name


def test_environments_behave_as_in_trl(smollm2_dir, tmp_path):
    bump = Counter().bump
    theirs, their_metrics = run(trl, smollm2_dir, tmp_path, ENV_EPISODES, [bump], environment_factory=Counter)
    ours, our_metrics = run(grpo, smollm2_dir, tmp_path, ENV_EPISODES, [bump], environment_factory=Counter)
    assert set(ours) == set(theirs)
    assert "environments" in ours and all(isinstance(e, Counter) for e in ours["environments"])
    assert by_prompt(ours) == by_prompt(theirs)
    their_names = {k for k in their_metrics if k.startswith(("rewards/", "tools/"))}
    assert their_names <= set(our_metrics)
    for name in their_names:
        assert our_metrics[name] == pytest.approx(their_metrics[name]), name
    assert our_metrics["rewards/Counter/mean"] == pytest.approx(1.5)
