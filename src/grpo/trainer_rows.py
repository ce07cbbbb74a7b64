"""What an optimizer step trains: the tokens in the loss, the entropy quantile's tokens, and the rows left out
because their loss is exactly 0.

`StepRows` is a part of `GRPOTrainer` (it reads the trainer's model, config and processes), kept in a file of its
own so that trainer.py reads as the loop; `training_step` calls these before its micro-batches run.
"""

from __future__ import annotations

import torch

from grpo import zero
from grpo.algorithm import LossSettings, LossStats, entropy_threshold
from grpo.batching import cut_micro_batches, even_passes, split_silent
from grpo.fused_ops import fused_ops
from grpo.logprobs import completion_logps
from grpo.lora_ops import lora_linears
from grpo.models import base_model
from grpo.packing import grouped_attention
from grpo.rollout import Rollout


class StepRows:
    """The rows and tokens of a step, as methods of `GRPOTrainer`."""

    def _loss_mask(self, batch: Rollout) -> torch.Tensor:
        """The completion mask, less tool turns' tokens, less truncated completions when mask_truncated_completions
        (DAPO overlong filtering). Attention still sees their tokens; only the loss and its normaliser leave them
        out."""
        mask = batch.completion_mask.float()
        if batch.tool_mask is not None:  # tool results are part of what the policy sees, not of what it did
            mask = mask * batch.tool_mask.float()
        return mask * batch.is_eos.unsqueeze(1).float() if self.args.mask_truncated_completions else mask

    @torch.no_grad()
    def _high_entropy_masks(self, rollout: Rollout, micro_batches: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per micro-batch, tokens whose entropy is >= the (1 - rho) quantile over the whole optimizer step (TRL:
        per micro-batch), which keeps the update independent of the split. The entropies are the sampler's on a
        round's first step where they are the policy's (`_as_the_policys`), else a no-grad forward's."""
        entropies, masks, rho = [], [], self.args.top_entropy_quantile
        sampled = self._as_the_policys(rollout.sampled_entropy)
        for rows in micro_batches:
            batch = rollout.select(rows)
            if sampled is not None:
                entropy = batch.sampled_entropy
            else:
                with self._autocast():
                    _, entropy = completion_logps(self.model, batch.prompt_ids, batch.prompt_mask,
                                                  batch.completion_ids, batch.completion_mask, self.args.temperature,
                                                  with_entropy=True)
            entropies.append(entropy.float())
            masks.append(self._loss_mask(batch).to(entropy.device).bool())
        threshold = entropy_threshold(torch.cat([e[m] for e, m in zip(entropies, masks)]), rho)
        return [(e >= threshold).float() for e in entropies]

    def _skips_silent_rows(self, settings: LossSettings) -> bool:
        """skip_zero_advantage_rows where it is exact: nothing in the loss but A reads a row (no entropy quantile
        either, whose threshold every row's entropy moves); not under DeepSpeed, which counts its micro-steps to
        know where an optimizer step ends."""
        return (self.args.skip_zero_advantage_rows and settings.zero_advantage_is_silent
                and self.args.top_entropy_quantile == 1 and not zero.is_engine(self.policy_logps))

    @staticmethod
    def _silent(rollout: Rollout, loss_tokens: torch.Tensor) -> torch.Tensor:
        """(N,) bool: rows whose loss is exactly 0, given `_skips_silent_rows`: advantage 0, or no loss token
        (`loss_tokens`: each row's count in `_loss_mask`)."""
        return (rollout.advantages == 0) | (loss_tokens == 0)

    def _rows_the_loss_reads(self, rollout: Rollout) -> torch.Tensor | None:
        """The rows whose old log-probs a round's steps will read: None (all) unless silent rows are skipped."""
        if not self._skips_silent_rows(self._loss_settings()):
            return None
        return torch.nonzero(~self._silent(rollout, self._loss_mask(rollout).sum(1))).flatten()

    def _as_the_policys(self, measured: torch.Tensor | None) -> torch.Tensor | None:
        """What the sampler measured per token (`Generation.logps`, `.entropies`), where it is what a forward of the
        policy at the weights that sampled would give, else None: float32 both in sampling and in training (no
        bf16 autocast, float32 parameters), and measured on every process (else every process runs the forward,
        which may communicate). It equals a forward's to float32 rounding (other kernels)."""
        usable = measured is not None and not self.use_bf16 and next(self.model.parameters()).dtype == torch.float32
        if self.processes.count > 1:
            usable = not self.processes.max_each([int(not usable)])[0]
        return measured if usable else None

    @torch.no_grad()
    def _without_silent_rows(self, rollout: Rollout, micro_batches: list[torch.Tensor]
                             ) -> tuple[list[torch.Tensor], LossStats]:
        """The step's micro-batches without the rows whose loss is exactly 0 (advantage 0, or no token in the loss),
        cut again (`batching.split_silent`), and what those rows add to the step's statistics without a backward:
        the entropy of those with loss tokens, as the sampler measured it (`_as_the_policys`) or else from a
        no-grad forward, and a per-sequence clip fraction of 0 (`LossSettings.zero_advantage_is_silent`)."""
        args, loss_mask, processes = self.args, self._loss_mask(rollout), self.processes
        loss_tokens = loss_mask.sum(1)
        lengths = rollout.row_lengths()  # as the plan cut them (`_optimizer_steps`)
        heard, silent = split_silent(micro_batches, self._silent(rollout, loss_tokens), lengths,
                                     args.per_device_train_batch_size, args.max_tokens_per_micro_batch)
        if processes.count > 1:  # each pass of a sharded or DDP model communicates: all run as many as the most
            heard, silent = even_passes(heard, processes.max_each([len(heard)])[0], lengths, silent)
        with_tokens = silent[loss_tokens[silent] > 0]
        # while the weights are those that sampled (`training_step` drops the entropies once they move)
        if (sampled := self._as_the_policys(rollout.sampled_entropy)) is not None:  # no forward
            entropy = float((sampled[with_tokens] * loss_mask[with_tokens]).sum())
            return heard, LossStats(entropy=entropy, low_clipped_min=0.0) if len(silent) else LossStats()
        measured = cut_micro_batches(with_tokens, lengths, args.per_device_train_batch_size,
                                     args.max_tokens_per_micro_batch)
        counted = len(measured)  # passes beyond these only keep step with the other processes
        if processes.count > 1:
            measured, _ = even_passes(measured, processes.max_each([len(measured)])[0], lengths,
                                      torch.cat(micro_batches))
        entropy_sum, body = 0.0, base_model(self.model)
        for i, rows in enumerate(measured):
            batch = rollout.select(rows)
            with grouped_attention(body), fused_ops(body), lora_linears(body), self._autocast():
                _, entropy, _ = self.policy_logps(batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                                  batch.completion_mask, args.temperature, with_entropy=True)
            entropy_sum += float((entropy * self._loss_mask(batch).to(entropy.device)).sum()) if i < counted else 0.0
        return heard, LossStats(entropy=entropy_sum, low_clipped_min=0.0) if len(silent) else LossStats()
