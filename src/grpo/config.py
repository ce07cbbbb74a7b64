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

LOSS_TYPES = ("dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo", "luspo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
MULTI_OBJECTIVE_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
CLIPPED_LOSS_TYPES = ("dapo", "grpo", "dr_grpo", "bnpo", "luspo")  # the loss types `delta` applies to
SCALE_REWARDS = ("group", "batch", "none")
REWARD_ERROR_POLICIES = ("raise", "none")
GENERATION_BACKENDS = ("engine", "transformers")
# generation_kwargs the built-in engine understands; the transformers backend takes any GenerationConfig name.
ENGINE_GENERATION_KWARGS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "do_sample",
                            "max_new_tokens", "eos_token_id", "suppress_tokens")
LR_SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay",
)
# report_to name -> (module it needs, pip extra that brings it)
TRACKER_MODULES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
                   "trackio": ("trackio", "trackio")}

# Fields of TRL's GRPOConfig / transformers' TrainingArguments that users pass and that grpo does not implement
# yet. Passing one is an error that says so, rather than a "did you mean" for a name the user spelled right.
NOT_YET_SUPPORTED = (
    "save_only_model", "push_to_hub",
    "hub_model_id", "fp16", "deepspeed", "fsdp", "fsdp_config", "optim", "logging_dir", "logging_first_step",
    "use_adaptive_entropy", "entropy_coef_min", "entropy_coef_max", "entropy_coef_delta",
    "entropy_target", "off_policy_mask_threshold", "use_bias_correction_kl", "vespo_k_pos", "vespo_lambda_pos",
    "vespo_k_neg", "vespo_lambda_neg", "vllm_importance_sampling_correction", "vllm_importance_sampling_mode",
    "vllm_importance_sampling_clip_max", "vllm_importance_sampling_clip_min", "vllm_mode",
    "vllm_gpu_memory_utilization",
    "vllm_server_base_url", "vllm_server_host", "vllm_server_port", "use_liger_kernel", "cast_lm_head_to_fp32",
    "pad_to_multiple_of", "cache_implementation", "log_unique_prompts",
    "torch_compile", "dataloader_num_workers", "use_transformers_continuous_batching",
)
# Fields TRL has removed; old course code still passes them.
REMOVED_IN_TRL = {
    "max_prompt_length": "TRL removed it in v0.28 and grpo never truncates prompts: filter long prompts from "
    "the dataset instead",
    "use_liger_loss": "TRL renamed it use_liger_kernel, which grpo does not implement yet",
}


