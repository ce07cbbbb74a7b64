"""The reward contract: how reward functions are called, what they may return, and reward models."""

from __future__ import annotations

import asyncio
import functools
import math

import numpy as np
import pytest
import torch

from grpo.rewards.builtin import accuracy_reward, completion_text, length_reward
from grpo.rewards.contract import RewardFunction, RewardModel, prepare_reward_funcs, validate_rewards
from grpo.rewards.runner import compute_rewards

PROMPTS = ["What is 3 + 4?", "What is 2 + 2?", "Say hi.", "Count to three."]
COMPLETIONS = ["7", "The answer is 4", "hi", "1 2 3"]
COMPLETION_IDS = [[10], [11, 12, 13], [14], [15, 16, 17]]


def rewards_for(reward_funcs, columns=None, completions=COMPLETIONS, prompts=PROMPTS, trainer_state=None,
                **prepare_kwargs):
    prepared = prepare_reward_funcs(reward_funcs, **prepare_kwargs)
    ids = [[1]] * len(completions) if completions is not COMPLETIONS else COMPLETION_IDS
    return compute_rewards(prepared, prompts, completions, ids, columns or {}, trainer_state=trainer_state)


# --- calling convention ------------------------------------------------------------------------------------------


def test_sync_function_gets_every_keyword():
    seen = {}
    state = object()

    def reward(prompts, completions, completion_ids, trainer_state, answers, **kwargs):
        seen.update(prompts=prompts, completions=completions, completion_ids=completion_ids,
                    trainer_state=trainer_state, answers=answers, extra=kwargs)
        return [float(len(c)) for c in completions]

    answers = ["7", "4", None, "3"]
    out = rewards_for([reward], columns={"answers": answers}, trainer_state=state)
    assert seen["prompts"] == PROMPTS
    assert seen["completions"] == COMPLETIONS
    assert seen["completion_ids"] == COMPLETION_IDS
    assert seen["trainer_state"] is state
    assert seen["answers"] == answers
    assert set(seen["extra"]) == {"log_metric", "log_extra"}  # TRL's, for the function to log with
    assert all(callable(f) for f in seen["extra"].values())
    assert out.shape == (4, 1)
    assert out.dtype == torch.float32
    assert out[:, 0].tolist() == [float(len(c)) for c in COMPLETIONS]


def test_every_column_arrives_as_a_keyword():
    def reward(completions, **kwargs):
        assert kwargs["answer"] == ["a", "b", "c", "d"]
        assert kwargs["difficulty"] == [1, 2, 3, 4]
        return [d * 1.0 for d in kwargs["difficulty"]]

    out = rewards_for([reward], columns={"answer": ["a", "b", "c", "d"], "difficulty": [1, 2, 3, 4]})
    assert out[:, 0].tolist() == [1.0, 2.0, 3.0, 4.0]


def test_none_becomes_nan():
    out = rewards_for([lambda completions, **kw: [1.0, None, 0.5, None]])
    assert out[0, 0].item() == 1.0
    assert math.isnan(out[1, 0].item())
    assert out[2, 0].item() == 0.5
    assert math.isnan(out[3, 0].item())


def test_several_functions_give_columns_in_order():
    out = rewards_for([
        lambda completions, **kw: [1, 2, 3, 4],
        lambda completions, **kw: [10, 20, 30, 40],
        lambda completions, **kw: [True, False, True, False],
    ])
    assert out.shape == (4, 3)
    assert out.dtype == torch.float32
    expected = torch.tensor([[1, 10, 1], [2, 20, 0], [3, 30, 1], [4, 40, 0]], dtype=torch.float32)
    assert torch.equal(out, expected)


def test_single_function_not_in_a_list():
    out = rewards_for(lambda completions, **kw: [0.0] * len(completions))
    assert out.shape == (4, 1)


