"""GRPOTrainer: the loop. Generate a round, score it, then take optimizer steps on it.

Read `train` for the outer loop, `generate_and_score` for one generation round, and `training_step` for one
optimizer step; the math they call lives in `grpo.algorithm`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from transformers import PreTrainedModel, enable_full_determinism, set_seed
from transformers.trainer_utils import TrainOutput

from grpo import distributed, zero
from grpo.algorithm import (
    LossSettings,
    LossStats,
    ObjectiveParams,
    StepCounts,
    adaptive_entropy_coef,
    applied_entropy_coef,
    micro_batch_loss,
    mix_into,
)
from grpo.allocator import keep_freed_memory
from grpo.callbacks import Callbacks
from grpo.checkpoint import (
    TrainingObjects,
    check_resumable,
    checkpoints,
    load_checkpoint,
    load_weights,
    model_signature,
    prepare_output_dir,
    save_checkpoint,
)
from grpo.config import GRPOConfig
from grpo.data import PromptSource, check_prompt_lengths, context_length
from grpo.distributed import Processes, accelerator_kwargs, check_distributed_support
from grpo.fused_ops import fused_ops
from grpo.guard import NonFiniteGuard, is_finite_step
from grpo.logprobs import PolicyLogps
from grpo.lora_ops import lora_linears
from grpo.metrics import ProgressBar, RunLog, run_summary
from grpo.models import (
    base_model,
    choose_gradient_checkpointing,
    enable_gradient_checkpointing,
    free_memory_bytes,
    lm_body_and_head,
    load_tokenizer,
    prepare_policy,
    prepare_reference,
    router_aux_loss_coef,
)
from grpo.optim import create_optimizer, create_scheduler
from grpo.packing import grouped_attention
from grpo.recompute import recompute_where_memory_needs
from grpo.rewards import RewardRunner, prepare_reward_funcs
from grpo.rollout import Generator, Rollout, RolloutSpec, default_generator, set_chat_template
from grpo.run_state import EntropyControl, RunPosition, TrainerState
from grpo.trainer_eval import Evaluation
from grpo.trainer_rounds import GenerationRounds
from grpo.trainer_rows import StepRows


class GRPOTrainer(GenerationRounds, Evaluation, StepRows):
    """Trains a causal LM with GRPO. The arguments and their meanings follow TRL's `GRPOTrainer`. One generation
    round (`generate_and_score`) is in trainer_rounds.py, `evaluate` in trainer_eval.py, what a step trains (the
    loss mask, the entropy quantile, rows left out) in trainer_rows.py."""

    def __init__(
        self,
        model: str | PreTrainedModel,
        reward_funcs: Any = None,
        args: GRPOConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        reward_processing_classes: Any = None,
        callbacks: list[Any] | None = None,
        optimizers: tuple[Any, Any] = (None, None),
        quantization_config: Any = None,
        peft_config: Any = None,
        tools: list[Callable[..., Any]] | None = None,
        rollout_func: Callable[..., dict[str, Any]] | None = None,
        environment_factory: Any = None,
        generator: Generator | None = None,
    ):
        self.args = args = args if args is not None else GRPOConfig()
        # Everything that can be checked cheaply is checked before a model is loaded.
        if train_dataset is None:
            raise ValueError("GRPOTrainer needs a train_dataset with a 'prompt' column.")
        self.train_source = PromptSource(train_dataset)
        self.eval_source = PromptSource(eval_dataset, "eval_dataset") if eval_dataset is not None else None
        self._eval_rows: list[dict[str, Any]] | None = None  # read once, at the first evaluation
        if args.eval_strategy != "no" and self.eval_source is None:
            raise ValueError(f"GRPOConfig.eval_strategy={args.eval_strategy!r} needs an eval_dataset.")
        if args.eval_strategy != "no":
            args.check_evaluation_batch()
        model_init_kwargs = args.model_init_kwargs  # as in TRL, a quantization_config goes to from_pretrained
        if quantization_config is not None:
            model_init_kwargs = {**(model_init_kwargs or {}), "quantization_config": quantization_config}
        if self.train_source.is_iterable and args.max_steps <= 0:
            raise ValueError("train_dataset is an IterableDataset, which has no length: set GRPOConfig.max_steps.")
        if not self.train_source.is_iterable and len(self.train_source) < args.prompts_per_generation:
            raise ValueError(
                f"train_dataset has {len(self.train_source)} prompts but one generation round needs "
                f"{args.prompts_per_generation} unique prompts (generation_batch_size {args.generation_batch_size} / "
                f"num_generations {args.num_generations}). Add prompts or lower the batch size."
            )
        # tools, environments or a rollout_func (docs/tools.md), checked before a model loads; environments with a
        # get_reward() add a reward function each (weight 1, after the run's own), as in TRL
        own_rollout = None if rollout_func is None else (lambda prompts: rollout_func(prompts, self))  # TRL's call
        self.rollout_spec = RolloutSpec(tools, environment_factory, own_rollout, self.train_source)
        environment_rewards = self.rollout_spec.reward_functions()
        self.reward_funcs = prepare_reward_funcs(reward_funcs, reward_processing_classes, args.model_init_kwargs,
                                                 environment_rewards)
        self.reward_runner = RewardRunner.from_config(self.reward_funcs, args)  # worker processes start here
        own_funcs = len(self.reward_funcs) - len(environment_rewards)
        weights = args.reward_weights if args.reward_weights is not None else [1.0] * own_funcs
        if len(weights) != own_funcs:
            raise ValueError(
                f"GRPOConfig.reward_weights has {len(weights)} weights for {own_funcs} reward "
                "functions; give one weight per function."
            )
        self.reward_weights = torch.tensor([*weights, *[1.0] * len(environment_rewards)], dtype=torch.float32)
        if args.use_vllm:
            raise NotImplementedError("use_vllm=True: the vLLM backend is not implemented yet; set use_vllm=False.")

        self.accelerator = Accelerator(**accelerator_kwargs(args))
        distributed.enable_fsdp_on_cpu(self.accelerator)  # Accelerate itself turns FSDP on for GPUs only
        self.processes = Processes(self.accelerator)
        distributed.destroy_process_group_at_exit()  # gloo can abort a finished run's exit otherwise
        check_distributed_support(self.accelerator, args, peft=peft_config is not None)
        self.device = self.accelerator.device
        enable_full_determinism(args.seed) if args.full_determinism else set_seed(args.seed)
        if args.tf32 is not None and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
        model_source = model
        self.processing_class = load_tokenizer(model, processing_class, model_init_kwargs)
        if args.chat_template_path is not None:
            set_chat_template(self.processing_class, args.chat_template_path)
        if self.train_source.conversational and not getattr(self.processing_class, "chat_template", None):
            raise ValueError(
                "train_dataset has conversational prompts (lists of messages) but the tokenizer has no chat "
                "template. Set tokenizer.chat_template, or give prompts as plain strings."
            )
        self.rollout_spec.check_template(self.processing_class, args, self.train_source.conversational)
        self.model = prepare_policy(model, args, peft_config, model_init_kwargs).to(self.device)
        self.router_aux_loss_coef = router_aux_loss_coef(self.model, args.router_aux_loss_coef)  # 0: no MoE loss
        self.policy_logps = PolicyLogps(self.model, self.router_aux_loss_coef != 0,  # the training forward
                                        grads_in_place=self.processes.count == 1)
        if self.processes.count > 1 and distributed.engine(self.accelerator) not in distributed.WRAPPED_IN_TRAIN:
            self.policy_logps = self.accelerator.prepare_model(self.policy_logps)
        self.ref_model = None
        if args.sync_ref_model and peft_config is not None:
            raise ValueError("sync_ref_model=True needs a separate reference model; with PEFT the reference is the "
                             "base model with the adapter off, which is not updated. Set sync_ref_model=False.")
        if args.beta > 0 and peft_config is None:  # with PEFT the reference is the model with the adapter off
            self.ref_model = prepare_reference(self._unwrapped_model(), model_source, args,
                                               model_init_kwargs).to(self.device)
        self.use_bf16 = args.bf16 if args.bf16 is not None else (
            self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        )
        self.generator = generator or default_generator(self.processing_class, args, self.processes.rank)
        self.round_source = self.rollout_spec.round_source(self.generator, self.processing_class, args,
                                                           context_length(self._unwrapped_model().config))
        self.state = TrainerState()
        self.optimizer, self.lr_scheduler = optimizers  # as in transformers: (None, None) builds AdamW + schedule
        self._shuffle = torch.Generator().manual_seed(args.seed)
        self.entropy_control = EntropyControl(args.entropy_coef)
        self.log: RunLog | None = None  # during train()
        self.callbacks = Callbacks(callbacks, args, self._unwrapped_model(), self.processing_class)
        self.callbacks.event("on_init_end", self.state)

    # ---- callbacks, as transformers' Trainer offers them ---------------------------------------------------
    def add_callback(self, callback: Any) -> None:
        self.callbacks.handler.add_callback(callback)

    def pop_callback(self, callback: Any) -> Any:
        return self.callbacks.handler.pop_callback(callback)

    def remove_callback(self, callback: Any) -> None:
        self.callbacks.handler.remove_callback(callback)

    # ---- the outer loop ------------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None,
              ignore_keys_for_eval: Any = None) -> TrainOutput:
        """Run to max_steps (or num_train_epochs). `resume_from_checkpoint`: True for the latest checkpoint in
        output_dir, or a checkpoint path; the run then continues exactly as if it had never stopped. Returns
        transformers' TrainOutput(global_step, training_loss, metrics); log_history ends with the same summary."""
        args = self.args
        if trial is not None:
            raise NotImplementedError("train(trial=...): hyperparameter search is not supported; run one config.")
        resume = resume_from_checkpoint if resume_from_checkpoint is not None else args.resume_from_checkpoint
        # Every check comes before anything is written or generated.
        config = self.resolved_config()
        checkpoint = prepare_output_dir(args.output_dir, resume, args.overwrite_output_dir, config,
                                        delete=self.processes.is_main)
        self.processes.wait()  # every process has seen output_dir before the main one writes to it
        if checkpoint is not None:
            check_resumable(checkpoint, config, model_signature(self._unwrapped_model()), self.processes.count)
        longest_prompt = check_prompt_lengths(self.train_source, self.processing_class, self._unwrapped_model().config,
                                              args.max_completion_length,
                                              self.rollout_spec.template_kwargs(args.chat_template_kwargs))
        checkpointing = self._choose_gradient_checkpointing(longest_prompt)  # before FSDP shards the model
        self.state = self._new_state()
        self._create_optimizer_and_scheduler(self.state.max_steps)
        self.callbacks.set_optimizer(self.optimizer, self.lr_scheduler)
        self.policy_logps = distributed.shard_policy(self.accelerator, self.policy_logps, self.optimizer)  # FSDP only
        position, window_values = RunPosition(), {}
        if checkpoint is not None:
            position, window_values = load_checkpoint(checkpoint, self._training_objects(), self.state,
                                                      self.processes)
            self.callbacks.restore(self.state)
        run_dir, resolved = self._prepare_run_dir()
        main = self.processes.is_main  # only the main process writes and prints
        self.log = log = RunLog(run_dir, args, resolved, self.state.log_history, self.state.global_step, main,
                                on_write=self._on_log)
        log.window.values.update(window_values)
        if checkpoint is not None:
            log.say(f"grpo: resuming from {checkpoint} at step {self.state.global_step}")
        if checkpointing:
            log.say(checkpointing)
        log.say(
            f"grpo: {self.state.max_steps} optimizer steps, {args.generation_batch_size} completions per round "
            f"({args.prompts_per_generation} prompts x {args.num_generations}), run directory {run_dir}"
        )
        if not args.needs_old_logps and args.beta == 0:
            log.say("grpo: training on-policy, so the logged loss stays near 0 by construction (the policy ratio is "
                    "exactly 1); its gradient is not 0. Watch `reward` to see learning.")
        bar = ProgressBar(self.state.max_steps, disable=args.disable_tqdm or not main, initial=self.state.global_step)
        started, first_step = time.perf_counter(), self.state.global_step
        try:
            self.callbacks.event("on_train_begin", self.state)
            if args.eval_on_start and checkpoint is None:
                self._evaluate_during_training()
            with keep_freed_memory(args.cpu_keep_freed_memory and self.device.type == "cpu"):
                self._run_steps(position, config, bar)
        finally:
            bar.close()
            log.close()
            self.log = None
        # transformers' run summary ends log_history (metrics.jsonl keeps to the steps and evaluations)
        per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * self.processes.count
        summary = run_summary(time.perf_counter() - started, self.state.global_step - first_step, per_step,
                              position.loss_sum / max(self.state.global_step, 1), self.state.epoch,
                              self.state.total_flos)
        self._log(dict(summary, step=self.state.global_step))
        if args.load_best_model_at_end and self.state.best_model_checkpoint is not None:
            log.say(f"grpo: loading the best model, {self.state.best_model_checkpoint} ({args.metric_for_best_model} "
                    f"{self.state.best_metric})")
            with distributed.full_weights(self.policy_logps):
                load_weights(self._unwrapped_model(), Path(self.state.best_model_checkpoint))
        self.save_model()
        self.callbacks.event("on_train_end", self.state)
        # transformers' progress and printer callbacks pop total_flos from the summary they log, which is the dict
        # train() returns: its metrics never hold it, though log_history does
        metrics = {k: v for k, v in summary.items() if k != "total_flos"}
        return TrainOutput(self.state.global_step, summary["train_loss"], metrics)

    def _run_steps(self, position: RunPosition, config: dict[str, Any], bar: ProgressBar) -> None:
        """Optimizer steps until max_steps or a callback stops the run; the callbacks' TrainerControl decides
        when to log, evaluate and save (transformers' DefaultFlowCallback: every logging_steps, eval_steps,
        save_steps, and at the end), and the last step is always logged."""
        args, log, callbacks = self.args, self.log, self.callbacks
        rounds = self.train_source.rounds(args.prompts_per_generation, args.seed, args.shuffle_dataset,
                                          skip=position.rounds_consumed)
        rounds_per_epoch = 0 if self.train_source.is_iterable else len(self.train_source) // args.prompts_per_generation
        guard = NonFiniteGuard(args.max_consecutive_nonfinite_steps)
        step_started, round_tokens, epoch_index = time.perf_counter(), 0, None
        control = callbacks.event("on_epoch_begin", self.state)
        while self.state.global_step < self.state.max_steps and not control.should_training_stop:
            if position.round_done:
                epoch, rows = next(rounds)  # epoch counts passes over an IterableDataset too
                if epoch_index is not None and epoch != epoch_index:
                    callbacks.event("on_epoch_end", self.state)
                    callbacks.event("on_epoch_begin", self.state)
                epoch_index = epoch
                rollout, generated, extra_rounds = self._generate_round(self.processes.shard(rows), rounds)
                position.rounds_consumed += 1 + extra_rounds
                position.rollout, position.plan = rollout, self._optimizer_steps(rollout)
                position.next_step = 0
                position.round_reward = generated["reward"]
                log.window.add(generated)
                round_tokens = int(rollout.completion_mask.sum())
            callbacks.event("on_step_begin", self.state)
            step_metrics = self.training_step(position.rollout, position.plan[position.next_step])
            position.next_step += 1
            position.loss_sum += step_metrics["loss"] if is_finite_step(step_metrics) else 0.0
            step_metrics["step_time"] = time.perf_counter() - step_started
            step_started = time.perf_counter()
            log.window.add(step_metrics)
            self.state.global_step += 1
            step = self.state.global_step
            guard.record(step, is_finite_step(step_metrics), self._last_checkpoint_message)
            if args.sync_ref_model and step % args.ref_model_sync_steps == 0:
                self._sync_ref_model()
            self.state.epoch = position.epoch = self._epoch(position, rounds_per_epoch)
            bar.update(position.round_reward, round_tokens)
            round_tokens = 0  # a round's tokens count once, however many steps it feeds
            if args.torch_empty_cache_steps and step % args.torch_empty_cache_steps == 0:
                distributed.empty_cache(self.device)
            control = callbacks.event("on_step_end", self.state)
            last = step >= self.state.max_steps or control.should_training_stop
            if args.logging_strategy == "steps" and (control.should_log or last):
                log.flush(step, self.state.epoch, position.rollout, [r.name for r in self.reward_funcs])
            if control.should_evaluate:
                self._evaluate_during_training()
            if (control.should_save or (last and args.save_strategy == "steps")) and guard.healthy:
                self._save_checkpoint(position, config)
        callbacks.event("on_epoch_end", self.state)

    def _epoch(self, position: RunPosition, rounds_per_epoch: int) -> float:
        """transformers' epoch, which grows with every optimizer step: rounds done, the current one by the share of
        its steps taken, over the rounds of an epoch. An IterableDataset's length is unknown: the share of max_steps
        done, as transformers counts it."""
        if not rounds_per_epoch:
            return self.state.global_step / self.state.max_steps
        left = 1 - position.next_step / len(position.plan)
        return (position.rounds_consumed - left) / rounds_per_epoch

    def _last_checkpoint_message(self) -> str:
        found = checkpoints(self.args.output_dir)
        return f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was written yet"

    # ---- one optimizer step --------------------------------------------------------------------------------
    def training_step(self, rollout: Rollout, micro_batches: list[torch.Tensor]) -> dict[str, float]:
        """One optimizer step over the given micro-batches of a round, gradient accumulated across them.

        The loss normaliser counts the whole step (`StepCounts`), and so does the entropy quantile, so the update
        does not depend on how the step's rows are split into micro-batches.
        """
        args = self.args
        step_rows, processes = torch.cat(micro_batches), self.processes
        local_tokens = float(self._loss_mask(rollout.select(step_rows)).sum())
        counts = StepCounts(  # the whole global step: every process's rows
            num_sequences=len(step_rows) * processes.count,
            num_tokens=int(processes.sum({"tokens": local_tokens})["tokens"]),
            max_completion_length=args.max_completion_length,
        )
        settings = self._loss_settings()
        entropy_masks = self._high_entropy_masks(rollout, micro_batches) if args.top_entropy_quantile < 1 else None
        totals = LossStats()
        if self._skips_silent_rows(settings):  # rows whose loss is 0: the same update without them
            micro_batches, totals = self._without_silent_rows(rollout, micro_batches)
        self.policy_logps.train()  # the model and any DDP wrapper around it
        body = base_model(self.model)
        for i, rows in enumerate(micro_batches):
            batch = rollout.select(rows)
            # packed attention by the layout, fused element-wise kernels and LoRA linears, also where gradient
            # checkpointing recomputes layers in the backward; recomputation only where memory needs it
            with grouped_attention(body), fused_ops(body), lora_linears(body), self._recompute_scope():
                with self._autocast():
                    logps, entropy, aux_loss = self.policy_logps(
                        batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask,
                        args.temperature, with_entropy=True, entropy_grad=settings.entropy_bonus)
                loss, stats = micro_batch_loss(
                    logps, entropy, self._on_device(batch.old_logps), self._on_device(batch.ref_logps),
                    batch.advantages.to(self.device), self._loss_mask(batch).to(self.device), counts, settings,
                    entropy_mask=None if entropy_masks is None else entropy_masks[i].to(self.device),
                    aux_loss=aux_loss,
                )
                # DDP averages gradients over processes; the step's loss is their sum
                last = i == len(micro_batches) - 1
                self._backward(loss * processes.count, last=last)
            if not last:
                self.callbacks.event("on_substep_end", self.state)
            totals += stats
        if not micro_batches:  # every row silent: the optimizer steps on the zero gradient it would have computed
            for p in self.model.parameters():
                if p.requires_grad:
                    p.grad = torch.zeros_like(p)
        totals = self._summed_over_processes(totals)
        metrics = {"loss": totals.loss, "grad_norm": self._optimizer_step(totals.loss),
                   "learning_rate": self.lr_scheduler.get_last_lr()[0]}  # the rate this step used, as TRL logs
        rollout.sampled_entropy = None  # the weights moved: the sampler's entropies are no longer theirs
        self.lr_scheduler.step()  # the schedule follows global_step, skipped steps included
        metrics |= totals.step_metrics(counts, settings)
        if settings.entropy_bonus:
            metrics["entropy_coef"] = self._next_entropy_coef(metrics["entropy"])
        return metrics

    def _loss_settings(self) -> LossSettings:
        """What the loss reads from the config, with this step's entropy coefficient (use_adaptive_entropy: the
        controller's, applied only while the last step's entropy was at or below entropy_target)."""
        args, control = self.args, self.entropy_control
        coef = (applied_entropy_coef(control.coef, control.last_entropy, args.entropy_target)
                if args.use_adaptive_entropy else args.entropy_coef)
        params = ObjectiveParams(args.epsilon, args.epsilon_high, args.delta, args.sapo_temperature_pos,
                                 args.sapo_temperature_neg, args.vespo_k_pos, args.vespo_lambda_pos, args.vespo_k_neg,
                                 args.vespo_lambda_neg)
        return LossSettings(args.loss_type, args.importance_sampling_level, params, beta=args.beta,
                            entropy_coef=coef, entropy_bonus=args.entropy_coef > 0 or args.use_adaptive_entropy,
                            bias_correction_kl=args.use_bias_correction_kl,
                            off_policy_mask_threshold=args.off_policy_mask_threshold,
                            router_aux_loss_coef=self.router_aux_loss_coef)

    def _next_entropy_coef(self, step_entropy: float) -> float:
        """The entropy coefficient after this step (TRL logs it as `entropy_coef`); the adaptive controller moves
        it by the step's mean entropy."""
        args, control = self.args, self.entropy_control
        if args.use_adaptive_entropy:
            control.coef = adaptive_entropy_coef(control.coef, step_entropy, args.entropy_target,
                                                 args.entropy_coef_delta, args.entropy_coef_min, args.entropy_coef_max)
            control.last_entropy = step_entropy
        return control.coef if args.use_adaptive_entropy else args.entropy_coef

    def _summed_over_processes(self, totals: LossStats) -> LossStats:
        """A step's statistics over every process: sums, and the per-sequence extremes' min and max."""
        sums = {k: v for k, v in dataclasses.asdict(totals).items() if k not in LossStats.EXTREMES}
        neg_low_min, high_max = self.processes.max_each([-totals.low_clipped_min, totals.high_clipped_max])
        return LossStats(**self.processes.sum(sums), low_clipped_min=-neg_low_min, high_clipped_max=high_max)

    def _on_device(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.to(self.device)

    def _sync_ref_model(self) -> None:
        """TR-DPO: ref <- alpha x policy + (1 - alpha) x ref, matched by parameter name."""
        with distributed.full_weights(self.policy_logps):
            policy, ref = dict(self._unwrapped_model().named_parameters()), list(self.ref_model.named_parameters())
            mix_into([p for _, p in ref], [policy[n] for n, _ in ref], self.args.ref_model_mixup_alpha)

    def _recompute_scope(self) -> AbstractContextManager:
        """`recompute_where_memory_needs` over the decoder body, where its gradients are this process's own
        parameters' (not FSDP shards, not DeepSpeed's buffers)."""
        parts = lm_body_and_head(self.model)
        if parts is None or zero.is_engine(self.policy_logps) or distributed.is_sharded(self.model):
            return nullcontext()
        return recompute_where_memory_needs(parts[0])

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        """Accumulate gradients; `last`: the step's last micro-batch, where processes reduce them."""
        if zero.is_engine(self.policy_logps):  # DeepSpeed reduces and steps itself (grpo.zero)
            zero.backward(self.policy_logps, loss, last)
            return
        with nullcontext() if last else self.accelerator.no_sync(self.policy_logps):  # sync gradients once a step
            self.accelerator.backward(loss)

    def _optimizer_step(self, loss: float) -> float:
        """Clip to max_grad_norm and update, unless the loss or the gradient norm is not finite (one NaN would
        poison the weights and the optimizer moments); returns the norm before clipping."""
        if zero.is_engine(self.policy_logps):  # DeepSpeed clips, and skips non-finite steps (grpo.zero)
            return zero.step(self.policy_logps)
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm > 0 else math.inf
        grad_norm = float(self.accelerator.clip_grad_norm_(params, max_norm))
        if is_finite_step({"loss": loss, "grad_norm": grad_norm}):
            self.callbacks.event("on_pre_optimizer_step", self.state)
            self.optimizer.step()
            self.callbacks.event("on_optimizer_step", self.state)
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    # ---- logging and checkpoints --------------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        """A record into log_history (during train() also metrics.jsonl and the trackers), then on_log."""
        if self.log is not None:
            self.log.write(record)  # calls _on_log
        else:
            self.state.log_history.append(record)
            self._on_log(record)

    def _on_log(self, record: dict[str, Any]) -> None:
        self.callbacks.event("on_log", self.state, logs={k: v for k, v in record.items() if k != "step"})

    def _save_checkpoint(self, position: RunPosition, config: dict[str, Any]) -> None:
        """A checkpoint of this step, with the callbacks' state and the best checkpoint so far kept, then on_save."""
        state, args = self.state, self.args
        if state.best_global_step is not None:
            best = Path(args.output_dir) / f"checkpoint-{state.best_global_step}"
            if state.best_global_step == state.global_step or best.exists():
                state.best_model_checkpoint = str(best)
        self.callbacks.export(state)
        save_checkpoint(self._training_objects(), state, position, self.log.window.values, config,
                        output_dir=args.output_dir, save_total_limit=args.save_total_limit, processes=self.processes,
                        model_only=args.save_only_model, keep=state.best_model_checkpoint)
        self.callbacks.event("on_save", state)

    # ---- set-up helpers ------------------------------------------------------------------------------------
    def _new_state(self) -> TrainerState:
        """transformers' TrainerState for a run: max_steps, and logging/eval/save steps with fractions resolved."""
        args, max_steps = self.args, self._total_steps()
        steps_per_epoch = 0 if self.train_source.is_iterable else (
            len(self.train_source) // args.prompts_per_generation * args.steps_per_round)
        # an IterableDataset's length is unknown: transformers' "no limit" on epochs
        epochs = math.ceil(max_steps / steps_per_epoch) if steps_per_epoch else sys.maxsize
        state = TrainerState(max_steps=max_steps, train_batch_size=args.per_device_train_batch_size,
                             num_train_epochs=epochs,
                             is_local_process_zero=self.processes.is_main,
                             is_world_process_zero=self.processes.is_main)
        state.compute_steps(args, max_steps)
        return state

    def _total_steps(self) -> int:
        args = self.args
        if args.max_steps > 0:
            return args.max_steps
        rounds_per_epoch = len(self.train_source) // args.prompts_per_generation
        return max(1, math.ceil(args.num_train_epochs * rounds_per_epoch * args.steps_per_round))

    def _create_optimizer_and_scheduler(self, total_steps: int) -> None:
        """AdamW and the configured schedule (`grpo.optim`), unless `optimizers` gave them."""
        if self.optimizer is None:
            self.optimizer = create_optimizer(self.model, self.args)
        if self.lr_scheduler is None:
            self.lr_scheduler = create_scheduler(self.optimizer, self.args, total_steps)

    def resolved_config(self) -> dict[str, Any]:
        """The config with the model and reward functions: what `grpo_config.json` and checkpoints record."""
        return dict(self.args.to_dict(), model=self._unwrapped_model().config._name_or_path,
                    reward_funcs=[r.name for r in self.reward_funcs])

    def _prepare_run_dir(self) -> tuple[Path, dict[str, Any]]:
        run_dir = Path(self.args.output_dir)
        resolved = self.resolved_config()
        if self.processes.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "grpo_config.json").write_text(json.dumps(resolved, indent=2, default=str))
        return run_dir, resolved

    def _autocast(self, generation: bool = False) -> Any:
        # A CPU decode step under autocast would cast every weight to bf16 at every token; the engine's float32
        # lean step (weights copied once per round) is faster there, so on CPU bf16 is for training passes only.
        if not self.use_bf16 or (generation and self.device.type == "cpu"):
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def _training_objects(self) -> TrainingObjects:
        """What a checkpoint writes and a resume restores."""
        return TrainingObjects(
            model=self._unwrapped_model(), trained=self.policy_logps, optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler, tokenizer=self.processing_class, shuffle=self._shuffle,
            sampler=self.generator, ref_model=self.ref_model if self.args.sync_ref_model else None,
            entropy_control=self.entropy_control if self.args.use_adaptive_entropy else None,
        )

    def _unwrapped_model(self) -> Any:
        return self.accelerator.unwrap_model(self.model)

    @contextmanager
    def _reference_model(self) -> Iterator[Any]:
        if self.ref_model is not None:
            yield self.ref_model
            return
        model = self._unwrapped_model()
        with model.disable_adapter():  # PEFT: the base model, adapter off, is the reference
            yield model

    def _choose_gradient_checkpointing(self, longest_prompt: int | None) -> str | None:
        """gradient_checkpointing=None: on only if a training forward's activations would not fit in memory
        (models.needs_gradient_checkpointing); every process takes the main one's decision. Returns the notice."""
        args, model = self.args, self._unwrapped_model()
        if args.gradient_checkpointing is not None:
            return None
        if longest_prompt is None:  # an IterableDataset: assume prompts as long as the context allows
            longest_prompt = (context_length(model.config) or 4096) - args.max_completion_length
        wide = self.use_bf16 or next(model.parameters()).dtype in (torch.bfloat16, torch.float16)
        free = free_memory_bytes(self.device)
        on, activations = choose_gradient_checkpointing(model, args, longest_prompt, 2 if wide else 4, free)
        on = self.processes.broadcast(on)
        if on:
            enable_gradient_checkpointing(model, args.gradient_checkpointing_kwargs)
        return (f"grpo: gradient checkpointing {'on' if on else 'off'} (a training forward's activations: about "
                f"{activations / 2**30:.1f} GiB; free memory: {free / 2**30:.1f} GiB). Set gradient_checkpointing "
                "to choose.")

    def save_model(self, output_dir: str | None = None, merge_adapter: bool = False) -> None:
        """Write the model (or PEFT adapter) and tokenizer in `save_pretrained` format. With `merge_adapter`, a
        LoRA adapter is merged into a copy of the base weights, which loads as a plain causal LM."""
        full = distributed.gather_full_state(self._unwrapped_model())  # FSDP: a collective
        self.processes.wait()
        if not self.processes.is_main:
            return
        target = Path(output_dir or self.args.output_dir)
        target.mkdir(parents=True, exist_ok=True)
        model = self._unwrapped_model()
        if merge_adapter and hasattr(model, "merge_and_unload"):
            model = copy.deepcopy(model).merge_and_unload()  # a copy: training goes on with the adapter
        model.save_pretrained(target, state_dict=full.model if full else None)
        self.processing_class.save_pretrained(target)
        torch.save(self.args, target / "training_args.bin")  # as transformers' Trainer writes it
