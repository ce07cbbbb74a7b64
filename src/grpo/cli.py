"""Command line: `grpo demo` shows GRPO learning on the embedded model; `grpo train` runs a YAML recipe;
`grpo serve-reward` puts a reward function behind HTTP."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from grpo.config import GRPOConfig
from grpo.embedded import EMBEDDED_MODEL_ID, TASKS
from grpo.metrics import format_completions_table

# Tuned on 2 CPU cores: the random-init tiny model needs a far higher learning rate than TRL's 1e-6 default.
DEMO_SETTINGS: dict[str, dict[str, Any]] = {
    # cosine: at a constant 2e-3 the policy can overshoot late in the run (seed-dependent); a decaying rate holds
    "length": dict(num_generations=8, per_device_train_batch_size=16, gradient_accumulation_steps=1,
                   max_completion_length=48, learning_rate=2e-3, max_steps=150, logging_steps=10,
                   lr_scheduler_type="cosine"),
    "arithmetic": dict(num_generations=8, per_device_train_batch_size=32, gradient_accumulation_steps=1,
                       max_completion_length=8, learning_rate=2e-3, max_steps=150, logging_steps=10),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grpo", description="Train language models with GRPO.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="train the embedded tiny model on a built-in task (offline, about a minute on a CPU)",
        description="Train the embedded tiny model on a built-in task and show the reward rise. Nothing is "
        "downloaded: the model is built offline from a fixed seed.",
    )
    demo.add_argument("--task", choices=sorted(TASKS), default="length",
                      help="length: the course's -|20 - len(completion)| reward; arithmetic: 'a+b=' answered "
                      "correctly (default: length)")
    demo.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: the task's setting)")
    demo.add_argument("--output-dir", default=None, help="run directory (default: runs/demo-<task>)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train = commands.add_parser(
        "train", help="train from a YAML recipe, with --field value overrides",
        description="Train with GRPO from a YAML recipe: model, dataset, reward_funcs and any GRPOConfig field "
        "(see examples/). Every setting can be overridden on the command line as --field value (values are "
        "read as YAML: --reward_weights '[1, 0.5]'). The resolved recipe is written to <output_dir>/run.yaml.",
        epilog="example: grpo train --config examples/length.yaml --learning_rate 1e-3 --max_steps 50",
    )
    train.add_argument("--config", help="YAML recipe file")
    train.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                       help="continue the run in output_dir from its latest checkpoint, or from CHECKPOINT")
    evaluate = commands.add_parser(
        "eval", help="mean reward and pass@k of a model on a dataset",
        description="Sample num_generations completions per prompt and report the mean reward, each reward "
        "function's mean and pass@k (a completion passes when its weighted reward >= --pass-threshold). Takes the "
        "same recipe as `grpo train` plus --field value overrides; --model points at the model to evaluate.",
        epilog="example: grpo eval --config examples/arithmetic.yaml --model runs/arithmetic --k 1 8",
    )
    evaluate.add_argument("--config", help="YAML recipe file (model, dataset, reward_funcs, generation settings)")
    evaluate.add_argument("--k", type=int, nargs="+", default=None, help="k values for pass@k (default: 1 and G)")
    evaluate.add_argument("--pass-threshold", type=float, default=1.0, help="reward that counts as a pass (1.0)")
    evaluate.add_argument("--num-prompts", type=int, default=None, help="evaluate only the first N prompts")
    evaluate.add_argument("--output", help="JSON file for the results (default: print only)")
    plot = commands.add_parser(
        "plot", help="PNG figures of one or more runs' metrics",
        description="Draw reward (with its std band), each reward function, kl, entropy, completion length, clip "
        "ratios, loss, grad norm and zero-spread groups over steps, from each RUN_DIR's metrics.jsonl. Several "
        "runs share each panel. Writes metrics.png and reward.png. Needs matplotlib (pip install 'grpo[plot]').",
    )
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories holding metrics.jsonl")
    plot.add_argument("--output", help="folder for the figures (default: the first RUN_DIR)")
    report = commands.add_parser(
        "report", help="one self-contained HTML page of a run: config, curves, sampled completions",
        description="Write RUN_DIR/report.html: the resolved config, every logged curve as inline SVG, and a "
        "browser of sampled completions by step (from completions.jsonl, written when training with "
        "log_completions=True). It needs no network to view.",
    )
    report.add_argument("run_dir", metavar="RUN_DIR", help="a run directory holding metrics.jsonl")
    report.add_argument("--output", help="HTML file to write (default: RUN_DIR/report.html)")
    serve = commands.add_parser(
        "serve-reward", help="serve a reward function over HTTP, for reward_funcs=['http://host:port/']",
        description="Run a reward function in a process of its own, behind HTTP: the trainer POSTs "
        '{"prompts": [...], "completions": [...], <column>: [...]} and reads {"rewards": [...]} back. Put a heavy '
        "verifier or a reward model here and give the trainer the URL as a reward function.",
        epilog="example: grpo serve-reward my_pkg.rewards:verify --port 8000, then reward_funcs: "
        "['http://127.0.0.1:8000/']",
    )
    serve.add_argument("function", help="a built-in reward name (e.g. math_accuracy) or 'package.module:function'")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on, 0 for any free one (default: 8000)")
    return parser


def parse_overrides(extra: list[str], command: str = "train") -> dict[str, str]:
    """`--field value` and `--field=value` pairs from the command line, values as raw strings."""
    overrides: dict[str, str] = {}
    i = 0
    while i < len(extra):
        token = extra[i]
        if not token.startswith("--"):
            raise SystemExit(f"grpo {command}: expected --field value, got {token!r}")
        key, has_value, value = token[2:].partition("=")
        if not has_value:
            if i + 1 >= len(extra) or extra[i + 1].startswith("--"):
                raise SystemExit(f"grpo {command}: --{key} needs a value")
            value, i = extra[i + 1], i + 1
        overrides[key.replace("-", "_")] = value
        i += 1
    return overrides


def run_train(config_path: str | None, overrides: dict[str, str], resume: str | bool | None = None) -> Any:
    """Resolve the recipe, record it in the run directory, train (or resume), and return the trainer state."""
    from pathlib import Path

    import yaml

    from grpo.checkpoint import prepare_output_dir
    from grpo.recipe import build_run, load_recipe
    from grpo.trainer import GRPOTrainer

    recipe = load_recipe(config_path, overrides)
    run = build_run(recipe)
    resolved = {key: recipe[key] for key in ("model", "dataset", "reward_funcs")} | run["args"].to_dict()
    trainer = GRPOTrainer(**run)
    args = run["args"]
    # run.yaml may only be written once it is sure that this run owns output_dir
    checkpoint = prepare_output_dir(args.output_dir, resume, args.overwrite_output_dir, trainer.resolved_config(),
                                    delete=trainer.processes.is_main)
    if trainer.processes.is_main:
        output_dir = Path(args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "run.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    return trainer.train(resume_from_checkpoint=checkpoint)


def run_demo(task: str = "length", max_steps: int | None = None, output_dir: str | None = None, seed: int = 0,
             progress: bool = True) -> dict[str, Any]:
    """Train on a built-in task; returns the mean reward before and after on the same held-out prompts."""
    import torch

    from grpo.trainer import GRPOTrainer

    make_dataset, reward_funcs = TASKS[task]
    settings = dict(DEMO_SETTINGS[task])
    if max_steps is not None:
        settings["max_steps"] = max_steps
    args = GRPOConfig(output_dir=output_dir or f"runs/demo-{task}", seed=seed, gradient_checkpointing=False,
                      overwrite_output_dir=True,  # the demo is meant to be run again and again
                      disable_tqdm=not progress, **{"lr_scheduler_type": "constant", **settings})
    trainer = GRPOTrainer(model=EMBEDDED_MODEL_ID, reward_funcs=reward_funcs, args=args,
                          train_dataset=make_dataset(256, seed=seed))
    held_out = list(make_dataset(args.prompts_per_generation * 4, seed=seed + 1000))

    def measure(label: str) -> float:
        rewards, tables = [], []
        for start in range(0, len(held_out), args.prompts_per_generation):
            rollout, metrics = trainer.generate_and_score(held_out[start:start + args.prompts_per_generation])
            rewards.append(metrics["reward"])
            tables.append(rollout)
        mean = sum(rewards) / len(rewards)
        sample = tables[0].select(torch.arange(0, len(tables[0]), args.num_generations)[:4])  # 4 groups' firsts
        print(f"\n{label}: mean reward {mean:.3f} on {len(held_out)} held-out prompts x {args.num_generations}")
        print(format_completions_table(
            [{"prompt": p, "completion": c, "reward": r.item()}
             for p, c, r in zip(sample.prompts, sample.completions, sample.rewards_per_func[:, 0])], None))
        return mean

    before = measure("Before training")
    trainer.train()
    after = measure("After training")
    print(f"\nReward {before:.3f} -> {after:.3f} ({after - before:+.3f}) after {trainer.state.global_step} steps. "
          f"Run directory: {args.output_dir} (grpo_config.json, metrics.jsonl, model)")
    return {"before": before, "after": after, "output_dir": args.output_dir, "state": trainer.state}


def run_eval(args: argparse.Namespace, overrides: dict[str, str]) -> dict[str, Any]:
    """Evaluate the recipe's model on its dataset; prints the results and writes them to --output."""
    import itertools
    import json

    from grpo.evaluate import evaluate
    from grpo.recipe import build_run, load_recipe
    from grpo.trainer import GRPOTrainer

    recipe = load_recipe(args.config, overrides)
    for key in ("generation_batch_size", "steps_per_generation", "gradient_accumulation_steps", "num_iterations"):
        recipe.pop(key, None)  # training geometry: evaluation only samples groups
    g = int(recipe.get("num_generations", 8))
    recipe.update(per_device_train_batch_size=g, max_steps=1, report_to="none")
    trainer = GRPOTrainer(**build_run(recipe))
    rows = list(itertools.islice(iter(trainer.train_source.dataset), args.num_prompts))
    results = evaluate(trainer, rows, ks=args.k or sorted({1, g}), pass_threshold=args.pass_threshold)
    text = json.dumps(results, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return results


def _plot(args: argparse.Namespace) -> None:
    from grpo.plot import plot_runs

    for path in plot_runs(args.run_dirs, args.output):
        print(path)


def _serve_reward(args: argparse.Namespace) -> None:
    from grpo.rewards.server import serve_reward

    serve_reward(args.function, args.host, args.port)


def _report(args: argparse.Namespace) -> None:
    from grpo.report import write_report

    print(write_report(args.run_dir, args.output))


COMMANDS = {
    "demo": lambda args, extra: run_demo(args.task, args.max_steps, args.output_dir, args.seed,
                                         progress=not args.no_progress),
    "train": lambda args, extra: run_train(args.config, parse_overrides(extra), args.resume),
    "eval": lambda args, extra: run_eval(args, parse_overrides(extra, "eval")),
    "plot": lambda args, extra: _plot(args),
    "report": lambda args, extra: _report(args),
    "serve-reward": lambda args, extra: _serve_reward(args),
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("train", "eval"):  # only these take --field value overrides
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        COMMANDS[args.command](args, extra)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, ImportError) as e:  # bad input: a message
        print(f"grpo {args.command}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
