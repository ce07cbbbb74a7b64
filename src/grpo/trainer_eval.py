"""The trainer's evaluation: `evaluate()` as in transformers, with TRL's metric names.

`Evaluation` is a part of `GRPOTrainer` (it reads the trainer's model, generator and reward functions); the
evaluation itself (batches of prompts, mean reward, pass@k) is `grpo.evaluate`'s.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch

from grpo import distributed
from grpo.algorithm import StepCounts, micro_batch_loss
from grpo.callbacks import update_best_metric
from grpo.data import PromptSource
from grpo.evaluate import evaluate, trainer_metrics
from grpo.logprobs import PolicyLogps, completion_logps
from grpo.rollout import Rollout


class Evaluation:
    """Evaluation, as methods of `GRPOTrainer`."""

    def evaluate(self, eval_dataset: Any = None, ignore_keys: Any = None, metric_key_prefix: str = "eval"
                 ) -> dict[str, Any]:
        """Sample num_generations_eval completions of each eval prompt with the current policy and score them.
        Returns and logs TRL's metrics with the `metric_key_prefix` ("eval_loss", "eval_reward",
        "eval_rewards/<func>/mean", "eval_completions/...", "eval_runtime", ...) and grpo's "eval_pass@1"
        (weighted reward >= 1), then calls the callbacks' on_evaluate. The main process generates; every process
        gets the metrics."""
        args = self.args
        source = self.eval_source if eval_dataset is None else PromptSource(eval_dataset, "eval_dataset")
        if source is None:
            raise ValueError("evaluate() needs an eval_dataset: pass one to GRPOTrainer or to evaluate().")
        args.check_evaluation_batch()
        if eval_dataset is None and self._eval_rows is None:
            self._eval_rows = list(source.dataset)  # read once, at the first evaluation
        rows = self._eval_rows if eval_dataset is None else list(source.dataset)
        started, g, metrics = time.perf_counter(), args.num_generations_eval, None
        with contextlib.ExitStack() as gathered:  # FSDP: every process gathers, then the main one evaluates
            gathered.enter_context(distributed.full_weights(self.policy_logps))
            if args.beta > 0 and self.ref_model is not None:  # the eval loss's KL runs the reference on main only
                gathered.enter_context(distributed.full_weights(self.ref_model))
            if self.processes.is_main:
                results = evaluate(self._score_for_evaluation, rows, ks=[1], pass_threshold=1.0, num_generations=g,
                                   reward_names=[r.name for r in self.reward_funcs],
                                   reward_weights=self.reward_weights,
                                   prompts_per_batch=args.per_device_eval_batch_size // g)
                metrics = trainer_metrics(results, metric_key_prefix, time.perf_counter() - started, self.state.epoch)
        metrics = self.processes.broadcast(metrics)
        self._log(dict(metrics, step=self.state.global_step))
        self.callbacks.event("on_evaluate", self.state, metrics=metrics)
        return metrics

    def _evaluate_during_training(self) -> None:
        """An evaluation the schedule (or a callback) asked for; with metric_for_best_model it ranks the step."""
        metrics = self.evaluate()
        update_best_metric(self.state, self.args, metrics)

    def _score_for_evaluation(self, rows: list[dict[str, Any]], g: int) -> tuple[Rollout, dict[str, float]]:
        """An evaluation batch: generated and scored as in training, plus TRL's eval loss and its statistics."""
        rollout, metrics = self.generate_and_score(rows, g, for_loss=False)
        metrics |= self._evaluation_loss(rollout)
        self.callbacks.event("on_prediction_step", self.state)  # one per eval batch, as transformers' loop
        return rollout, metrics

    @torch.no_grad()
    def _evaluation_loss(self, rollout: Rollout) -> dict[str, float]:
        """The loss of an evaluation batch under the current policy, on-policy (w = 1) and without gradient, with
        the step metrics training logs (entropy, clip ratios, kl), counted over the batch."""
        args, settings, model = self.args, self._loss_settings(), self._unwrapped_model()
        mask = self._loss_mask(rollout).to(self.device)
        counts = StepCounts(len(rollout), int(mask.sum()), args.max_completion_length)
        inputs = (rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask)
        model.eval()
        with self._autocast():
            logps, entropy, aux_loss = PolicyLogps(model, self.router_aux_loss_coef != 0)(
                *inputs, args.temperature, with_entropy=True)
            ref_logps = None
            if args.beta > 0:
                with self._reference_model() as ref:
                    ref_logps, _ = completion_logps(ref, *inputs, args.temperature)
        _, stats = micro_batch_loss(logps, entropy, None, ref_logps, rollout.advantages.to(self.device), mask, counts,
                                    settings, aux_loss=aux_loss)
        return {"loss": stats.loss} | stats.step_metrics(counts, settings)
