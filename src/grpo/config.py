"""GRPOConfig: every knob of a run, with TRL's names, defaults and meanings.

One dataclass. Construction validates everything that can be checked without a model, so a typo or an
impossible batch geometry fails in the first second, not after the model has loaded. The derived batch
geometry (`generation_batch_size`, `steps_per_generation`) is filled in by `__post_init__` exactly as TRL does.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any

from grpo.sampling_params import SamplingParams, generation_kwargs_needing_generate, unknown_generation_kwargs
from grpo.trl_fields import REMOVED_FIELDS, TRLFields, refused_values

LOSS_TYPES = ("dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo", "luspo", "vespo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
MULTI_OBJECTIVE_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
CLIPPED_LOSS_TYPES = ("dapo", "grpo", "dr_grpo", "bnpo", "luspo")  # the loss types `delta` applies to
SCALE_REWARDS = ("group", "batch", "none")
REWARD_ERROR_POLICIES = ("raise", "none")
GENERATION_BACKENDS = ("engine", "transformers")
LR_SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay",
)
OPTIMIZERS = ("adamw_torch_fused", "adamw_torch")
# report_to name -> (module it needs, pip extra that brings it)
TRACKER_MODULES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
                   "trackio": ("trackio", "trackio")}


def did_you_mean(name: str, candidates: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def _check_choice(field_name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(
            f"GRPOConfig.{field_name}={value!r} is not one of {list(choices)}.{did_you_mean(str(value), choices)}"
        )


def _check_strategy(config: GRPOConfig, name: str) -> None:
    """logging/eval/save strategies: "steps" or "no" (an IntervalStrategy enum reads as its string)."""
    value = getattr(config, name)
    value = getattr(value, "value", value)
    if value in ("epoch", "best"):
        raise ValueError(f"GRPOConfig.{name}={value!r} is not supported yet: use {name}='steps' with "
                         f"{name.split('_')[0]}_steps set to the optimizer steps you want between them.")
    _check_choice(name, value, ("steps", "no"))
    setattr(config, name, value)


def _check_optimizer(optim: Any) -> None:
    optim = getattr(optim, "value", optim)
    if optim not in OPTIMIZERS:
        raise ValueError(
            f"GRPOConfig.optim={optim!r} is not supported yet: grpo builds AdamW, {list(OPTIMIZERS)}; for another "
            f"optimizer pass GRPOTrainer(optimizers=(optimizer, lr_scheduler)).{did_you_mean(str(optim), OPTIMIZERS)}"
        )


@dataclass
class GRPOConfig(TRLFields):
    """Configuration of a GRPO run. Field names, defaults and meanings follow TRL's `GRPOConfig`; the TRL fields
    grpo accepts without acting on them come from `TRLFields` (docs/trl_fields.md lists every field's status)."""

    # ---- where the run goes --------------------------------------------------------------------------------
    output_dir: str = "trainer_output"
    """Run directory: resolved config (`config.json`), `metrics.jsonl` and the final model are written here."""
    run_name: str | None = None
    """A display name for the run (defaults to the output directory's name)."""
    report_to: str | list[str] = "none"
    """Trackers that get the same metrics as `metrics.jsonl` (always written): "tensorboard", "wandb" (set
    WANDB_MODE=offline to log without network), "trackio", a list of them, "all" (every installed one) or "none"."""
    logging_steps: float = 10
    """Log averaged metrics every this many optimizer steps (TRL's default is 10), and after the last one; a value in
    (0, 1) is a fraction of max_steps."""
    logging_strategy: str = "steps"
    """"steps": log every logging_steps; "no": log only the run summary."""
    logging_first_step: bool = False
    """Log the first optimizer step too."""
    log_completions: bool = False
    """At every logging step, append the last round's prompts, completions, rewards and advantages to
    `completions.jsonl` in the run directory and print them as a table."""
    num_completions_to_print: int | None = None
    """How many rows `log_completions` prints (None: all rows of the last generation round)."""
    log_unique_prompts: bool = False
    """The printed completions table shows each prompt once (on its group's first row)."""
    disable_tqdm: bool = False
    """Turn off the progress bar."""
    eval_strategy: str = "no"
    """"steps": evaluate on `eval_dataset` every `eval_steps` optimizer steps (and after the last), logging
    eval_reward, eval_rewards/<func>/mean and eval_pass@1 (weighted reward >= 1); "no": never."""
    eval_steps: float | None = None
    """Optimizer steps between evaluations (None: logging_steps; a value in (0, 1): a fraction of max_steps)."""
    eval_delay: float = 0
    """No evaluation before this many optimizer steps."""
    eval_on_start: bool = False
    """Evaluate once before the first optimizer step."""
    save_strategy: str = "steps"
    """"steps": write a checkpoint every `save_steps` optimizer steps and after the last one; "no": never."""
    save_steps: float = 500
    """Optimizer steps between checkpoints (a value in (0, 1): a fraction of max_steps)."""
    save_total_limit: int | None = None
    """Keep at most this many checkpoints (the oldest go first, never the best one); None keeps all."""
    save_only_model: bool = False
    """Checkpoints hold the model and tokenizer only (no optimizer, schedule or random states): smaller, and they
    cannot be resumed."""
    load_best_model_at_end: bool = False
    """After training, load the weights of the checkpoint with the best `metric_for_best_model`. Needs eval and save
    strategies "steps", with save_steps a multiple of eval_steps."""
    metric_for_best_model: str | None = None
    """The evaluation metric that ranks checkpoints (with or without the eval_ prefix, e.g. "reward"). None: "loss"
    when load_best_model_at_end, as in transformers."""
    greater_is_better: bool | None = None
    """Whether a larger metric_for_best_model is better (None: unless the metric's name ends in "loss")."""
    restore_callback_states_from_checkpoint: bool = False
    """On resume, restore the state of stateful callbacks (e.g. EarlyStoppingCallback's patience counter) saved in
    the checkpoint, as in transformers."""
    resume_from_checkpoint: str | bool | None = None
    """As in transformers, `train(resume_from_checkpoint=...)` is what resumes: True (the latest checkpoint in
    output_dir) or a checkpoint path. Set here, it is the default for that argument."""
    overwrite_output_dir: bool = False
    """Start afresh in an output_dir that holds another run (its checkpoints are deleted). Without it, such an
    output_dir is an error, so an earlier run is never overwritten by accident."""
    max_consecutive_nonfinite_steps: int = 3
    """A step whose loss or gradient is NaN/inf is skipped with a warning; this many in a row stop the run (not in
    TRL), keeping the last good checkpoint."""
    per_device_eval_batch_size: int = 8
    """Completions per evaluation batch; must divide into groups of num_generations_eval."""
    num_generations_eval: int | None = None
    """Completions sampled per evaluation prompt (None: num_generations)."""

    # ---- the optimisation loop -----------------------------------------------------------------------------
    num_train_epochs: float = 3.0
    """Passes over the prompts of the training set (ignored when `max_steps` > 0)."""
    max_steps: int = -1
    """Total optimizer steps. Overrides `num_train_epochs` when > 0; required for an IterableDataset."""
    per_device_train_batch_size: int = 8
    """Completions (not prompts) per device per micro-step."""
    gradient_accumulation_steps: int = 1
    """Micro-steps per optimizer step."""
    max_tokens_per_micro_batch: int | None = 4096
    """Cut a micro-batch into the fewest equal pieces whose padded size (completions x longest prompt +
    completion) stays within this many tokens, which bounds the activation and logit memory of one
    forward/backward however long completions get. The update is unchanged (the loss normaliser counts the whole
    optimizer step); short completions are never cut. None: micro-batches of per_device_train_batch_size
    completions whatever their length (TRL's behaviour)."""
    skip_zero_advantage_rows: bool = True
    """Leave out of the training forward/backward the completions whose advantage is exactly 0 (a group whose
    rewards are all equal: all right or all wrong) or that have no token in the loss (mask_truncated_completions),
    whose loss and gradient are then exactly 0: the same update for less work (the logged entropy still counts
    the former: the built-in sampler's where it is the policy's, else a no-grad forward's; nor are their
    old-policy log-probs computed by a forward). Applies where nothing else in the loss reads them (beta = 0, no
    entropy bonus or entropy quantile mask, no MoE router loss, not vespo), not under DeepSpeed; off: every row is
    trained, as in TRL."""
    learning_rate: float = 1e-6
    """Peak AdamW learning rate. TRL's 1e-6 suits pretrained models; the embedded demo model uses far more."""
    lr_scheduler_type: str = "linear"
    """Schedule after warm-up, any of transformers' `get_scheduler` names."""
    lr_scheduler_kwargs: dict[str, Any] | None = None
    """Extra arguments for the scheduler (e.g. {"min_lr": 1e-7} for cosine_with_min_lr)."""
    warmup_ratio: float = 0.0
    """Fraction of all optimizer steps used for linear warm-up (used when `warmup_steps` is 0)."""
    warmup_steps: float = 0
    """Warm-up optimizer steps. As in transformers 5, a value in (0, 1) is read as a ratio of all steps."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    optim: str = "adamw_torch_fused"
    """The optimizer: "adamw_torch_fused" (fused AdamW kernel where every parameter allows it) or "adamw_torch"
    (torch's default AdamW implementation). Other transformers optimizers are refused; pass your own through
    GRPOTrainer(optimizers=(optimizer, scheduler))."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value before each optimizer step (0 disables clipping)."""
    seed: int = 42
    """Seed for the prompt order, model initialisation by the user and sampling."""
    full_determinism: bool = False
    """transformers' `enable_full_determinism(seed)`: deterministic kernels only (slower)."""
    bf16: bool | None = None
    """bfloat16 autocast for forward passes (on CPU the engine still samples from float32 weight copies: see
    `RolloutEngine`). None (TRL: True) means on where the device supports bf16 (CUDA with bf16 support), off on
    CPU, where training passes under autocast are no faster than float32."""
    gradient_checkpointing: bool | None = None
    """Recompute activations in the backward pass to save memory, at the cost of a second forward. None (TRL:
    True) decides when training starts: on only when one training forward's activations would take more than
    half the memory left (`models.needs_gradient_checkpointing`); the decision is printed. Where it is on, a
    micro-batch whose backward starts before the layers' gradients exist (the first of each step) keeps the top
    layers' activations that the gradients' memory holds, and recomputes only the rest (`grpo.recompute`): the
    same peak memory, less recomputation."""
    gradient_checkpointing_kwargs: dict[str, Any] | None = None
    """Arguments for `gradient_checkpointing_enable` (default {"use_reentrant": False})."""
    tf32: bool | None = None
    """CUDA: allow TF32 matmuls (None: torch's setting)."""
    torch_empty_cache_steps: int | None = None
    """Empty the accelerator's memory cache every this many optimizer steps (None: never)."""
    use_cpu: bool = False
    """Train on the CPU even when a GPU is available."""
    cpu_keep_freed_memory: bool = True
    """CPU training (not in TRL): while train() runs, freed memory is kept for reuse instead of returned to the
    system, so the tensors every step re-allocates (activations, logits, gradients) do not page-fault in again,
    and without raising peak RSS: torch's tensors of 128 KiB and more go to grpo's tensor cache, which unmaps
    idle blocks before the memory mapped would pass the peak of memory in use by 64 MiB (`grpo.allocator`;
    SmolLM2-135M: peak RSS 10-12% lower than with glibc keeping everything freed, which is what runs without a
    C++ compiler, at the same step time). Off where glibc's MALLOC_* environment variables are set."""

    # ---- model and data ------------------------------------------------------------------------------------
    model_init_kwargs: dict[str, Any] | None = None
    """Keyword arguments for `AutoModelForCausalLM.from_pretrained` when `model` is a string (e.g. {"dtype":
    "bfloat16"}). Also used for reward models given as strings."""
    trust_remote_code: bool = False
    """Allow model, tokenizer and reward-model code from the checkpoint's repository (transformers'
    trust_remote_code); it is added to model_init_kwargs."""
    disable_dropout: bool = False
    """Turn off dropout in the policy (and reference) model so log-probs are deterministic."""
    cast_lm_head_to_fp32: bool = False
    """ScaleRL: keep the LM head of the policy and reference in float32 and compute logits in float32 (training
    log-probs and generation), whatever the model's dtype and autocast."""
    use_liger_kernel: bool = False
    """Accepted for TRL programs; no Liger kernel is applied. grpo's log-probs already go through the LM head a
    chunk of tokens at a time, so no (batch x length x vocab) logits tensor exists (docs/objectives.md)."""
    router_aux_loss_coef: float | None = None
    """Mixture-of-Experts: weight of the router's load-balancing loss (the model output's `aux_loss`, requested
    with output_router_logits) added to the training loss. None: the model config's own coefficient (0 for a model
    without one); a non-zero value on a model that returns no router logits is an error."""
    remove_unused_columns: bool = False
    """If True, only the `prompt` column reaches the reward functions; by default every column does."""
    shuffle_dataset: bool = True
    """Shuffle the prompt order every epoch (seeded by `seed`)."""
    chat_template_kwargs: dict[str, Any] | None = None
    """Extra arguments for `apply_chat_template` on conversational prompts, e.g. {"enable_thinking": False}."""
    chat_template_path: str | None = None
    """Replace the tokenizer's chat template (TRL's SFTConfig field): a .jinja/.j2 file, a tokenizer's directory or
    hub id whose template is copied, or a template grpo ships: "chatml_tools" (ChatML with Qwen2.5-style tool
    calls, for SmolLM2 and other ChatML models whose own template renders no tools). No tokens are added."""

    # ---- generation ----------------------------------------------------------------------------------------
    num_generations: int = 8
    """G: completions sampled per prompt. A group is the G completions of one prompt; must be >= 2."""
    generation_batch_size: int | None = None
    """Completions generated per generation round, across all devices. Default: per_device_train_batch_size x
    world size x steps_per_generation. Mutually exclusive with `steps_per_generation`."""
    steps_per_generation: int | None = None
    """Micro-steps served from one generation round (default: gradient_accumulation_steps)."""
    max_completion_length: int = 512
    """Maximum number of generated tokens per completion (TRL's current default, 512)."""
    temperature: float = 1.0
    """Sampling temperature. Training log-probs use the logits divided by it as well, as in TRL."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1.0: off)."""
    top_k: int = 0
    """Keep only the top_k most likely tokens (0: off)."""
    min_p: float | None = None
    """Keep tokens whose probability is at least min_p times the most likely one's (None: off)."""
    repetition_penalty: float = 1.0
    """Penalty on tokens already in the prompt or completion (1.0: off)."""
    generation_kwargs: dict[str, Any] | None = None
    """Extra generation arguments (transformers `GenerationConfig` names), overriding the fields above. The engine
    runs any logits processor or stopping criterion they ask for (no_repeat_ngram_size, bad_words_ids,
    min_new_tokens, stop_strings, typical_p, ...) through transformers' own; those that change the search itself
    (num_beams, assistant_model, ...: TRANSFORMERS_ONLY_GENERATION_KWARGS) switch to the transformers backend."""
    cache_implementation: str | None = None
    """A `generate` cache implementation ("static", ...); it switches to the transformers backend."""
    generation_backend: str = "engine"
    """"engine": grpo's rollout engine (one prefill per prompt shared by its G samples, KV-cached decoding,
    finished rows leave the batch). "transformers": `model.generate`, for comparison."""
    generation_max_batch_rows: int | None = None
    """Most rows (completions) the engine decodes at once; a larger round is generated in chunks of whole
    groups (None: the whole round). On CUDA an out-of-memory error halves the chunk and retries."""
    use_vllm: bool = False
    """Generate with vLLM. Not implemented yet: grpo generates with its own transformers-based backend."""

    # ---- the objective -------------------------------------------------------------------------------------
    num_iterations: int = 1
    """mu: optimisation passes over each generation round. > 1 makes the clipped ratio active."""
    beta: float = 0.0
    """KL coefficient against the reference model (k3 estimator). 0.0 loads no reference model."""
    epsilon: float = 0.2
    """Lower clip range: the ratio is clipped at 1 - epsilon."""
    epsilon_high: float | None = None
    """Upper clip range: the ratio is clipped at 1 + epsilon_high (None: same as epsilon; DAPO uses 0.28)."""
    loss_type: str = "dapo"
    """The objective (formulas and papers in docs/objectives.md). Clipped surrogate aggregated as: "dapo" (token
    mean over the optimizer step, default), "grpo" (sequence mean of token means), "dr_grpo" (token sum /
    (sequences x max_completion_length)), "bnpo" (token mean; over the step here, so the same as "dapo"),
    "luspo" (each sequence's loss times its length, sequence mean). "cispo": capped, detached IS weight times
    logp (epsilon_high is the cap), token mean. "sapo": soft sigmoid gate instead of the clip, sequence mean.
    "vespo": a detached gamma weight of the sequence ratio times logp, token mean."""
    importance_sampling_level: str = "token"
    """"token": one policy ratio per token. "sequence" (GSPO): one per completion, exp of the masked mean log
    ratio, shared by its tokens."""
    delta: float | None = None
    """Two-sided clip (INTELLECT-2): the unclipped ratio is capped at delta. Must be > 1 + epsilon_high; only for
    the clipped loss types (None: off)."""
    sapo_temperature_pos: float = 1.0
    """SAPO gate temperature for tokens with a positive advantage."""
    sapo_temperature_neg: float = 1.05
    """SAPO gate temperature for tokens with a zero or negative advantage."""
    vespo_k_pos: float = 2.0
    """VESPO: shape k of the gamma weight for completions with A >= 0."""
    vespo_lambda_pos: float = 3.0
    """VESPO: rate lambda of the gamma weight for completions with A >= 0."""
    vespo_k_neg: float = 3.0
    """VESPO: shape k for completions with A < 0."""
    vespo_lambda_neg: float = 2.0
    """VESPO: rate lambda for completions with A < 0."""
    off_policy_mask_threshold: float | None = None
    """DeepSeek-V3.2 off-policy sequence masking: a completion with A < 0 whose mean token KL(pi_old || pi_theta)
    exceeds this leaves the policy loss (None: off; the paper's delta, e.g. 0.5)."""
    use_bias_correction_kl: bool = True
    """DeepSeek-V3.2's unbiased KL: the k3 term is multiplied by the importance ratio (value 1 on-policy, but its
    gradient is not 0), as TRL does by default. Only matters with beta > 0."""
    scale_rewards: str | bool = "group"
    """Divide advantages by the group's reward std ("group", also True), the whole round's ("batch"), or not
    at all ("none", also False; Dr. GRPO)."""
    multi_objective_aggregation: str = "sum_then_normalize"
    """With several reward functions: "sum_then_normalize" (weighted sum, then group advantages per
    scale_rewards) or "normalize_then_sum" (GDPO: each reward normalised within its group, weighted sum, then
    normalised over the round; scale_rewards is ignored)."""
    reward_weights: list[float] | None = None
    """One weight per reward function for their weighted sum (None: all 1.0)."""
    reward_timeout: float | None = None
    """Seconds one reward-function call may run (not in TRL; None: no limit). A call past it is stopped and
    reported with the function's name: in a worker process (reward_num_workers > 0) the process is killed and
    replaced; in the trainer's process the call is abandoned in a background thread, where it may keep running;
    an async function is cancelled. What follows is reward_error's choice."""
    reward_error: str = "raise"
    """What a failed reward call does (not in TRL): "raise" stops the run with the function, its error and the
    failing completion; "none" scores that call's completions None (not applicable), prints the error and logs
    rewards/<func>/errors, the completions of the round it failed on, so a long run survives a flaky verifier. A
    failure is an exception, a timeout, a worker process that died, or a return value the contract refuses."""
    reward_num_workers: int = 0
    """Worker processes for synchronous reward functions (not in TRL; 0: they run in the trainer's process). Each
    function's completions are split into this many chunks of whole groups, scored in parallel and put back in
    order; async functions and reward models stay in the trainer's process. Functions must be picklable: defined
    at a module's top level, not lambdas or local functions."""
    mask_truncated_completions: bool = False
    """DAPO overlong filtering: completions that hit max_completion_length without EOS are left out of the loss
    (and of the loss normaliser)."""
    top_entropy_quantile: float = 1.0
    """rho: only tokens whose entropy is at or above the (1 - rho) quantile over the optimizer step keep their
    policy loss (80/20 rule; the paper uses 0.2). 1.0: every token. Costs one extra no-grad forward per step."""
    sync_ref_model: bool = False
    """TR-DPO: every ref_model_sync_steps optimizer steps, ref <- alpha x policy + (1 - alpha) x ref. Needs
    beta > 0 and no PEFT."""
    ref_model_mixup_alpha: float = 0.6
    """alpha of the reference-model update (sync_ref_model)."""
    ref_model_sync_steps: int = 512
    """Optimizer steps between reference-model updates (sync_ref_model)."""
    entropy_coef: float = 0.0
    """Entropy bonus: the loss minus entropy_coef x the mean token entropy over the optimizer step (0: off). With
    use_adaptive_entropy, the starting coefficient."""
    use_adaptive_entropy: bool = False
    """Skywork-OR1's controller: after each optimizer step the coefficient moves by entropy_coef_delta, up when the
    step's mean entropy is at or below entropy_target and down otherwise, within [entropy_coef_min,
    entropy_coef_max]; the bonus applies only while the last step's entropy is at or below the target."""
    entropy_coef_min: float = 0.0
    """Lower bound of the adaptive entropy coefficient."""
    entropy_coef_max: float = 1.0
    """Upper bound of the adaptive entropy coefficient."""
    entropy_coef_delta: float = 0.005
    """Step of the adaptive entropy coefficient per optimizer step."""
    entropy_target: float = 0.2
    """Target mean token entropy (nats) of the adaptive controller."""
    dynamic_sampling: bool = False
    """DAPO dynamic sampling (not in TRL): groups whose rewards are all equal are dropped and more prompts are
    generated until the round is full again, for at most max_dynamic_sampling_rounds extra generations; the
    round is then topped up with dropped groups (advantage 0), so its size never changes."""
    max_dynamic_sampling_rounds: int = 3
    """Most extra generation rounds dynamic sampling may run per training round."""

    # ---- tools and environments (docs/tools.md) ------------------------------------------------------------
    max_tool_calling_iterations: int | None = None
    """Most tool turns per completion (`tools=` or `environment_factory=`): after that many, a turn's calls are not
    run and the completion ends. None: no limit (within max_completion_length); 0: tools are described to the
    model but never run."""
    tool_timeout: float = 10.0
    """Seconds a tool call may run (not in TRL). A call past it is cut off: the model gets an error as the tool's
    result and the call counts as a failure (an async tool is cancelled, a sync one abandoned in its thread)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> GRPOConfig:
        _reject_unknown_fields(cls, kwargs)
        return super().__new__(cls)

    def __post_init__(self) -> None:
        refused = refused_values(self)
        if refused:
            raise ValueError(" ".join(refused) + " (docs/trl_fields.md lists every TRL field's status.)")
        if self.scale_rewards is True:
            self.scale_rewards = "group"
        elif self.scale_rewards is False:
            self.scale_rewards = "none"
        _check_choice("loss_type", self.loss_type, LOSS_TYPES)
        _check_choice("scale_rewards", self.scale_rewards, SCALE_REWARDS)
        _check_choice("importance_sampling_level", self.importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
        _check_choice("multi_objective_aggregation", self.multi_objective_aggregation, MULTI_OBJECTIVE_AGGREGATIONS)
        _check_choice("generation_backend", self.generation_backend, GENERATION_BACKENDS)
        for name in ("logging_strategy", "eval_strategy", "save_strategy"):
            _check_strategy(self, name)
        _check_choice("reward_error", self.reward_error, REWARD_ERROR_POLICIES)
        _check_optimizer(self.optim)
        if self.num_generations_eval is None:
            self.num_generations_eval = self.num_generations
        if self.eval_steps is None and self.eval_strategy == "steps":  # as transformers: unset when not evaluating
            self.eval_steps = self.logging_steps
        _check_choice("lr_scheduler_type", self.lr_scheduler_type, LR_SCHEDULERS)
        if isinstance(self.report_to, str):
            self.report_to = [] if self.report_to == "none" else [self.report_to]
        elif self.report_to is None:
            self.report_to = []
        self.report_to = [t for t in self.report_to if t != "none"]
        if self.epsilon_high is None:
            self.epsilon_high = self.epsilon
        if self.trust_remote_code:
            self.model_init_kwargs = {**(self.model_init_kwargs or {}), "trust_remote_code": True}
        self._check_ranges()
        self._check_objective()
        self._check_best_model()
        self._derive_batch_geometry()
        self._choose_generation_backend()
        if self.use_vllm and importlib.util.find_spec("vllm") is None:
            raise ValueError(
                "GRPOConfig.use_vllm=True but vLLM is not installed. Install it with `pip install vllm` "
                "(CUDA machines only), or set use_vllm=False to use grpo's built-in generation."
            )

    def check_evaluation_batch(self) -> None:
        """Evaluation batches must hold whole groups. Checked where evaluation is configured (the trainer, with an
        eval_dataset and eval_strategy != "no", and `evaluate()`), as TRL does, not for every config."""
        if self.num_generations_eval < 1 or self.per_device_eval_batch_size % self.num_generations_eval:
            raise ValueError(
                f"GRPOConfig.per_device_eval_batch_size={self.per_device_eval_batch_size} must be a multiple of "
                f"num_generations_eval={self.num_generations_eval} (>= 1), so that evaluation batches hold whole "
                "groups. Change one of them."
            )

    def _check_best_model(self) -> None:
        """transformers' rules for load_best_model_at_end, and its defaults for the metric that ranks checkpoints."""
        if self.load_best_model_at_end:
            if self.eval_strategy == "no" or self.save_strategy != self.eval_strategy:
                raise ValueError(
                    "GRPOConfig.load_best_model_at_end=True needs evaluations to rank checkpoints: set "
                    f"eval_strategy and save_strategy both to 'steps' (got {self.eval_strategy!r} and "
                    f"{self.save_strategy!r})."
                )
            if self.eval_steps >= 1 and self.save_steps >= 1 and self.save_steps % self.eval_steps:
                raise ValueError(
                    f"GRPOConfig.load_best_model_at_end=True needs save_steps ({self.save_steps}) to be a multiple of "
                    f"eval_steps ({self.eval_steps}), so that every checkpoint has an evaluation."
                )
            if self.metric_for_best_model is None:
                self.metric_for_best_model = "loss"
        if self.greater_is_better is None and self.metric_for_best_model is not None:
            self.greater_is_better = not self.metric_for_best_model.endswith("loss")

    def _choose_generation_backend(self) -> None:
        """Refuse generation_kwargs that are no GenerationConfig name; switch to transformers' generate for those
        the engine cannot run, with a one-line notice."""
        kwargs = self.generation_kwargs or {}
        for name, known in unknown_generation_kwargs(kwargs):
            raise ValueError(f"GRPOConfig.generation_kwargs: '{name}' is not a transformers GenerationConfig "
                             f"name.{did_you_mean(name, known)}")
        if kwargs.get("num_return_sequences", 1) != 1:
            raise ValueError("GRPOConfig.generation_kwargs: num_return_sequences would break the groups; "
                             "num_generations sets how many completions each prompt gets.")
        needs_generate = generation_kwargs_needing_generate(kwargs, self.cache_implementation)
        if needs_generate and self.generation_backend == "engine":
            self.generation_backend = "transformers"
            warnings.warn(f"grpo: {needs_generate} need transformers' generate; using generation_backend="
                          "'transformers' instead of grpo's rollout engine.", stacklevel=4)

    def _check_ranges(self) -> None:
        positive_ints = ("per_device_train_batch_size", "gradient_accumulation_steps", "num_iterations",
                         "max_completion_length", "max_consecutive_nonfinite_steps")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GRPOConfig.{name} must be a positive integer, got {value!r}.")
        for name in ("logging_steps", "eval_steps", "save_steps"):  # as in transformers: < 1 is a fraction
            value = getattr(self, name)
            if value is None and name == "eval_steps":
                continue
            if not (isinstance(value, (int, float)) and (0 < value < 1 or (value >= 1 and value == int(value)))):
                raise ValueError(f"GRPOConfig.{name} must be a positive integer or a fraction of max_steps in "
                                 f"(0, 1), got {value!r}.")
            setattr(self, name, int(value) if value >= 1 else value)
        if not isinstance(self.num_generations, int) or self.num_generations < 2:
            raise ValueError(
                f"GRPOConfig.num_generations={self.num_generations!r}: GRPO compares completions within a "
                "group, so it needs at least 2 per prompt. Set num_generations to 2 or more (8 is TRL's default)."
            )
        for name in ("save_total_limit", "max_tokens_per_micro_batch"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"GRPOConfig.{name} must be None or a positive integer, got {value!r}.")
        if not isinstance(self.reward_num_workers, int) or self.reward_num_workers < 0:
            raise ValueError(
                f"GRPOConfig.reward_num_workers must be an integer >= 0 (0 scores in the trainer's process), got "
                f"{self.reward_num_workers!r}."
            )
        if self.reward_timeout is not None and not self.reward_timeout > 0:
            raise ValueError(
                f"GRPOConfig.reward_timeout must be None (no limit) or a number of seconds > 0, got "
                f"{self.reward_timeout!r}."
            )
        if self.max_tool_calling_iterations is not None and (
                not isinstance(self.max_tool_calling_iterations, int) or self.max_tool_calling_iterations < 0):
            raise ValueError(f"GRPOConfig.max_tool_calling_iterations must be None (no limit) or an integer >= 0, got "
                             f"{self.max_tool_calling_iterations!r}.")
        if not self.tool_timeout > 0:
            raise ValueError(f"GRPOConfig.tool_timeout must be a number of seconds > 0, got {self.tool_timeout!r}.")
        if self.temperature <= 0:
            raise ValueError(f"GRPOConfig.temperature must be > 0, got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"GRPOConfig.top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < 0:
            raise ValueError(f"GRPOConfig.top_k must be >= 0 (0 disables it), got {self.top_k}.")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ValueError(f"GRPOConfig.min_p must be in [0, 1] or None, got {self.min_p}.")
        if self.beta < 0 or self.epsilon < 0 or self.epsilon_high < 0:
            raise ValueError("GRPOConfig.beta, epsilon and epsilon_high must be >= 0.")
        if self.learning_rate < 0:
            raise ValueError(f"GRPOConfig.learning_rate must be >= 0, got {self.learning_rate}.")
        if self.warmup_steps < 0 or not 0 <= self.warmup_ratio <= 1:
            raise ValueError("GRPOConfig.warmup_steps must be >= 0 and warmup_ratio in [0, 1].")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ValueError("Set GRPOConfig.max_steps > 0 or num_train_epochs > 0: there is nothing to train.")
        if self.report_to == ["all"]:  # transformers' meaning: every tracker that is installed
            self.report_to = [t for t, (module, _) in TRACKER_MODULES.items() if importlib.util.find_spec(module)]
        for tracker in self.report_to:
            if tracker not in TRACKER_MODULES:
                raise ValueError(
                    f"GRPOConfig.report_to: unknown tracker '{tracker}'; use any of {list(TRACKER_MODULES)}, 'all' or "
                    f"'none'.{did_you_mean(tracker, list(TRACKER_MODULES))}"
                )
            module, extra = TRACKER_MODULES[tracker]
            if importlib.util.find_spec(module) is None:
                raise ValueError(f"GRPOConfig.report_to='{tracker}' needs {module}: pip install 'grpo[{extra}]'.")

    def _check_objective(self) -> None:
        if self.delta is not None:
            if self.loss_type not in CLIPPED_LOSS_TYPES:
                raise ValueError(
                    f"GRPOConfig.delta caps the ratio of the clipped surrogate; loss_type={self.loss_type!r} has no "
                    f"clip. Use delta with one of {list(CLIPPED_LOSS_TYPES)}, or set delta=None."
                )
            if self.delta <= 1 + self.epsilon_high:
                raise ValueError(
                    f"GRPOConfig.delta={self.delta} must be > 1 + epsilon_high = {1 + self.epsilon_high}: a smaller "
                    "cap does nothing for negative advantages and only tightens the clip for positive ones."
                )
        if self.entropy_coef < 0:
            raise ValueError(f"GRPOConfig.entropy_coef must be >= 0 (0 turns the bonus off), got {self.entropy_coef}.")
        for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
            if getattr(self, name) <= 0:
                raise ValueError(f"GRPOConfig.{name} must be > 0, got {getattr(self, name)}.")
        if not 0 < self.top_entropy_quantile <= 1:
            raise ValueError(
                f"GRPOConfig.top_entropy_quantile must be in (0, 1] (the fraction of highest-entropy tokens kept; "
                f"1.0 keeps all), got {self.top_entropy_quantile}."
            )
        if not 0 <= self.ref_model_mixup_alpha <= 1:
            raise ValueError(f"GRPOConfig.ref_model_mixup_alpha must be in [0, 1], got {self.ref_model_mixup_alpha}.")
        if not isinstance(self.ref_model_sync_steps, int) or self.ref_model_sync_steps < 1:
            raise ValueError(
                f"GRPOConfig.ref_model_sync_steps must be a positive integer, got {self.ref_model_sync_steps!r}."
            )
        if self.sync_ref_model and self.beta == 0:
            raise ValueError(
                "GRPOConfig.sync_ref_model=True updates the reference model, but beta=0 uses none. Set beta > 0 "
                "(e.g. 0.04), or sync_ref_model=False."
            )
        if not isinstance(self.max_dynamic_sampling_rounds, int) or self.max_dynamic_sampling_rounds < 0:
            raise ValueError(
                "GRPOConfig.max_dynamic_sampling_rounds must be an integer >= 0, got "
                f"{self.max_dynamic_sampling_rounds!r}."
            )
        for name in ("vespo_lambda_pos", "vespo_lambda_neg", "entropy_coef_delta"):
            if getattr(self, name) < 0:
                raise ValueError(f"GRPOConfig.{name} must be >= 0, got {getattr(self, name)}.")
        if self.use_adaptive_entropy and not self.entropy_coef_min <= self.entropy_coef_max:
            raise ValueError(f"GRPOConfig.entropy_coef_min={self.entropy_coef_min} must be <= entropy_coef_max="
                             f"{self.entropy_coef_max}.")
        if self.off_policy_mask_threshold is not None and self.off_policy_mask_threshold < 0:
            raise ValueError("GRPOConfig.off_policy_mask_threshold is a KL bound: None (off) or >= 0 (the paper "
                             f"uses 0.5), got {self.off_policy_mask_threshold}.")
        if self.loss_type == "vespo" and self.importance_sampling_level != "token":
            warnings.warn("loss_type='vespo' computes its own sequence-level weight; importance_sampling_level "
                          "only changes the clip-ratio metrics. Leave it at 'token', as TRL advises.", stacklevel=4)
        if self.loss_type == "cispo" and self.epsilon_high < 1:
            warnings.warn(
                f"loss_type='cispo' caps the importance weight at epsilon_high={self.epsilon_high}, below 1: every "
                "token's gradient is scaled down. CISPO papers use epsilon_high around 5.0.", stacklevel=4
            )

    def _derive_batch_geometry(self) -> None:
        """TRL's batch geometry: generation_batch_size = per_device_train_batch_size x world x spg."""
        per_step = self.per_device_train_batch_size * self.world_size
        if self.generation_batch_size is not None and self.steps_per_generation is not None:
            raise ValueError(
                "GRPOConfig.generation_batch_size and steps_per_generation describe the same thing; set only one."
            )
        if self.generation_batch_size is None:
            if self.steps_per_generation is None:
                self.steps_per_generation = self.gradient_accumulation_steps
            self.generation_batch_size = per_step * self.steps_per_generation
        else:
            if self.generation_batch_size % per_step != 0:
                raise ValueError(
                    f"GRPOConfig.generation_batch_size={self.generation_batch_size} must be a multiple of "
                    f"per_device_train_batch_size x world size = {per_step}."
                )
            self.steps_per_generation = self.generation_batch_size // per_step
        if self.generation_batch_size % self.num_generations != 0:
            raise ValueError(self._indivisible_round_message())
        local_rows = self.generation_batch_size // self.world_size
        if self.world_size > 1 and local_rows % self.num_generations != 0:
            raise ValueError(
                f"With {self.world_size} processes each generates {local_rows} completions a round "
                f"(per_device_train_batch_size x steps_per_generation), which must be whole groups of "
                f"num_generations={self.num_generations}: make per_device_train_batch_size x steps_per_generation "
                f"a multiple of {self.num_generations}."
            )
        passes = self.steps_per_generation * self.num_iterations
        if passes % self.gradient_accumulation_steps != 0:
            raise ValueError(
                f"steps_per_generation x num_iterations = {self.steps_per_generation} x {self.num_iterations} = "
                f"{passes} micro-steps per generation round must be a multiple of gradient_accumulation_steps="
                f"{self.gradient_accumulation_steps}, so that an optimizer step never spans two rounds (its loss "
                "normaliser is counted over the whole step). Set steps_per_generation to a multiple of "
                f"{self.gradient_accumulation_steps}, or leave it unset."
            )

    def _indivisible_round_message(self) -> str:
        gbs, g = self.generation_batch_size, self.num_generations
        group_sizes = [d for d in range(2, gbs + 1) if gbs % d == 0][:6]
        batch_sizes = [b for b in range(1, 4 * g + 1) if (b * self.world_size * self.steps_per_generation) % g == 0]
        return (
            f"The generation batch of {gbs} completions (per_device_train_batch_size="
            f"{self.per_device_train_batch_size} x world size {self.world_size} x steps_per_generation="
            f"{self.steps_per_generation}) does not divide into groups of num_generations={g}. Fix it by setting "
            f"num_generations to one of {group_sizes}, or per_device_train_batch_size to one of "
            f"{batch_sizes[:4]}, or generation_batch_size to a multiple of {g}."
        )

    # ---- derived quantities --------------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return int(os.environ.get("WORLD_SIZE", "1"))

    @property
    def prompts_per_generation(self) -> int:
        """Unique prompts per generation round."""
        return self.generation_batch_size // self.num_generations

    @property
    def steps_per_round(self) -> int:
        """Optimizer steps taken from one generation round (all num_iterations passes)."""
        return self.steps_per_generation * self.num_iterations // self.gradient_accumulation_steps

    @property
    def needs_old_logps(self) -> bool:
        """The policy changes within a round only if the round feeds more than one optimizer step."""
        return self.steps_per_round > 1

    @property
    def sampling_params(self) -> SamplingParams:
        """The sampling settings: each generation field, unless generation_kwargs overrides it."""
        return SamplingParams.resolve(
            dict(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                 repetition_penalty=self.repetition_penalty, max_new_tokens=self.max_completion_length,
                 cache_implementation=self.cache_implementation),
            self.generation_kwargs or {},
        )

    def warmup_steps_for(self, total_steps: int) -> int:
        if self.warmup_steps >= 1:
            return int(self.warmup_steps)
        ratio = self.warmup_steps if self.warmup_steps > 0 else self.warmup_ratio
        return math.ceil(ratio * total_steps)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _reject_unknown_fields(cls: type, kwargs: dict[str, Any]) -> None:
    names = [f.name for f in dataclasses.fields(cls)]
    for key in kwargs:
        if key in names:
            continue
        if key in REMOVED_FIELDS:
            raise TypeError(f"GRPOConfig got '{key}': {REMOVED_FIELDS[key]}.")
        raise TypeError(f"GRPOConfig got an unknown field '{key}'.{did_you_mean(key, names)}")


__all__ = [
    "GRPOConfig", "IMPORTANCE_SAMPLING_LEVELS", "LOSS_TYPES", "MULTI_OBJECTIVE_AGGREGATIONS", "REWARD_ERROR_POLICIES",
    "SCALE_REWARDS", "SamplingParams",
]
