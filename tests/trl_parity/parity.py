"""Run one configuration through TRL's GRPOTrainer and through grpo's, and record what a user can observe.

An `Observation` holds, for one library: where the configuration was refused (if it was), the key sets of every
per-step, eval and final `log_history` entry, what `train()` returned, what each reward function received on each
call (keyword names, and types and lengths of their values), `trainer.state`'s fields, and the callback events in
order. Tests compare the two observations; the few places where grpo deliberately differs are named in the tests.

Both libraries train the same tiny model (the embedded default model, saved once per session) on CPU, one or two
optimizer steps with completions of at most 8 tokens, so that a configuration costs about a second in each.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import warnings
from collections.abc import Callable
from typing import Any

from datasets import Dataset
from transformers import TrainerCallback

from grpo.embedded import length_task

LIBRARIES = ("trl", "grpo")

# Small and fast in both libraries: 1 step, 2 prompts x 2 completions of at most 8 tokens, no checkpoints.
BASE_SETTINGS: dict[str, Any] = dict(
    max_steps=1, num_generations=2, per_device_train_batch_size=4, max_completion_length=8, logging_steps=1,
    learning_rate=1e-3, report_to="none", save_strategy="no", bf16=False, disable_tqdm=True, seed=0,
    gradient_checkpointing=False,  # a 0.6M-parameter model: recomputing activations only costs time
)
SUMMARY_KEYS = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss"}


def classes(library: str) -> tuple[type, type]:
    """(GRPOConfig, GRPOTrainer) of one library: the import line is all a user changes."""
    if library == "trl":
        from trl import GRPOConfig, GRPOTrainer
    else:
        from grpo import GRPOConfig, GRPOTrainer
    return GRPOConfig, GRPOTrainer


# ---- datasets ------------------------------------------------------------------------------------------------
def dataset(kind: str, num_prompts: int = 8, seed: int = 0) -> Any:
    """standard | conversational | columns (extra columns of several types) | iterable (an IterableDataset)."""
    if kind == "conversational":
        return length_task(num_prompts, seed=seed, conversational=True)
    rows = length_task(num_prompts, seed=seed)
    if kind == "standard":
        return rows
    with_columns = Dataset.from_list([{"prompt": row["prompt"], "answer": i, "tag": f"t{i}", "weight": 0.5 * i}
                                      for i, row in enumerate(rows)])
    if kind == "columns":
        return with_columns
    if kind == "iterable":
        return rows.to_iterable_dataset()
    raise ValueError(kind)


# ---- reward functions that record what they receive -----------------------------------------------------------
def describe(value: Any, outer: bool = True) -> str:
    """A value's shape as a user's code sees it: container types and element types, recursively, and the length
    of the outer list (inner lengths depend on what was sampled)."""
    if isinstance(value, list):
        size = f"[{len(value)}]" if outer else ""
        return f"list{size} of {describe(value[0], False)}" if value else f"list{size}"
    if isinstance(value, dict):
        return "dict(" + ", ".join(f"{k}: {describe(v, False)}" for k, v in sorted(value.items())) + ")"
    if callable(value) and not isinstance(value, type):
        return "callable"
    return type(value).__name__


def _text(completion: Any) -> str:
    return completion[-1]["content"] if isinstance(completion, list) else completion


class RewardLog:
    """What every reward function received, call by call: {keyword: describe(value)}."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, str]]] = []

    def record(self, name: str, kwargs: dict[str, Any]) -> None:
        self.calls.append((name, {k: describe(v) for k, v in sorted(kwargs.items())}))

    def functions(self, kinds: tuple[str, ...]) -> list[Any]:
        return [self._function(kind) for kind in kinds]

    def _function(self, kind: str) -> Any:
        log = self

        def length(completions: list[Any], **kwargs: Any) -> list[float]:
            log.record("length", dict(kwargs, completions=completions))
            return [-abs(20 - len(_text(c))) for c in completions]

        async def async_length(completions: list[Any], **kwargs: Any) -> list[float]:
            log.record("async_length", dict(kwargs, completions=completions))
            return [float(len(_text(c)) % 3) for c in completions]

        def some_none(completions: list[Any], **kwargs: Any) -> list[float | None]:
            log.record("some_none", dict(kwargs, completions=completions))
            return [None if i % 2 else float(len(_text(c))) for i, c in enumerate(completions)]

        def all_none(completions: list[Any], **kwargs: Any) -> list[float | None]:
            log.record("all_none", dict(kwargs, completions=completions))
            return [None] * len(completions)

        def uses_log_metric(completions: list[Any], log_metric: Callable, **kwargs: Any) -> list[float]:
            log.record("uses_log_metric", dict(kwargs, completions=completions, log_metric=log_metric))
            log_metric("my_metric", 1.5)
            return [1.0] * len(completions)

        def one_short(completions: list[Any], **kwargs: Any) -> list[float]:
            return [1.0] * (len(completions) - 1)

        def nan(completions: list[Any], **kwargs: Any) -> list[float]:
            return [float("nan")] + [1.0] * (len(completions) - 1)

        def infinite(completions: list[Any], **kwargs: Any) -> list[float]:
            return [float("inf")] + [1.0] * (len(completions) - 1)

        def text(completions: list[Any], **kwargs: Any) -> list[str]:
            return ["good"] * len(completions)

        functions = {"length": length, "async": async_length, "some_none": some_none, "all_none": all_none,
                     "log_metric": uses_log_metric, "one_short": one_short, "nan": nan, "inf": infinite,
                     "text": text}
        return functions.get(kind)


