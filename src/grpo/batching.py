"""How a round's rows become optimizer steps, and a step's rows become micro-batches (forward/backward passes).

The loss normaliser counts the whole optimizer step (`StepCounts`), so how a step's rows are cut into
micro-batches changes memory and speed but not the update. That freedom is used three times: rows are sorted by
length so a micro-batch is padded only to rows like it; a micro-batch is cut smaller when its padded size
(rows x longest row) would exceed `max_tokens`, which bounds the activation memory of one forward/backward
however long the completions get, without recomputing anything (gradient checkpointing stays a separate choice);
and rows whose loss is exactly 0 (advantage 0, nothing else in the loss) leave the forward/backward altogether
(`split_silent`).
"""

from __future__ import annotations

import torch


def plan_steps(order: torch.Tensor, lengths: torch.Tensor, batch_size: int, accumulation_steps: int,
               num_iterations: int, max_tokens: int | None, group_size: int = 1) -> list[list[torch.Tensor]]:
    """The optimizer steps of a round: each a list of micro-batches (row indices).

    `order`: the round's rows, shuffled; every pass (`num_iterations`) reuses it. A step takes
    `accumulation_steps` x `batch_size` rows of it; within the step they are sorted by `lengths` (prompt +
    completion tokens), keeping the step's rows of one prompt (rows `group_size * g` to `group_size * (g + 1) - 1`)
    next to each other, so that a micro-batch holds whole groups and the forward computes their shared prompt
    once (`grpo.packing`); then they are cut by `cut_micro_batches`.
    """
    micro_batches = list(order.split(batch_size)) * num_iterations
    steps = []
    for start in range(0, len(micro_batches), accumulation_steps):
        rows = torch.cat(micro_batches[start:start + accumulation_steps])
        by_length = rows[torch.argsort(lengths[rows], stable=True)]
        if group_size > 1:
            by_length = by_length[_group_order(by_length // group_size, lengths[by_length])]
        steps.append(cut_micro_batches(by_length, lengths, batch_size, max_tokens))
    return steps


def _group_order(groups: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """A stable order of length-sorted rows that brings each group's rows together, the groups ordered by their
    longest row (then by group id); rows keep their length order within a group."""
    longest = torch.zeros(int(groups.max()) + 1, dtype=lengths.dtype).scatter_reduce(0, groups, lengths, "amax")
    return torch.argsort(longest[groups] * (len(longest) + 1) + groups, stable=True)


def cut_micro_batches(rows: torch.Tensor, lengths: torch.Tensor, batch_size: int, max_tokens: int | None
                      ) -> list[torch.Tensor]:
    """`rows` (sorted by length, shortest first) cut into micro-batches of `batch_size` rows, each of which is
    cut again into the fewest equal pieces whose padded size (rows x the piece's longest row) stays within
    `max_tokens` (a single row may exceed it). No rows, no micro-batches."""
    pieces = []
    for batch in rows.split(batch_size) if len(rows) else []:
        count = 1
        while count < len(batch) and max_tokens is not None and any(
                len(p) * int(lengths[p].max()) > max_tokens for p in batch.tensor_split(count)):
            count += 1
        pieces.extend(batch.tensor_split(count))
    return pieces


def split_to_counts(steps: list[list[torch.Tensor]], counts: list[int], lengths: torch.Tensor
                    ) -> list[list[torch.Tensor]]:
    """Each step cut into exactly `counts[i]` micro-batches, by halving its largest piece (in padded tokens)
    until there are enough. Several processes must run the same number of forward passes per step (each forward
    of a sharded or DDP model may communicate), so every process cuts its steps to the count the process that
    needs the most pieces asked for. A step never needs more pieces than it has rows."""
    evened = []
    for pieces, count in zip(steps, counts):
        pieces = list(pieces)
        while len(pieces) < count:
            sizes = [len(p) * int(lengths[p].max()) if len(p) > 1 else -1 for p in pieces]
            i = max(range(len(pieces)), key=sizes.__getitem__)
            half = (len(pieces[i]) + 1) // 2
            pieces[i:i + 1] = [pieces[i][:half], pieces[i][half:]]
        evened.append(pieces)
    return evened


def split_silent(micro_batches: list[torch.Tensor], silent: torch.Tensor, lengths: torch.Tensor, batch_size: int,
                 max_tokens: int | None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """A step's micro-batches without the rows where `silent` (bool over the round's rows) is set, the rest kept in
    the step's order and cut again by `cut_micro_batches` (fewer forward/backward passes, none larger than
    before), and the silent rows. The loss normaliser counts the whole step, so leaving out rows whose loss is
    exactly 0 leaves the update unchanged."""
    rows = torch.cat(micro_batches)
    heard = rows[~silent[rows]]
    return cut_micro_batches(heard, lengths, batch_size, max_tokens), rows[silent[rows]]


def even_passes(pieces: list[torch.Tensor], count: int, lengths: torch.Tensor, spare: torch.Tensor
                ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """`pieces` made exactly `count` passes for processes that must all run as many (`count` at least
    len(pieces)): cut by `split_to_counts` while they have rows enough, then each further pass one row from the
    front of `spare` (rows whose loss is 0, so a pass of one adds nothing to the update). Returns the passes and
    the spare rows not used."""
    rows = sum(len(p) for p in pieces)
    passes = split_to_counts([pieces], [min(count, rows)], lengths)[0] if pieces else []
    extra = count - len(passes)
    return passes + [spare[i:i + 1] for i in range(extra)], spare[extra:]
