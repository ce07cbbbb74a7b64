"""GRPOTrainer: the loop. Generate a round, score it, then take optimizer steps on it.

Read `train` for the outer loop, `generate_and_score` for one generation round, and `training_step` for one
optimizer step; the math they call lives in `grpo.algorithm`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from transformers import PreTrainedModel, get_scheduler, set_seed

from grpo import distributed, zero
from grpo.algorithm import (
    MULTI_OBJECTIVE_AGGREGATIONS,
    LossSettings,
    LossStats,
    ObjectiveParams,
    StepCounts,
    all_equal_groups,
    combine_rewards,
    entropy_threshold,
    micro_batch_loss,
    mix_into,
)
from grpo.batching import plan_steps, split_to_counts
from grpo.checkpoint import (
    TrainingObjects,
    check_resumable,
    checkpoints,
    load_checkpoint,
    model_signature,
    prepare_output_dir,
    save_checkpoint,
)
from grpo.config import GRPOConfig
from grpo.data import PromptSource, check_prompt_ids, check_prompt_lengths, context_length, tokenize_prompts
from grpo.distributed import Processes, accelerator_kwargs, check_distributed_support
from grpo.evaluate import evaluate
from grpo.guard import NonFiniteGuard, is_finite_step
from grpo.logprobs import PolicyLogps, completion_logps, completion_logps_in_chunks
from grpo.metrics import ProgressBar, RunLog, round_metrics, tool_metrics
from grpo.models import (
    disable_dropout,
    enable_gradient_checkpointing,
    load_causal_lm,
    load_tokenizer,
    reference_model,
    wrap_peft,
)
from grpo.rewards import RewardRunner, prepare_reward_funcs
from grpo.rollout import (
    Environments,
    Episodes,
    Generator,
    Rollout,
    check_episodes,
    check_tools,
    default_generator,
    episode_source,
    set_chat_template,
)
from grpo.run_state import RunPosition, TrainerState


class GRPOTrainer:
    """Trains a causal LM with GRPO. The arguments and their meanings follow TRL's `GRPOTrainer`."""

    def __init__(
        self,
        model: str | PreTrainedModel,
        reward_funcs: Any,
        args: GRPOConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        reward_processing_classes: Any = None,
        peft_config: Any = None,
        optimizers: tuple[Any, Any] = (None, None),
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
        if self.train_source.is_iterable and args.max_steps <= 0:
            raise ValueError("train_dataset is an IterableDataset, which has no length: set GRPOConfig.max_steps.")
        if not self.train_source.is_iterable and len(self.train_source) < args.prompts_per_generation:
            raise ValueError(
                f"train_dataset has {len(self.train_source)} prompts but one generation round needs "
                f"{args.prompts_per_generation} unique prompts (generation_batch_size {args.generation_batch_size} / "
                f"num_generations {args.num_generations}). Add prompts or lower the batch size."
            )
        # multi-turn rollouts (docs/tools.md): tools, and environments (probed here: their rewards join the run's)
        self.tools = list(tools or [])
        check_tools(self.tools)
        self.environments = Environments(environment_factory) if environment_factory is not None else None
        environment_rewards = self.environments.reward_functions() if self.environments is not None else []
        if self.environments is not None:
            self.environments.check_rows(self.train_source.columns, self.train_source.column("environment"))
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
        set_seed(args.seed)
        model_source = model
        self.processing_class = load_tokenizer(model, processing_class, args.model_init_kwargs)
        if args.chat_template_path is not None:
            set_chat_template(self.processing_class, args.chat_template_path)
        if self.train_source.conversational and not getattr(self.processing_class, "chat_template", None):
            raise ValueError(
                "train_dataset has conversational prompts (lists of messages) but the tokenizer has no chat "
                "template. Set tokenizer.chat_template, or give prompts as plain strings."
            )
        tool_format = check_episodes(self.processing_class, args, self.tools, self.environments, rollout_func,
                                     self.train_source.conversational)
        model = load_causal_lm(model, args.model_init_kwargs)
        if peft_config is not None:
            model = wrap_peft(model, peft_config)
        if args.disable_dropout:
            disable_dropout(model)
        if args.gradient_checkpointing:
            enable_gradient_checkpointing(model, args.gradient_checkpointing_kwargs or {"use_reentrant": False})
            if peft_config is not None:
                model.enable_input_require_grads()
        self.model = model.to(self.device)
        self.policy_logps = PolicyLogps(self.model)  # the training forward
        if self.processes.count > 1 and distributed.engine(self.accelerator) not in distributed.WRAPPED_IN_TRAIN:
            self.policy_logps = self.accelerator.prepare_model(self.policy_logps)
        self.ref_model = None
        if args.sync_ref_model and peft_config is not None:
            raise ValueError("sync_ref_model=True needs a separate reference model; with PEFT the reference is the "
                             "base model with the adapter off, which is not updated. Set sync_ref_model=False.")
        if args.beta > 0 and peft_config is None:  # with PEFT the reference is the model with the adapter off
            self.ref_model = reference_model(self._unwrapped_model(), model_source,
                                             args.model_init_kwargs).to(self.device)
            if args.disable_dropout:
                disable_dropout(self.ref_model)
        self.use_bf16 = args.bf16 if args.bf16 is not None else (
            self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        )
        self.generator = generator or default_generator(self.processing_class, args, self.processes.rank)
        own_rollout = None if rollout_func is None else (lambda prompts: rollout_func(prompts, self))  # TRL's call
        self.episodes = episode_source(self.generator, self.processing_class, args, tool_format, self.tools,
                                       self.environments, own_rollout, context_length(self._unwrapped_model().config))
        self.state = TrainerState()
        self.optimizer, self.lr_scheduler = optimizers  # as in transformers: (None, None) builds AdamW + schedule
        self._shuffle = torch.Generator().manual_seed(args.seed)

    # ---- the outer loop ------------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None) -> TrainerState:
        """Run to max_steps (or num_train_epochs). `resume_from_checkpoint`: True for the latest checkpoint in
        output_dir, or a checkpoint path; the run then continues exactly as if it had never stopped."""
        args = self.args
        resume = resume_from_checkpoint if resume_from_checkpoint is not None else args.resume_from_checkpoint
        # Every check comes before anything is written or generated.
        config = self.resolved_config()
        checkpoint = prepare_output_dir(args.output_dir, resume, args.overwrite_output_dir, config,
                                        delete=self.processes.is_main)
        self.processes.wait()  # every process has seen output_dir before the main one writes to it
        if checkpoint is not None:
            check_resumable(checkpoint, config, model_signature(self._unwrapped_model()), self.processes.count)
        tools = self.tools + (self.environments.tools if self.environments is not None else [])  # all, at most
        check_prompt_lengths(self.train_source, self.processing_class, self._unwrapped_model().config,
                             args.max_completion_length, dict(args.chat_template_kwargs or {}, tools=tools or None))
        self.state = TrainerState(max_steps=self._total_steps())
        self._create_optimizer_and_scheduler(self.state.max_steps)
        self.policy_logps = distributed.shard_policy(self.accelerator, self.policy_logps, self.optimizer)  # FSDP only
        position, window_values = RunPosition(), {}
        if checkpoint is not None:
            position, window_values = load_checkpoint(checkpoint, self._training_objects(), self.state,
                                                      self.processes)
        run_dir, resolved = self._prepare_run_dir()
        main = self.processes.is_main  # only the main process writes and prints
        self.log = log = RunLog(run_dir, args, resolved, self.state.log_history, self.state.global_step, main)
        log.window.values.update(window_values)
        if checkpoint is not None:
            log.say(f"grpo: resuming from {checkpoint} at step {self.state.global_step}")
        log.say(
            f"grpo: {self.state.max_steps} optimizer steps, {args.generation_batch_size} completions per round "
            f"({args.prompts_per_generation} prompts x {args.num_generations}), run directory {run_dir}"
        )
        if not args.needs_old_logps and args.beta == 0:
            log.say("grpo: training on-policy, so the logged loss stays near 0 by construction (the policy ratio is "
                    "exactly 1); its gradient is not 0. Watch `reward` to see learning.")
        bar = ProgressBar(self.state.max_steps, disable=args.disable_tqdm or not main, initial=self.state.global_step)
        rounds = self.train_source.rounds(args.prompts_per_generation, args.seed, args.shuffle_dataset,
                                          skip=position.rounds_consumed)
        rounds_per_epoch = 0 if self.train_source.is_iterable else len(self.train_source) // args.prompts_per_generation
        guard = NonFiniteGuard(args.max_consecutive_nonfinite_steps)
        step_started, round_tokens = time.perf_counter(), 0
        try:
            while self.state.global_step < self.state.max_steps:
                if position.round_done:
                    epoch, rows = next(rounds)  # epoch counts passes over an IterableDataset too
                    rollout, generated, extra_rounds = self._generate_round(self.processes.shard(rows), rounds)
                    position.rounds_consumed += 1 + extra_rounds
                    position.epoch = position.rounds_consumed / rounds_per_epoch if rounds_per_epoch else epoch
                    position.rollout, position.plan = rollout, self._optimizer_steps(rollout)
                    position.next_step = 0
                    position.round_reward = generated["reward"]
                    log.window.add(generated)
                    round_tokens = int(rollout.completion_mask.sum())
                step_metrics = self.training_step(position.rollout, position.plan[position.next_step])
                position.next_step += 1
                step_metrics["step_time"] = time.perf_counter() - step_started
                step_started = time.perf_counter()
                log.window.add(step_metrics)
                self.state.global_step += 1
                step = self.state.global_step
                guard.record(step, is_finite_step(step_metrics), self._last_checkpoint_message)
                if args.sync_ref_model and step % args.ref_model_sync_steps == 0:
                    self._sync_ref_model()
                self.state.epoch = position.epoch
                bar.update(position.round_reward, round_tokens)
                round_tokens = 0  # a round's tokens count once, however many steps it feeds
                last_step = step == self.state.max_steps
                if step % args.logging_steps == 0 or last_step:
                    log.flush(step, self.state.epoch, position.rollout, [r.name for r in self.reward_funcs])
                if args.eval_strategy == "steps" and (step % args.eval_steps == 0 or last_step):
                    with distributed.full_weights(self.policy_logps):  # FSDP: all gather, main evaluates
                        if main:
                            self._log_evaluation()
                if args.save_strategy == "steps" and (step % args.save_steps == 0 or last_step) and guard.healthy:
                    save_checkpoint(self._training_objects(), self.state, position, log.window.values, config,
                                    output_dir=args.output_dir, save_total_limit=args.save_total_limit,
                                    processes=self.processes)
        finally:
            bar.close()
            log.close()
        self.save_model()
        return self.state

    def _last_checkpoint_message(self) -> str:
        found = checkpoints(self.args.output_dir)
        return f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was written yet"

    def _optimizer_steps(self, rollout: Rollout) -> list[list[torch.Tensor]]:
        """Split a round into optimizer steps of micro-batches (see `grpo.batching`).

        The rows are shuffled once per round, so when a round feeds several optimizer steps each sees a mix of
        prompts. Every process runs the same number of micro-batches per step (agreed here, once per round).
        """
        args = self.args
        lengths = rollout.prompt_mask.sum(1) + rollout.completion_mask.sum(1)
        order = torch.randperm(len(rollout), generator=self._shuffle)
        steps = plan_steps(order, lengths, args.per_device_train_batch_size, args.gradient_accumulation_steps,
                           args.num_iterations, args.max_tokens_per_micro_batch, group_size=args.num_generations)
        return split_to_counts(steps, self.processes.max_each([len(s) for s in steps]), lengths)

    # ---- one generation round ------------------------------------------------------------------------------
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
            if self.episodes is None:
                episodes = self._single_turn(rows, g)
            else:  # tools, environments or a rollout_func (grpo.rollout.multiturn, grpo.rollout.user_rollout)
                episodes = self.episodes.generate(self._unwrapped_model(), rows, g)
        generation, repeated_prompts, completions = episodes.generation, episodes.prompts, episodes.completions
        columns = {} if args.remove_unused_columns else {
            name: [row[name] for row in rows for _ in range(g)] for name in rows[0] if name != "prompt"
        }
        columns.update(episodes.reward_kwargs)
        completion_ids = [ids[mask.bool()].tolist() for ids, mask in
                          zip(generation.completion_ids, generation.completion_mask)]
        rewards_per_func, reward_errors = self.reward_runner.score(repeated_prompts, completions, completion_ids,
                                                                   columns, trainer_state=self.state, group_size=g)
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
            tool_mask=generation.tool_mask, prompts=repeated_prompts, completions=completions,
        )
        chunk = args.per_device_train_batch_size
        with distributed.full_weights(self.policy_logps), self._autocast():
            if args.needs_old_logps and for_loss:  # the policy moves within the round, so pi_old must be remembered
                rollout.old_logps = completion_logps_in_chunks(self._unwrapped_model(), rollout, args.temperature,
                                                               chunk)
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
        if episodes.tool_counts is not None:
            metrics.update(tool_metrics(spread.sum(episodes.tool_counts), len(lengths)))
        return rollout, {"num_tokens": float(self.state.num_input_tokens_seen), **metrics}

    def _single_turn(self, rows: list[dict[str, Any]], g: int) -> Episodes:
        """G completions of each row's prompt, one turn each."""
        args = self.args
        prompts = [row["prompt"] for row in rows]
        prompt_ids = tokenize_prompts(self.processing_class, prompts, args.chat_template_kwargs)
        # train() checked a Dataset's prompts up front; an IterableDataset's are checked here, round by round
        check_prompt_ids(prompts, prompt_ids, self.processing_class, args.max_completion_length,
                         context_length(self._unwrapped_model().config))
        generation = self.generator.generate(self._unwrapped_model(), prompt_ids, g)
        texts = self.processing_class.batch_decode(generation.completion_ids, skip_special_tokens=True)
        conversational = self.train_source.conversational
        completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
        return Episodes(generation, [p for p in prompts for _ in range(g)], completions)

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
        settings = LossSettings(args.loss_type, args.importance_sampling_level,
                                ObjectiveParams(args.epsilon, args.epsilon_high, args.delta, args.sapo_temperature_pos,
                                                args.sapo_temperature_neg),
                                beta=args.beta, entropy_coef=args.entropy_coef)
        entropy_masks = self._high_entropy_masks(rollout, micro_batches) if args.top_entropy_quantile < 1 else None
        totals = LossStats()
        self.policy_logps.train()  # the model and any DDP wrapper around it
        for i, rows in enumerate(micro_batches):
            batch = rollout.select(rows)
            with self._autocast():
                logps, entropy = self.policy_logps(batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                                   batch.completion_mask, args.temperature, with_entropy=True,
                                                   entropy_grad=args.entropy_coef > 0)
            loss, stats = micro_batch_loss(
                logps, entropy, self._on_device(batch.old_logps), self._on_device(batch.ref_logps),
                batch.advantages.to(self.device), self._loss_mask(batch).to(self.device), counts, settings,
                entropy_mask=None if entropy_masks is None else entropy_masks[i].to(self.device),
            )
            # DDP averages gradients over processes; the step's loss is their sum
            self._backward(loss * processes.count, last=i == len(micro_batches) - 1)
            totals += stats
        totals = LossStats(**processes.sum(dataclasses.asdict(totals)))
        metrics = {"loss": totals.loss, "grad_norm": self._optimizer_step(totals.loss)}
        self.lr_scheduler.step()  # the schedule follows global_step, skipped steps included
        metrics["learning_rate"] = self.lr_scheduler.get_last_lr()[0]
        return metrics | totals.step_metrics(counts.num_tokens, settings)

    def _on_device(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.to(self.device)

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
        per micro-batch). Costs a no-grad forward, but keeps the update independent of the split."""
        entropies, masks, rho = [], [], self.args.top_entropy_quantile
        for rows in micro_batches:
            batch = rollout.select(rows)
            with self._autocast():
                _, entropy = completion_logps(self.model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                              batch.completion_mask, self.args.temperature, with_entropy=True)
            entropies.append(entropy.float())
            masks.append(self._loss_mask(batch).to(entropy.device).bool())
        threshold = entropy_threshold(torch.cat([e[m] for e, m in zip(entropies, masks)]), rho)
        return [(e >= threshold).float() for e in entropies]

    def _sync_ref_model(self) -> None:
        """TR-DPO: ref <- alpha x policy + (1 - alpha) x ref, matched by parameter name."""
        with distributed.full_weights(self.policy_logps):
            policy, ref = dict(self._unwrapped_model().named_parameters()), list(self.ref_model.named_parameters())
            mix_into([p for _, p in ref], [policy[n] for n, _ in ref], self.args.ref_model_mixup_alpha)

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
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    # ---- logging -------------------------------------------------------------------------------------------
    def _log_evaluation(self) -> None:
        """Mean reward, each function's mean and pass@1 on eval_dataset, logged with the eval_ prefix."""
        args = self.args
        if self._eval_rows is None:
            self._eval_rows = list(self.eval_source.dataset)
        score = partial(self.generate_and_score, for_loss=False)  # the main process alone: no collectives
        g = args.num_generations_eval
        results = evaluate(score, self._eval_rows, ks=[1], pass_threshold=1.0, num_generations=g,
                           reward_names=[r.name for r in self.reward_funcs], reward_weights=self.reward_weights,
                           prompts_per_batch=args.per_device_eval_batch_size // g)
        record = {"step": self.state.global_step, "eval_reward": results["mean_reward"],
                  **{f"eval_{k}": v for k, v in results.items() if k.startswith(("rewards/", "pass@"))}}
        self.log.write(record)

    # ---- set-up helpers ------------------------------------------------------------------------------------
    def _total_steps(self) -> int:
        args = self.args
        if args.max_steps > 0:
            return args.max_steps
        rounds_per_epoch = len(self.train_source) // args.prompts_per_generation
        return max(1, math.ceil(args.num_train_epochs * rounds_per_epoch * args.steps_per_round))

    def _create_optimizer_and_scheduler(self, total_steps: int) -> None:
        """AdamW with decay on matrices only, and the configured schedule, unless `optimizers` gave them."""
        args = self.args
        if self.optimizer is None:
            params = [p for p in self.model.parameters() if p.requires_grad]
            groups = [
                {"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay},
                {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},  # norms and biases
            ]
            groups = [group for group in groups if group["params"]]  # LoRA has no vectors; DeepSpeed drops empties
            # the fused kernel (TRL's default through transformers' adamw_torch_fused): 8x faster on CPU here
            fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
            self.optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                               eps=args.adam_epsilon, fused=fused or None)
        if self.lr_scheduler is None:
            self.lr_scheduler = get_scheduler(
                args.lr_scheduler_type, self.optimizer, num_warmup_steps=args.warmup_steps_for(total_steps),
                num_training_steps=total_steps, scheduler_specific_kwargs=args.lr_scheduler_kwargs or {},
            )

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
