"""A run described as data: a YAML file plus command-line overrides -> model, dataset, rewards, GRPOConfig.

    model: grpo:tiny                       # hub id, local directory, or grpo:tiny
    dataset: grpo:length                   # a built-in task, a local .json/.jsonl/.csv/.parquet file, or a hub id
    # dataset: {path: data.jsonl, split: train, columns: {question: prompt}}
    reward_funcs: [length]                 # built-in names, "package.module:function" or a reward server's URL
    # tools: [calculator]                  # optional: built-in tools or "package.module:function" (docs/tools.md)
    # reward_funcs: [{name: accuracy, weight: 1.0}, {name: my_pkg.rewards:format_reward, weight: 0.2}]
    learning_rate: 2.0e-3                  # ...and any other GRPOConfig field
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import Any

import yaml

from grpo.config import GRPOConfig, did_you_mean
from grpo.embedded import TASKS
from grpo.rewards import builtin, reasoning, sandbox
from grpo.rewards.remote import is_reward_url
from grpo.tools import BUILTIN_TOOLS

RUN_KEYS = ("model", "dataset", "reward_funcs")
OPTIONAL_RUN_KEYS = ("tools",)
BUILTIN_REWARDS = {
    "length": builtin.length_reward, "accuracy": builtin.accuracy_reward,
    "math_accuracy": reasoning.math_accuracy_reward, "strict_format": reasoning.strict_format_reward,
    "soft_format": reasoning.soft_format_reward, "code_execution": sandbox.code_execution_reward,
    "problem": builtin.problem_reward, "tag_count": reasoning.tag_count_reward,
}
DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_recipe(config_path: str | None, overrides: dict[str, str]) -> dict[str, Any]:
    """The YAML file's mapping with `overrides` (raw command-line strings) applied, every value typed."""
    recipe: dict[str, Any] = {}
    if config_path:
        loaded = yaml.safe_load(Path(config_path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{config_path} must hold a mapping of settings, got {type(loaded).__name__}.")
        recipe.update(loaded)
    for key, raw in overrides.items():
        recipe[key] = yaml.safe_load(raw) if raw != "" else ""
    fields = {f.name: f for f in dataclasses.fields(GRPOConfig)}
    for key in list(recipe):
        if key in RUN_KEYS or key in OPTIONAL_RUN_KEYS:
            continue
        if key not in fields:
            raise ValueError(f"unknown setting '{key}'.{did_you_mean(key, [*RUN_KEYS, *OPTIONAL_RUN_KEYS, *fields])}")
        recipe[key] = _coerce(key, recipe[key], str(fields[key].type))
    for key in RUN_KEYS:
        if key not in recipe:
            raise ValueError(f"the run needs '{key}': set it in the YAML file or with --{key}.")
    if config_path and "dataset" not in overrides:
        recipe["dataset"] = _relative_to(Path(config_path).parent, recipe["dataset"])
    return recipe


def _relative_to(folder: Path, dataset: Any) -> Any:
    """A data file named relative to the recipe resolves next to it (when it is not found from the cwd)."""
    spec = dict(dataset) if isinstance(dataset, dict) else {"path": dataset}
    path = Path(str(spec["path"]))
    if path.suffix in DATA_FILE_BUILDERS and not path.is_absolute() and not path.exists():
        if (folder / path).exists():
            spec["path"] = str(folder / path)
    return spec if isinstance(dataset, dict) else spec["path"]


def _coerce(key: str, value: Any, annotation: str) -> Any:
    """YAML 1.1 reads 1e-5 as a string and users write "true" on the command line: follow the field's type."""
    if not isinstance(value, str) or annotation.startswith("str"):
        return value
    if value.lower() in ("none", "null") and "None" in annotation:
        return None
    if annotation.startswith("bool") and value.lower() in ("true", "false"):
        return value.lower() == "true"
    for kind in (int, float):
        if annotation.startswith(kind.__name__) or f"| {kind.__name__}" in annotation:
            try:
                return kind(value)
            except ValueError:
                continue
    if "str" in annotation:
        return value
    raise ValueError(f"setting '{key}' expects {annotation}, got {value!r}.")


def build_run(recipe: dict[str, Any]) -> dict[str, Any]:
    """GRPOTrainer keyword arguments for a recipe."""
    settings = {k: v for k, v in recipe.items() if k not in RUN_KEYS and k not in OPTIONAL_RUN_KEYS}
    args = GRPOConfig(**settings)
    funcs, weights = resolve_rewards(recipe["reward_funcs"])
    if weights is not None:
        if args.reward_weights is not None:
            raise ValueError("give reward weights either in reward_funcs entries or in reward_weights, not both.")
        args.reward_weights = weights
    run = dict(model=recipe["model"], args=args, reward_funcs=funcs, train_dataset=load_prompts(recipe["dataset"]))
    if recipe.get("tools"):
        run["tools"] = [tool_by_name(str(name)) for name in recipe["tools"]]
    return run


def resolve_rewards(spec: Any) -> tuple[list[Any], list[float] | None]:
    """Reward functions from names: built-ins, "package.module:function", or {name, weight} mappings."""
    entries = spec if isinstance(spec, list) else [spec]
    funcs, weights, weighted = [], [], False
    for entry in entries:
        if isinstance(entry, dict):
            name, weight = entry.get("name"), entry.get("weight", 1.0)
            weighted = weighted or "weight" in entry
        else:
            name, weight = entry, 1.0
        funcs.append(reward_by_name(str(name)))
        weights.append(float(weight))
    return funcs, (weights if weighted else None)


def reward_by_name(name: str) -> Any:
    """A built-in reward's name, an import path "package.module:function", or an http(s):// reward server URL."""
    if name in BUILTIN_REWARDS or is_reward_url(name):
        return BUILTIN_REWARDS.get(name, name)  # a URL stays a string: prepare_reward_funcs makes it a RemoteReward
    if ":" not in name:
        raise ValueError(
            f"unknown reward '{name}': use a built-in ({', '.join(BUILTIN_REWARDS)}), an import path "
            "'package.module:function' or a reward server's URL 'http://host:port/path'."
        )
    return _imported(name, "reward")


def tool_by_name(name: str) -> Any:
    """A built-in tool's name (grpo.tools) or an import path "package.module:function"."""
    if name in BUILTIN_TOOLS:
        return BUILTIN_TOOLS[name]
    if ":" not in name:
        raise ValueError(f"unknown tool '{name}': use a built-in ({', '.join(BUILTIN_TOOLS)}) or an import path "
                         "'package.module:function'.")
    return _imported(name, "tool")


def _imported(path: str, what: str) -> Any:
    module_name, _, attribute = path.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import {what} '{path}': {e}") from e


def load_prompts(spec: Any) -> Any:
    """A dataset from a built-in task, a local data file, or a hub id, with an optional column renaming."""
    from datasets import load_dataset

    spec = {"path": spec} if isinstance(spec, str) else dict(spec)
    path, split = str(spec.pop("path")), spec.pop("split", "train")
    columns = spec.pop("columns", None) or {}
    if path.startswith("grpo:"):
        task = path.removeprefix("grpo:")
        if task not in TASKS:
            raise ValueError(f"unknown built-in task '{task}'; the built-in tasks are {sorted(TASKS)}.")
        dataset = TASKS[task].make(spec.pop("num_prompts", 256), seed=spec.pop("seed", 0), split=split)
    elif Path(path).suffix in DATA_FILE_BUILDERS:
        if not Path(path).exists():
            raise FileNotFoundError(f"dataset file '{path}' does not exist.")
        dataset = load_dataset(DATA_FILE_BUILDERS[Path(path).suffix], data_files=path, split=split, **spec)
    else:
        dataset = load_dataset(path, split=split, **spec)
    for old, new in columns.items():
        dataset = dataset.rename_column(old, new)
    return dataset