def did_you_mean(name: str, candidates: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def _check_choice(field_name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(
            f"GRPOConfig.{field_name}={value!r} is not one of {list(choices)}.{did_you_mean(str(value), choices)}"
        )


@dataclass(frozen=True)
class SamplingParams:
    """How completions are sampled: GRPOConfig's generation fields with `generation_kwargs` applied over them, as in
    TRL. Every generation backend takes one (`GRPOConfig.sampling_params`); the named fields are the
    generation_kwargs the built-in engine understands (ENGINE_GENERATION_KWARGS)."""

    temperature: float
    top_k: int  # 0: off
    top_p: float
    min_p: float | None
    repetition_penalty: float
    do_sample: bool
    max_new_tokens: int
    eos_token_id: int | list[int] | None  # None: the tokenizer's
    suppress_tokens: list[int] | None  # None: the model's generation config's
    other_generation_kwargs: dict[str, Any]  # any other GenerationConfig names: the transformers backend only

    @property
    def greedy(self) -> bool:
        return self.do_sample is False or self.top_k == 1


@dataclass
class GRPOConfig:
    """Configuration of a GRPO run. Field names, defaults and meanings follow TRL's `GRPOConfig`."""

    # ---- where the run goes --------------------------------------------------------------------------------
    output_dir: str = "trainer_output"
    """Run directory: resolved config (`config.json`), `metrics.jsonl` and the final model are written here."""
    run_name: str | None = None
    """A display name for the run (defaults to the output directory's name)."""
    report_to: str | list[str] = "none"
    """Trackers that get the same metrics as `metrics.jsonl` (always written): "tensorboard", "wandb" (set
    WANDB_MODE=offline to log without network), "trackio", a list of them, "all" (every installed one) or "none"."""
    logging_steps: int = 10
    """Log averaged metrics every this many optimizer steps (TRL's default is 10)."""
    log_completions: bool = False
    """At every logging step, append the last round's prompts, completions, rewards and advantages to
    `completions.jsonl` in the run directory and print them as a table."""
    num_completions_to_print: int | None = None
    """How many rows `log_completions` prints (None: all rows of the last generation round)."""
    disable_tqdm: bool = False
    """Turn off the progress bar."""
    eval_strategy: str = "no"
    """"steps": evaluate on `eval_dataset` every `eval_steps` optimizer steps (and after the last), logging
    eval_reward, eval_rewards/<func>/mean and eval_pass@1 (weighted reward >= 1); "no": never."""
    eval_steps: int | None = None
    """Optimizer steps between evaluations (None: logging_steps)."""
    save_strategy: str = "steps"
    """"steps": write a checkpoint every `save_steps` optimizer steps and after the last one; "no": never."""
    save_steps: int = 500
    """Optimizer steps between checkpoints."""
    save_total_limit: int | None = None
    """Keep at most this many checkpoints (the oldest go first); None keeps all."""
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
    bf16: bool | None = None
    """bfloat16 autocast for forward passes. None (TRL: True) means on where the device supports bf16 (CUDA
    with bf16 support), off on CPU, where it is slower than float32."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass to save memory (TRL's default is True)."""
    gradient_checkpointing_kwargs: dict[str, Any] | None = None
    """Arguments for `gradient_checkpointing_enable` (default {"use_reentrant": False})."""
    use_cpu: bool = False
    """Train on the CPU even when a GPU is available."""

    # ---- model and data ------------------------------------------------------------------------------------
    model_init_kwargs: dict[str, Any] | None = None
    """Keyword arguments for `AutoModelForCausalLM.from_pretrained` when `model` is a string (e.g. {"dtype":
    "bfloat16"}). Also used for reward models given as strings."""
    trust_remote_code: bool = False
    """Allow model, tokenizer and reward-model code from the checkpoint's repository (transformers'
    trust_remote_code); it is added to model_init_kwargs."""
    disable_dropout: bool = False
    """Turn off dropout in the policy (and reference) model so log-probs are deterministic."""
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
    """Extra generation arguments (transformers `GenerationConfig` names). They override the fields above."""
    generation_backend: str = "engine"
    """"engine": grpo's rollout engine (one prefill per prompt shared by its G samples, KV-cached decoding,
    finished rows leave the batch). "transformers": `model.generate`, for comparison or for generation_kwargs
    the engine does not support."""
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
    logp (epsilon_high is the cap), token mean. "sapo": soft sigmoid gate instead of the clip, sequence mean."""
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
    """Entropy bonus: the loss minus entropy_coef x the mean token entropy over the optimizer step (0: off)."""
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
        if self.scale_rewards is True:
            self.scale_rewards = "group"
        elif self.scale_rewards is False:
            self.scale_rewards = "none"
        _check_choice("loss_type", self.loss_type, LOSS_TYPES)
        _check_choice("scale_rewards", self.scale_rewards, SCALE_REWARDS)
        _check_choice("importance_sampling_level", self.importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
        _check_choice("multi_objective_aggregation", self.multi_objective_aggregation, MULTI_OBJECTIVE_AGGREGATIONS)
        _check_choice("generation_backend", self.generation_backend, GENERATION_BACKENDS)
        _check_choice("eval_strategy", self.eval_strategy, ("no", "steps"))
        _check_choice("save_strategy", self.save_strategy, ("no", "steps"))
        _check_choice("reward_error", self.reward_error, REWARD_ERROR_POLICIES)
        if self.num_generations_eval is None:
            self.num_generations_eval = self.num_generations
        if self.eval_steps is None:
            self.eval_steps = self.logging_steps
        if self.num_generations_eval < 1 or self.per_device_eval_batch_size % self.num_generations_eval:
            raise ValueError(
                f"GRPOConfig.per_device_eval_batch_size={self.per_device_eval_batch_size} must be a multiple of "
                f"num_generations_eval={self.num_generations_eval} (>= 1), so that evaluation batches hold whole "
                "groups. Change one of them."
            )
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
        self._derive_batch_geometry()
        unknown = sorted(set(self.generation_kwargs or {}) - set(ENGINE_GENERATION_KWARGS))
        if self.generation_backend == "engine" and unknown:
            raise ValueError(
                f"GRPOConfig.generation_kwargs {unknown} are not supported by grpo's rollout engine (it supports "
                f"{list(ENGINE_GENERATION_KWARGS)}). Set generation_backend='transformers' to use them."
            )
        if self.use_vllm and importlib.util.find_spec("vllm") is None:
            raise ValueError(
                "GRPOConfig.use_vllm=True but vLLM is not installed. Install it with `pip install vllm` "
                "(CUDA machines only), or set use_vllm=False to use grpo's built-in generation."
            )

    def _check_ranges(self) -> None:
        positive_ints = ("per_device_train_batch_size", "gradient_accumulation_steps", "num_iterations",
                         "max_completion_length", "logging_steps", "save_steps", "max_consecutive_nonfinite_steps")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GRPOConfig.{name} must be a positive integer, got {value!r}.")
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
        overrides = self.generation_kwargs or {}
        return SamplingParams(
            temperature=overrides.get("temperature", self.temperature),
            top_k=overrides.get("top_k", self.top_k) or 0,
            top_p=overrides.get("top_p", self.top_p),
            min_p=overrides.get("min_p", self.min_p),
            repetition_penalty=overrides.get("repetition_penalty", self.repetition_penalty),
            do_sample=overrides.get("do_sample", True),
            max_new_tokens=overrides.get("max_new_tokens", self.max_completion_length),
            eos_token_id=overrides.get("eos_token_id"),
            suppress_tokens=overrides.get("suppress_tokens"),
            other_generation_kwargs={k: v for k, v in overrides.items() if k not in ENGINE_GENERATION_KWARGS},
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
        if key in REMOVED_IN_TRL:
            raise TypeError(f"GRPOConfig got '{key}': {REMOVED_IN_TRL[key]}.")
        if key in NOT_YET_SUPPORTED:
            raise TypeError(
                f"GRPOConfig got '{key}', a TRL/transformers option that grpo does not implement yet. Remove it "
                "(see the README's list of supported fields)."
            )
        raise TypeError(f"GRPOConfig got an unknown field '{key}'.{did_you_mean(key, names)}")


__all__ = [
    "GRPOConfig", "IMPORTANCE_SAMPLING_LEVELS", "LOSS_TYPES", "MULTI_OBJECTIVE_AGGREGATIONS", "REWARD_ERROR_POLICIES",
    "SCALE_REWARDS", "SamplingParams",
]
