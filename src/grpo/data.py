"""Prompt rows -> generation rounds -> token ids.

A row is a dict with a `prompt` (a string, or a conversation: a list of {"role", "content"} messages) and any
other columns, which travel with it to the reward functions. The sampler cuts each epoch into rounds of
`prompts_per_generation` unique prompts (TRL drops the last incomplete round the same way).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

from datasets import Dataset, IterableDataset
from pyarrow import ArrowException

DROP_EMPTY = ("Drop such rows before training, e.g. dataset.filter(lambda row: row['prompt'].strip()), or give "
              "them text.")


def is_conversational(prompt: Any) -> bool:
    return isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt)


def check_prompt(prompt: Any, where: str) -> None:
    if prompt == "":
        raise ValueError(f"{where}: the prompt is empty; generation needs text to continue from. {DROP_EMPTY}")
    if isinstance(prompt, str) or (is_conversational(prompt) and prompt):
        return
    raise TypeError(
        f"{where}: the prompt is a {type(prompt).__name__} ({str(prompt)[:80]!r}); a prompt must be a string or a "
        "non-empty list of messages like [{'role': 'user', 'content': '...'}]."
    )


class PromptSource:
    """A training set as rows: a `datasets.Dataset`, an `IterableDataset` or a list of dicts."""

    def __init__(self, dataset: Any, name: str = "train_dataset", max_rows_checked: int = 50_000):
        rows_checked = isinstance(dataset, list)  # a list's prompts are checked row by row below
        if rows_checked:
            if dataset and not all(isinstance(row, dict) for row in dataset):
                raise TypeError(f"{name} is a list whose items are not all dicts; give rows like {{'prompt': ...}}.")
            for i, row in enumerate(dataset):  # before Arrow, whose error for mixed types names no row
                if "prompt" in row:
                    check_prompt(row["prompt"], f"{name}[{i}]")
                elif i > 0 and "prompt" in dataset[0]:
                    raise ValueError(f"{name}[{i}] has no 'prompt' (its keys: {list(row)}); every row needs one.")
            try:
                dataset = Dataset.from_list(dataset) if dataset else Dataset.from_dict({})
            except (TypeError, ValueError, ArrowException) as e:
                raise TypeError(f"{name} cannot become a table ({e}); every row must have the same columns, each "
                                "holding values of one type.") from e
        if not isinstance(dataset, (Dataset, IterableDataset)):
            raise TypeError(
                f"{name} is a {type(dataset).__name__}; pass a datasets.Dataset, a datasets.IterableDataset or a "
                "list of dicts with a 'prompt' key."
            )
        self.dataset = dataset
        self.is_iterable = isinstance(dataset, IterableDataset)
        first = next(iter(dataset), None) if self.is_iterable else (dataset[0] if len(dataset) else None)
        if first is None:
            raise ValueError(f"{name} is empty: it needs at least one row with a 'prompt'.")
        if "prompt" not in first:
            columns = list(first)
            hint = next((c for c in columns if c.lower() in ("question", "query", "instruction", "text", "input")),
                        None)
            fix = f"rename it with dataset.rename_column('{hint}', 'prompt')" if hint else "add a 'prompt' column"
            raise ValueError(f"{name} has no 'prompt' column (its columns: {columns}); {fix}.")
        check_prompt(first["prompt"], f"{name}[0]")
        if not rows_checked and not self.is_iterable and len(dataset) <= max_rows_checked:  # a null hides in Arrow
            for i, prompt in enumerate(dataset["prompt"]):
                check_prompt(prompt, f"{name}[{i}]")
        self.first_row = first
        self.columns = list(first)
        self.conversational = is_conversational(first["prompt"])

    def __len__(self) -> int:
        if self.is_iterable:
            raise TypeError("an IterableDataset has no length")
        return len(self.dataset)

    def column(self, name: str, max_rows: int = 50_000) -> list[Any] | None:
        """A column's values where reading them is cheap (a Dataset of at most `max_rows` rows), else None."""
        if self.is_iterable or name not in self.columns or len(self.dataset) > max_rows:
            return None
        return list(self.dataset[name])

    def rounds(self, prompts_per_round: int, seed: int, shuffle: bool, skip: int = 0
               ) -> Iterator[tuple[int, list[dict[str, Any]]]]:
        """Yield (epoch, rows) forever, one round of unique prompts at a time; the caller decides when to stop.

        `skip` rounds are passed over first (a resumed run continues where it stopped): without reading them for a
        Dataset, by reading and dropping them for an IterableDataset, which cannot seek.
        """
        epoch, skip_in_epoch = 0, skip
        if not self.is_iterable:
            epoch, skip_in_epoch = divmod(skip, max(len(self.dataset) // prompts_per_round, 1))
        while True:
            for rows in self._epoch_rounds(prompts_per_round, seed + epoch, shuffle, skip_in_epoch):
                if skip_in_epoch > 0:
                    skip_in_epoch -= 1
                    continue
                yield epoch, rows
            epoch += 1

    def _epoch_rounds(self, size: int, seed: int, shuffle: bool, skip: int = 0) -> Iterator[list[dict[str, Any]]]:
        if self.is_iterable:
            stream = self.dataset.shuffle(seed=seed, buffer_size=1000) if shuffle else self.dataset
            chunk: list[dict[str, Any]] = []
            for row in stream:
                chunk.append(row)
                if len(chunk) == size:
                    yield chunk
                    chunk = []
            return
        order = list(range(len(self.dataset)))
        if shuffle:
            random.Random(seed).shuffle(order)
        for start in range(0, len(order) - size + 1, size):
            # a round to be skipped is yielded empty: the caller drops it without its rows being read
            yield [] if start < skip * size else [self.dataset[i] for i in order[start:start + size]]


def tokenize_prompts(tokenizer: Any, prompts: list[Any], chat_template_kwargs: dict[str, Any] | None = None
                     ) -> list[list[int]]:
    """Token ids of each prompt: the chat template for conversations (with a generation prompt), the plain
    tokenizer (with its special tokens) for strings. Prompts are never truncated."""
    ids = []
    for prompt in prompts:
        if is_conversational(prompt):
            text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False,
                                                 **(chat_template_kwargs or {}))
            ids.append(tokenizer(text, add_special_tokens=False).input_ids)
        else:
            ids.append(tokenizer(prompt).input_ids)
    return ids


def context_length(model_config: Any) -> int | None:
    """Positions the model can attend over (None when its config does not say)."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(model_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_prompt_ids(prompts: list[Any], prompt_ids: list[list[int]], tokenizer: Any, max_completion_length: int,
                     limit: int | None, where: str = "prompt {i} of the round") -> None:
    """Before generation: every prompt has an ordinary token to continue from (an empty prompt, or one of special
    tokens only, such as "<pad>", makes an empty or meaningless row) and fits the context. `where` names row i."""
    special = set(tokenizer.all_special_ids)
    for i, ids in enumerate(prompt_ids):
        if all(token in special for token in ids):
            what = f"only special tokens {tokenizer.convert_ids_to_tokens(ids)}" if ids else "no tokens"
            raise ValueError(
                f"{where.format(i=i)} ({repr(prompts[i])[:80]}) tokenizes to {what}; generation needs at least one "
                f"ordinary token to continue from. {DROP_EMPTY}"
            )
    check_lengths([len(ids) for ids in prompt_ids], max_completion_length, limit)


def check_lengths(prompt_lengths: list[int], max_completion_length: int, limit: int | None) -> None:
    """A prompt plus a full-length completion must fit the model's context, or generation fails mid-round."""
    if limit is None:
        return
    for i, n in enumerate(prompt_lengths):
        if n + max_completion_length > limit:
            raise ValueError(
                f"prompt {i} is {n} tokens; with max_completion_length={max_completion_length} it needs "
                f"{n + max_completion_length} positions, more than the model's context of {limit}. Drop long prompts "
                f"(keep those of at most {limit - max_completion_length} tokens, e.g. with dataset.filter) or lower "
                "max_completion_length."
            )


def check_prompt_lengths(source: PromptSource, tokenizer: Any, model_config: Any, max_completion_length: int,
                         chat_template_kwargs: dict[str, Any] | None = None, max_rows: int = 50_000) -> int | None:
    """Check every prompt of a Dataset before training starts: it has ordinary tokens and fits the context (an
    IterableDataset, or one of more than `max_rows` rows, is checked round by round instead). Returns the longest
    prompt's token count (None when not checked here)."""
    if source.is_iterable or len(source) > max_rows:
        return None
    prompts = source.dataset["prompt"]
    prompt_ids = tokenize_prompts(tokenizer, prompts, chat_template_kwargs)
    check_prompt_ids(prompts, prompt_ids, tokenizer, max_completion_length, context_length(model_config),
                     where="train_dataset[{i}]")
    return max(map(len, prompt_ids), default=0)
