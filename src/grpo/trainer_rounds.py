"""The trainer's generation rounds: sample G completions per prompt, score them, compute advantages and the
log-probs the loss needs, and cut the round into optimizer steps.

`GenerationRounds` is a part of `GRPOTrainer` (it reads the trainer's model, generator, reward runner and config),
kept in a file of its own so that trainer.py reads as the loop: `generate_and_score` is one generation round,
`_generate_round` adds DAPO's dynamic sampling around it, `_optimizer_steps` plans the round's steps.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from grpo import distributed
from grpo.algorithm import MULTI_OBJECTIVE_AGGREGATIONS, all_equal_groups, combine_rewards
from grpo.batching import plan_steps, split_to_counts
from grpo.distributed import Processes
from grpo.logprobs import completion_logps_in_chunks
from grpo.metrics import round_metrics, tool_metrics
from grpo.rollout import Rollout


class GenerationRounds:
    """Generation rounds, as methods of `GRPOTrainer`."""

    def _optimizer_steps(self, rollout: Rollout) -> list[list[torch.Tensor]]:
        """Split a round into optimizer steps of micro-batches (see `grpo.batching`).

        The rows are shuffled once per round, so when a round feeds several optimizer steps each sees a mix of
        prompts. Every process runs the same number of micro-batches per step (agreed here, once per round).
        """
        args = self.args
        lengths = rollout.row_lengths()
        order = torch.randperm(len(rollout), generator=self._shuffle)
        steps = plan_steps(order, lengths, args.per_device_train_batch_size, args.gradient_accumulation_steps,
                           args.num_iterations, args.max_tokens_per_micro_batch, group_size=args.num_generations)
        return split_to_counts(steps, self.processes.max_each([len(s) for s in steps]), lengths)

    def _generate_round(self, rows: list[dict[str, Any]], rounds: Iterator[Any]) -> tuple[Rollout, dict, int]:
        """A round; with DAPO dynamic sampling (arXiv 2503.14476) groups with all-equal rewards (no signal) are
        replaced from at most max_dynamic_sampling_rounds extra generations, then topped up with dropped groups so
        the round keeps its size. Returns (rollout, metrics of the first generation, extra generations)."""
        rollout, metrics = self.generate_and_score(rows)
        args, g = self.args, self.args.num_generations
        if not args.dynamic_sampling:
            return rollout, metrics, 0
        kept, dropped, extra = [], [], 0
        while True:
            flat = all_equal_groups(combine_rewards(rollout.rewards_per_func, self.reward_weights), g)
            for pile, rows_in in ((kept, ~flat), (dropped, flat)):
                if rows_in.any():
                    pile.append(rollout.select(torch.nonzero(rows_in.repeat_interleave(g)).flatten()))
            if sum(map(len, kept)) >= args.generation_batch_size or extra == args.max_dynamic_sampling_rounds:
                break
            rollout, _ = self.generate_and_score(next(rounds)[1])
            extra += 1
        rollout = Rollout.concat(kept + dropped, self.processing_class.pad_token_id or 0)
        rollout = rollout.select(torch.arange(args.generation_batch_size))
        metrics.update({"dynamic_sampling/dropped_groups": sum(map(len, dropped)) / g,
                        "dynamic_sampling/extra_rounds": float(extra)})
        return rollout, metrics, extra

    @torch.no_grad()
    def generate_and_score(self, rows: list[dict[str, Any]], num_generations: int | None = None,
                           for_loss: bool = True) -> tuple[Rollout, dict[str, float]]:
        """Sample G completions per prompt, score them, and compute advantages and (`for_loss`) the old and
        reference log-probs the loss needs."""
        args, g = self.args, num_generations or self.args.num_generations
        self.model.eval()
        with distributed.full_weights(self.policy_logps), self._autocast(generation=True):
            # one turn each, or turns with tools, or a rollout_func: whichever grpo.rollout.rounds chose
            episodes = self.round_source.generate(self._unwrapped_model(), rows, g)
        generation, repeated_prompts, completions = episodes.generation, episodes.prompts, episodes.completions
        columns = {} if args.remove_unused_columns else {
            name: [row[name] for row in rows for _ in range(g)] for name in rows[0] if name != "prompt"
        }
        columns.update(episodes.reward_kwargs)  # environments, a rollout_func's extra keys
        completion_ids = [ids[mask.bool()].tolist() for ids, mask in
                          zip(generation.completion_ids, generation.completion_mask)]
        rewards_per_func, reward_errors = self.reward_runner.score(repeated_prompts, completions, completion_ids,
                                                                   columns, trainer_state=self.state, group_size=g)
        logged_metrics, logged_extra = self.reward_runner.take_logs(len(completions))  # log_metric / log_extra
        # A training round is global: advantages and metrics see every process's rows, as one process would.
        spread = self.processes if for_loss else Processes.alone()
        all_rewards_per_func = spread.gather(rewards_per_func)
        rewards = combine_rewards(all_rewards_per_func, self.reward_weights)
        advantages, group_std = MULTI_OBJECTIVE_AGGREGATIONS[args.multi_objective_aggregation](
            all_rewards_per_func, self.reward_weights, g, args.scale_rewards)
        rollout = Rollout(
            prompt_ids=generation.prompt_ids, prompt_mask=generation.prompt_mask,
            completion_ids=generation.completion_ids, completion_mask=generation.completion_mask,
            is_eos=generation.is_eos, advantages=spread.own_rows(advantages), rewards_per_func=rewards_per_func,
            tool_mask=generation.tool_mask, sampled_entropy=generation.entropies, prompts=repeated_prompts,
            completions=completions, extra=logged_extra,
        )
        chunk = args.per_device_train_batch_size
        with distributed.full_weights(self.policy_logps), self._autocast():
            if args.needs_old_logps and for_loss:  # the policy moves within the round, so pi_old must be remembered
                rollout.old_logps = self._as_the_policys(generation.logps)  # as sampled: no forward
                if rollout.old_logps is None:
                    rollout.old_logps = completion_logps_in_chunks(self._unwrapped_model(), rollout, args.temperature,
                                                                   chunk, rows=self._rows_the_loss_reads(rollout))
            if args.beta > 0 and for_loss:
                with self._reference_model() as ref:
                    rollout.ref_logps = completion_logps_in_chunks(ref, rollout, args.temperature, chunk)
        model_tokens = generation.model_token_mask()  # lengths and token counts leave tool turns out, as in TRL
        if for_loss:  # num_tokens counts training tokens only
            tokens = spread.sum({"tokens": float(generation.prompt_mask.sum() + model_tokens.sum())})
            self.state.num_input_tokens_seen += int(tokens["tokens"])
        lengths = spread.gather(model_tokens.sum(1).float())
        metrics = round_metrics([r.name for r in self.reward_funcs], all_rewards_per_func, rewards, group_std,
                                lengths, spread.gather(rollout.is_eos.long()).bool())
        metrics.update(spread.sum(reward_errors) if reward_errors else {})  # reward_error="none": failed rows
        if episodes.tool_counts is not None:  # tools ran: TRL's tools/ metrics, and grpo's per tool
            metrics.update(tool_metrics(spread.sum(episodes.tool_counts), len(lengths)))
        metrics.update(logged_metrics)  # this process's calls (TRL averages over processes; the main one writes)
        return rollout, {"num_tokens": float(self.state.num_input_tokens_seen), **metrics}