def test_async_function():
    async def reward(completions, **kwargs):
        await asyncio.sleep(0)
        return [float(i) for i in range(len(completions))]

    prepared = prepare_reward_funcs([reward])
    assert prepared[0].is_async is True
    out = compute_rewards(prepared, PROMPTS, COMPLETIONS, COMPLETION_IDS, {})
    assert out[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_async_functions_run_concurrently():
    # Each function waits for something only the other one does: this completes only if both run at once,
    # whichever starts first. Run one after the other, the first would time out and raise.
    a_started = asyncio.Event()
    b_started = asyncio.Event()

    async def reward_a(completions, **kwargs):
        a_started.set()
        await asyncio.wait_for(b_started.wait(), timeout=10)
        return [1.0] * len(completions)

    async def reward_b(completions, **kwargs):
        b_started.set()
        await asyncio.wait_for(a_started.wait(), timeout=10)
        return [2.0] * len(completions)

    out = rewards_for([reward_a, reward_b])
    assert out[:, 0].tolist() == [1.0] * 4
    assert out[:, 1].tolist() == [2.0] * 4


def test_sync_and_async_functions_keep_their_order():
    async def second(completions, **kwargs):
        return [2.0] * len(completions)

    out = rewards_for([lambda completions, **kw: [1.0] * 4, second, lambda completions, **kw: [3.0] * 4])
    assert out[0].tolist() == [1.0, 2.0, 3.0]


def test_async_callable_instance_and_partial_are_detected_as_async():
    class AsyncReward:
        async def __call__(self, completions, **kwargs):
            return [0.5] * len(completions)

    async def scaled(completions, scale, **kwargs):
        return [scale] * len(completions)

    prepared = prepare_reward_funcs([AsyncReward(), functools.partial(scaled, scale=3.0)])
    assert [f.is_async for f in prepared] == [True, True]
    out = compute_rewards(prepared, PROMPTS, COMPLETIONS, COMPLETION_IDS, {})
    assert out[0].tolist() == [0.5, 3.0]


# --- names -------------------------------------------------------------------------------------------------------


def test_names_of_functions_partials_and_instances():
    def my_reward(completions, scale=1.0, **kwargs):
        return [scale] * len(completions)

    class FormatReward:
        def __call__(self, completions, **kwargs):
            return [1.0] * len(completions)

    prepared = prepare_reward_funcs([
        my_reward,
        functools.partial(my_reward, scale=2.0),
        functools.partial(functools.partial(length_reward), target_length=5),
        FormatReward(),
    ])
    assert all(isinstance(f, RewardFunction) for f in prepared)
    names = [f.name for f in prepared]
    assert names[2] == "length_reward"
    assert names[3] == "FormatReward"
    assert names[0].startswith("my_reward")
    assert names[1].startswith("my_reward")


def test_duplicate_names_get_a_suffix():
    prepared = prepare_reward_funcs([length_reward, length_reward, accuracy_reward, length_reward])
    names = [f.name for f in prepared]
    assert len(set(names)) == len(names)
    assert names[2] == "accuracy_reward"
    assert all(n.startswith("length_reward") for n in (names[0], names[1], names[3]))


def test_suffixed_names_stay_unique_next_to_a_function_named_like_a_suffix():
    def f(completions, **kwargs):
        return [0.0] * len(completions)

    def f_0(completions, **kwargs):
        return [0.0] * len(completions)

    names = [r.name for r in prepare_reward_funcs([f, f, f_0])]
    assert len(set(names)) == 3


def test_partial_name_is_the_function_name():
    prepared = prepare_reward_funcs([functools.partial(length_reward, target_length=5)])
    assert prepared[0].name == "length_reward"


def test_partial_arguments_are_applied():
    out = rewards_for([functools.partial(length_reward, target_length=1)], completions=["a", "abc"],
                      prompts=["p", "q"])
    assert out[:, 0].tolist() == [0.0, -2.0]


# --- errors ------------------------------------------------------------------------------------------------------


def test_wrong_length_names_the_function():
    def too_short(completions, **kwargs):
        return [1.0]

    with pytest.raises(ValueError) as info:
        rewards_for([too_short])
    assert "too_short" in str(info.value)
    assert "1 values for 4" in str(info.value)


def test_string_value_is_a_type_error_naming_the_function():
    def stringy(completions, **kwargs):
        return [1.0, "2.0", 3.0, 4.0]

    with pytest.raises(TypeError) as info:
        rewards_for([stringy])
    assert "stringy" in str(info.value)
    assert "'2.0'" in str(info.value)


def test_non_list_return_is_a_type_error():
    def scalar(completions, **kwargs):
        return 1.0

    with pytest.raises(TypeError) as info:
        rewards_for([scalar])
    assert "scalar" in str(info.value)
    assert "float" in str(info.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_value_suggests_none(bad):
    def non_finite(completions, **kwargs):
        return [0.0, bad, 0.0, 0.0]

    with pytest.raises(ValueError) as info:
        rewards_for([non_finite])
    assert "non_finite" in str(info.value)
    assert "None" in str(info.value)


def test_raising_function_is_wrapped_with_its_name_and_the_original_error():
    def broken(completions, **kwargs):
        raise KeyError("missing_column")

    with pytest.raises(RuntimeError) as info:
        rewards_for([broken])
    message = str(info.value)
    assert "broken" in message
    assert "KeyError" in message
    assert "missing_column" in message
    assert isinstance(info.value.__cause__, KeyError)


def test_raising_async_function_is_wrapped_too():
    async def broken_async(completions, **kwargs):
        raise ValueError("service down")

    with pytest.raises(RuntimeError) as info:
        rewards_for([broken_async])
    assert "broken_async" in str(info.value)
    assert "service down" in str(info.value)


def test_function_missing_a_column_argument_is_explained():
    def needs_answer(completions, answer, **kwargs):
        return [1.0] * len(completions)

    with pytest.raises(RuntimeError) as info:
        rewards_for([needs_answer])
    assert "needs_answer" in str(info.value)
    assert "answer" in str(info.value)


def test_empty_reward_funcs():
    with pytest.raises(ValueError, match="empty"):
        prepare_reward_funcs([])


def test_non_callable_reward_func():
    with pytest.raises(TypeError) as info:
        prepare_reward_funcs([length_reward, 3])
    assert "reward_funcs[1]" in str(info.value)
    assert "int" in str(info.value)


def test_processing_classes_must_match_reward_funcs():
    with pytest.raises(ValueError, match="reward_processing_classes"):
        prepare_reward_funcs([length_reward, accuracy_reward], reward_processing_classes=[None])


# --- accepted return types ---------------------------------------------------------------------------------------


def test_numpy_array_is_accepted():
    out = rewards_for([lambda completions, **kw: np.array([1.0, 2.0, 3.0, 4.0])])
    assert out[:, 0].tolist() == [1.0, 2.0, 3.0, 4.0]


def test_numpy_scalars_in_a_list_are_accepted():
    out = rewards_for([lambda completions, **kw: [np.float32(1.5), np.int64(2), np.float64(0.0), 1]])
    assert out[:, 0].tolist() == [1.5, 2.0, 0.0, 1.0]


def test_torch_tensor_is_accepted():
    out = rewards_for([lambda completions, **kw: torch.tensor([0.5, 1.0, 1.5, 2.0])])
    assert out[:, 0].tolist() == [0.5, 1.0, 1.5, 2.0]


def test_tuple_is_accepted():
    out = rewards_for([lambda completions, **kw: (1, 2, 3, 4)])
    assert out[:, 0].tolist() == [1.0, 2.0, 3.0, 4.0]


def test_validate_rewards_directly():
    assert validate_rewards("f", [1, None, 2.5], 3)[0] == 1.0
    assert math.isnan(validate_rewards("f", [1, None, 2.5], 3)[1])
    assert validate_rewards("f", np.array([1.0, 2.0]), 2) == [1.0, 2.0]
    with pytest.raises(ValueError, match="2 values for 3"):
        validate_rewards("f", [1.0, 2.0], 3)
    with pytest.raises(TypeError, match="'f'"):
        validate_rewards("f", [b"x"], 1)


# --- built-in rewards --------------------------------------------------------------------------------------------


def test_completion_text():
    assert completion_text("hello") == "hello"
    assert completion_text([{"role": "assistant", "content": "hi there"}]) == "hi there"
    assert completion_text([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]) == "a"
    assert completion_text([]) == ""


def test_length_reward_on_strings():
    assert length_reward(["x" * 20, "x" * 15, "x" * 25, ""]) == [0, -5, -5, -20]
    assert length_reward(["abc"], target_length=3) == [0]


def test_length_reward_on_conversational_completions():
    completions = [
        [{"role": "assistant", "content": "x" * 20}],
        [{"role": "assistant", "content": "short"}],
    ]
    assert length_reward(completions) == [0, -15]


def test_accuracy_reward():
    completions = ["7", " 7 apples", "8", "anything"]
    assert accuracy_reward(completions, answer=["7", "7", "7", None]) == [1.0, 1.0, 0.0, None]


def test_accuracy_reward_on_conversational_completions_and_numbers():
    completions = [[{"role": "assistant", "content": "It is 3.0"}], [{"role": "assistant", "content": "none"}]]
    assert accuracy_reward(completions, answer=["3", "3"]) == [1.0, 0.0]


def test_builtins_through_compute_rewards():
    out = rewards_for([accuracy_reward, length_reward], completions=["7", " 7 apples", "8", "9"],
                      columns={"answer": ["7", "7", "7", None]})
    assert out[:3, 0].tolist() == [1.0, 1.0, 0.0]
    assert math.isnan(out[3, 0].item())
    assert out[:, 1].tolist() == [-19.0, -11.0, -19.0, -19.0]


# --- reward models -----------------------------------------------------------------------------------------------


@pytest.fixture
def reward_model_dir(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from grpo.embedded import build_tokenizer

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_labels=1, pad_token_id=0,
    )
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    path = tmp_path / "tiny-reward-model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _scores_by_hand(model, tokenizer, texts):
    batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
    with torch.no_grad():
        return model.eval()(**batch).logits[:, 0].float()


def _load(path):
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    return LlamaForSequenceClassification.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def test_reward_model_from_a_path(reward_model_dir):
    prepared = prepare_reward_funcs([str(reward_model_dir)])
    assert isinstance(prepared[0].func, RewardModel)
    assert prepared[0].name == "tiny-reward-model"
    assert prepared[0].is_async is False

    out = compute_rewards(prepared, PROMPTS, COMPLETIONS, COMPLETION_IDS, {})
    assert out.shape == (4, 1)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()

    model, tokenizer = _load(reward_model_dir)
    expected = _scores_by_hand(model, tokenizer, [p + c for p, c in zip(PROMPTS, COMPLETIONS)])
    assert torch.allclose(out[:, 0], expected, atol=1e-5)
    assert len(set(out[:, 0].tolist())) > 1  # a real score per text, not a constant


def test_reward_model_scores_do_not_depend_on_padding(reward_model_dir):
    out = rewards_for([str(reward_model_dir)])
    model, tokenizer = _load(reward_model_dir)
    one_by_one = torch.cat(
        [_scores_by_hand(model, tokenizer, [p + c]) for p, c in zip(PROMPTS, COMPLETIONS)]
    )
    assert torch.allclose(out[:, 0], one_by_one, atol=1e-5)


def test_reward_model_as_a_loaded_model(reward_model_dir):
    from transformers import PreTrainedModel

    model, tokenizer = _load(reward_model_dir)
    assert isinstance(model, PreTrainedModel)
    prepared = prepare_reward_funcs([model, length_reward], reward_processing_classes=[tokenizer, None])
    assert isinstance(prepared[0].func, RewardModel)
    assert prepared[0].name == "tiny-reward-model"
    assert prepared[1].name == "length_reward"

    out = compute_rewards(prepared, PROMPTS, COMPLETIONS, COMPLETION_IDS, {})
    assert out.shape == (4, 2)
    assert torch.isfinite(out).all()
    expected = _scores_by_hand(model, tokenizer, [p + c for p, c in zip(PROMPTS, COMPLETIONS)])
    assert torch.allclose(out[:, 0], expected, atol=1e-5)
    assert out[:, 1].tolist() == [float(r) for r in length_reward(COMPLETIONS)]


def test_reward_model_on_conversational_prompts(reward_model_dir):
    model, tokenizer = _load(reward_model_dir)
    prompts = [[{"role": "user", "content": "What is 3 + 4?"}], [{"role": "user", "content": "Say hi."}]]
    completions = [[{"role": "assistant", "content": "7"}], [{"role": "assistant", "content": "hello there"}]]
    out = rewards_for([model], prompts=prompts, completions=completions, reward_processing_classes=[tokenizer])
    texts = [tokenizer.apply_chat_template(p + c, tokenize=False) for p, c in zip(prompts, completions)]
    expected = _scores_by_hand(model, tokenizer, texts)
    assert torch.isfinite(out).all()
    assert torch.allclose(out[:, 0], expected, atol=1e-5)