class EventLog(TrainerCallback):
    """Every callback event, in order, by name."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("on_"):
            return functools.partial(object.__getattribute__(self, "_record"), name)
        return object.__getattribute__(self, name)

    def _record(self, name: str, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.events.append(name)


# ---- one configuration through one library -------------------------------------------------------------------
@dataclasses.dataclass
class Case:
    """A configuration as a user writes it: config fields, data, reward functions and trainer arguments."""

    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    data: str = "standard"
    rewards: tuple[str, ...] = ("length",)
    eval_data: bool = False
    peft: bool = False
    callbacks: bool = False


@dataclasses.dataclass
class Observation:
    refused_at: str | None = None  # "config", "trainer" or "train"
    error: str = ""
    step_keys: list[set[str]] = dataclasses.field(default_factory=list)
    eval_keys: list[set[str]] = dataclasses.field(default_factory=list)
    summary_keys: set[str] = dataclasses.field(default_factory=set)
    output: tuple[str, tuple[str, ...], set[str]] | None = None  # (type, fields, metric names)
    reward_calls: list[tuple[str, dict[str, str]]] = dataclasses.field(default_factory=list)
    state_fields: set[str] = dataclasses.field(default_factory=set)
    state_values: dict[str, Any] = dataclasses.field(default_factory=dict)
    events: list[str] = dataclasses.field(default_factory=list)
    trainer: Any = None


# trainer.state values that must agree after the same run
COMPARED_STATE = ("global_step", "max_steps", "logging_steps", "eval_steps", "save_steps", "train_batch_size",
                  "num_train_epochs", "epoch", "best_metric", "best_global_step", "is_world_process_zero")


def lora_config() -> Any:
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def observe(library: str, case: Case, model_dir: str, output_dir: str, reward_model_dir: str | None = None,
            train: bool = True) -> Observation:
    """Build the config and the trainer, then (with `train`) train, recording every observable. A reward named
    "reward_model" is the sequence-classification model in `reward_model_dir`, given by its path."""
    config_class, trainer_class = classes(library)
    seen, rewards, events = Observation(), RewardLog(), EventLog()
    try:
        args = config_class(output_dir=output_dir, **{**BASE_SETTINGS, **case.settings})
    except Exception as e:  # noqa: BLE001 - a refusal is what is observed
        return dataclasses.replace(seen, refused_at="config", error=f"{type(e).__name__}: {e}")
    extra: dict[str, Any] = {}
    if case.eval_data:
        extra["eval_dataset"] = dataset("standard", 4, seed=1)
    if case.peft:
        extra["peft_config"] = lora_config()
    if case.callbacks:
        extra["callbacks"] = [events]
    funcs = [reward_model_dir if kind == "reward_model" else f
             for kind, f in zip(case.rewards, rewards.functions(case.rewards))]
    with _quiet():
        try:
            trainer = trainer_class(model=model_dir, reward_funcs=funcs if len(funcs) > 1 else funcs[0], args=args,
                                    train_dataset=dataset(case.data), **extra)
        except Exception as e:  # noqa: BLE001
            return dataclasses.replace(seen, refused_at="trainer", error=f"{type(e).__name__}: {e}")
        seen.trainer = trainer
        if not train:
            return seen
        try:
            output = trainer.train()
        except Exception as e:  # noqa: BLE001
            return dataclasses.replace(seen, refused_at="train", error=f"{type(e).__name__}: {e}",
                                       reward_calls=rewards.calls, trainer=trainer)
    history = trainer.state.log_history
    seen.step_keys = [set(e) for e in history if "loss" in e and not SUMMARY_KEYS & set(e)]
    seen.eval_keys = [set(e) for e in history if any(k.startswith("eval_") for k in e)]
    seen.summary_keys = set(history[-1]) if history and SUMMARY_KEYS <= set(history[-1]) else set()
    seen.output = (type(output).__name__, tuple(getattr(output, "_fields", ())), set(output.metrics))
    seen.reward_calls = rewards.calls
    seen.state_fields = {k for k in vars(trainer.state) if not k.startswith("_")}
    seen.state_values = {k: getattr(trainer.state, k, None) for k in COMPARED_STATE}
    seen.events = events.events
    return seen


@contextlib.contextmanager
def _quiet():
    """Neither library's progress lines and warnings are observations here; keep the test output readable."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield
