"""Micro-batch planning: hand-worked cuts by row count and token budget, and even counts across processes."""

from __future__ import annotations

import torch

from grpo.batching import cut_micro_batches, plan_steps, split_to_counts

# rows 0..5 with these prompt + completion lengths; sorted by length: 3 (2), 0 (3), 5 (4), 1 (5), 4 (9), 2 (20)
LENGTHS = torch.tensor([3, 5, 20, 2, 9, 4])
BY_LENGTH = torch.tensor([3, 0, 5, 1, 4, 2])


def as_lists(pieces: list[torch.Tensor]) -> list[list[int]]:
    return [p.tolist() for p in pieces]


def test_without_a_budget_pieces_are_batch_size_rows():
    assert as_lists(cut_micro_batches(BY_LENGTH, LENGTHS, 4, None)) == [[3, 0, 5, 1], [4, 2]]


def test_a_budget_cuts_each_micro_batch_into_the_fewest_equal_pieces_within_it():
    # budget 12: [3, 0, 5, 1] pads to 4 x 5 = 20, in two pieces [3, 0] (2 x 3) and [5, 1] (2 x 5); [4, 2] pads to
    # 2 x 20 = 40: [4] (9) and [2] (20, over the budget but a single row)
    assert as_lists(cut_micro_batches(BY_LENGTH, LENGTHS, 4, 12)) == [[3, 0], [5, 1], [4], [2]]
    # budget 9: [3, 0, 5, 1] in two pieces would still pad [5, 1] to 10, so three: [3, 0] (6), [5] (4), [1] (5)
    assert as_lists(cut_micro_batches(BY_LENGTH, LENGTHS, 4, 9)) == [[3, 0], [5], [1], [4], [2]]
    # a budget this large changes nothing
    assert as_lists(cut_micro_batches(BY_LENGTH, LENGTHS, 4, 1000)) == [[3, 0, 5, 1], [4, 2]]


def test_plan_steps_sorts_each_step_by_length():
    order = torch.tensor([2, 0, 4, 1, 3, 5])
    steps = plan_steps(order, LENGTHS, batch_size=2, accumulation_steps=2, num_iterations=1, max_tokens=None)
    # step 1 takes rows 2, 0, 4, 1 -> by length 0 (3), 1 (5), 4 (9), 2 (20); step 2 takes 3, 5
    assert [as_lists(s) for s in steps] == [[[0, 1], [4, 2]], [[3, 5]]]
    twice = plan_steps(order, LENGTHS, batch_size=3, accumulation_steps=2, num_iterations=2, max_tokens=None)
    assert len(twice) == 2 and as_lists(twice[0]) == as_lists(twice[1])  # the second pass reuses the order


def test_plan_steps_keeps_a_prompts_rows_together_for_the_shared_prefix_forward():
    # groups of 2: rows {0, 1}, {2, 3}, {4, 5}; longest rows 5, 20 and 9. By length the step is 3 0 5 1 4 2;
    # grouped, ordered by each group's longest row: {0, 1} (5), {5, 4} (9), {3, 2} (20), shortest first inside
    order = torch.tensor([2, 0, 4, 1, 3, 5])
    steps = plan_steps(order, LENGTHS, batch_size=2, accumulation_steps=3, num_iterations=1, max_tokens=None,
                       group_size=2)
    assert [as_lists(s) for s in steps] == [[[0, 1], [5, 4], [3, 2]]]
    # the step's rows and so the update are the same; only which rows share a micro-batch changes
    plain = plan_steps(order, LENGTHS, batch_size=2, accumulation_steps=3, num_iterations=1, max_tokens=None)
    assert sorted(torch.cat(steps[0]).tolist()) == sorted(torch.cat(plain[0]).tolist())


def test_split_to_counts_halves_the_largest_piece_until_the_count_is_met():
    steps = [[torch.tensor([3, 0, 5, 1]), torch.tensor([4, 2])]]  # padded sizes 4 x 5 = 20 and 2 x 20 = 40
    assert as_lists(split_to_counts(steps, [3], LENGTHS)[0]) == [[3, 0, 5, 1], [4], [2]]
    four = split_to_counts(steps, [4], LENGTHS)[0]  # then [3, 0, 5, 1] (20) is the largest splittable
    assert as_lists(four) == [[3, 0], [5, 1], [4], [2]]
    assert as_lists(split_to_counts(steps, [2], LENGTHS)[0]) == [[3, 0, 5, 1], [4, 2]]  # already enough
