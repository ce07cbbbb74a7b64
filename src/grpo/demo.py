"""`grpo demo`: a short GRPO run on a built-in task that shows the reward rise, with completions before and after.

The embedded tiny model (`grpo:tiny`) learns the plain-text tasks from random weights in seconds; a chat model
(`smollm2-135m-instruct`, or any instruct model) learns the chat tasks. Settings were tuned on 2 CPU cores.
"""

from __future__ import annotations

from typing import Any

from grpo.algorithm import combine_rewards
from grpo.config import GRPOConfig
from grpo.embedded import EMBEDDED_MODEL_ID, TASKS
from grpo.metrics import format_completions_table
from grpo.rewards import completion_text

DEMO_TASKS = ("length", "arithmetic", "format")
HELD_OUT_PROMPTS = 8  # the reward before and after is measured on 8 prompts of the task's eval split
# (chat model?, demo task) -> (built-in task, settings)
DEMOS: dict[tuple[bool, str], tuple[str, dict[str, Any]]] = {
    # the random-init tiny model needs a far higher learning rate than TRL's 1e-6 default; cosine: at a
    # constant 2e-3 the policy can overshoot late in the run (seed-dependent), a decaying rate holds
    (False, "length"): ("length", dict(num_generations=8, per_device_train_batch_size=16, max_completion_length=48,
                                       learning_rate=2e-3, max_steps=150, logging_steps=10,
                                       lr_scheduler_type="cosine")),
    (False, "arithmetic"): ("arithmetic", dict(num_generations=8, per_device_train_batch_size=32,
                                               max_completion_length=8, learning_rate=2e-3, max_steps=150,
                                               logging_steps=10)),
    # a step = 4 (length) or 2 prompts x 8 completions, in micro-batches of one group: the prompt is packed once
    # and activations stay near 1 GB without recomputation
    (True, "length"): ("chat_length", dict(num_generations=8, per_device_train_batch_size=8,
                                           gradient_accumulation_steps=4, max_completion_length=48,
                                           learning_rate=5e-5, max_steps=16, logging_steps=2)),
    (True, "arithmetic"): ("word_problems", dict(num_generations=8, per_device_train_batch_size=8,
                                                 gradient_accumulation_steps=2, max_completion_length=96,
                                                 learning_rate=2e-5, max_steps=40, logging_steps=2,
                                                 temperature=0.7)),
    (True, "format"): ("format", dict(num_generations=8, per_device_train_batch_size=8,
                                      gradient_accumulation_steps=2, max_completion_length=96,
                                      learning_rate=3e-5, max_steps=20, logging_steps=2)),
}


def demo_plan(model: str, task: str) -> tuple[str, dict[str, Any]]:
    """The built-in task and settings of `grpo demo --model MODEL --task TASK`."""
    chat = model != EMBEDDED_MODEL_ID
    if (chat, task) not in DEMOS:
        raise ValueError(f"the '{task}' demo needs a chat model: add --model smollm2-135m-instruct (or another "
                         f"instruct model); the embedded tiny model runs {[t for c, t in DEMOS if not c]}.")
    return DEMOS[chat, task]


def run_demo(task: str = "length", max_steps: int | None = None, output_dir: str | None = None, seed: int = 0,
             progress: bool = True, model: str = EMBEDDED_MODEL_ID) -> dict[str, Any]:
    """Train on a built-in task; returns the mean reward before and after on the same held-out prompts."""
    from grpo.trainer import GRPOTrainer

    task_name, settings = demo_plan(model, task)
    built_in = TASKS[task_name]
    settings = dict(settings)
    if max_steps is not None:
        settings["max_steps"] = max_steps
    suffix = "" if model == EMBEDDED_MODEL_ID else f"-{model.rstrip('/').split('/')[-1].removesuffix('.gguf')}"
    args = GRPOConfig(output_dir=output_dir or f"runs/demo-{task}{suffix}", seed=seed, gradient_checkpointing=False,
                      overwrite_output_dir=True,  # the demo is meant to be run again and again
                      disable_tqdm=not progress, reward_weights=built_in.reward_weights,
                      **{"lr_scheduler_type": "constant", **settings})
    trainer = GRPOTrainer(model=model, reward_funcs=built_in.reward_funcs, args=args,
                          train_dataset=built_in.make(256, seed=seed))
    rounds = max(1, HELD_OUT_PROMPTS // args.prompts_per_generation)
    held_out = list(built_in.make(args.prompts_per_generation * rounds, seed=seed, split="eval"))

    def measure(label: str) -> float:
        rewards, first_round = [], None
        for start in range(0, len(held_out), args.prompts_per_generation):
            rollout, metrics = trainer.generate_and_score(held_out[start:start + args.prompts_per_generation])
            rewards.append(metrics["reward"])
            first_round = first_round or (rollout, metrics)
        mean = sum(rewards) / len(rewards)
        rollout, metrics = first_round
        print(f"\n{label}: mean reward {mean:.3f} on {len(held_out)} held-out prompts x {args.num_generations}, "
              f"completions of {metrics['completions/mean_length']:.1f} tokens on average")
        rewards = combine_rewards(rollout.rewards_per_func, trainer.reward_weights)
        print(format_completions_table(_sample_rows(rollout, rewards, args.num_generations), None))
        return mean

    before = measure("Before training")
    trainer.train()
    after = measure("After training")
    print(f"\nReward {before:.3f} -> {after:.3f} ({after - before:+.3f}) after {trainer.state.global_step} steps. "
          f"Run directory: {args.output_dir} (grpo_config.json, metrics.jsonl, model)")
    return {"before": before, "after": after, "output_dir": args.output_dir, "state": trainer.state}


def _sample_rows(rollout: Any, rewards: Any, num_generations: int, groups: int = 4) -> list[dict[str, Any]]:
    """The first completion of the first few groups, with its length in tokens and in characters: a reward
    on characters can be gamed with tokens that print nothing, and the two counts side by side show it."""
    rows = []
    for i in range(0, min(len(rollout), groups * num_generations), num_generations):
        prompt, completion = rollout.prompts[i], rollout.completions[i]
        text = completion_text(completion)
        rows.append({"prompt": completion_text(prompt), "completion": text,
                     "tokens": int(rollout.completion_mask[i].sum()), "chars": len(text),
                     "reward": float(rewards[i])})
    return rows
