"""GRPO training: grpo's GRPOTrainer against TRL's, same model, data, reward and config, in one invocation.

    pip install 'grpo[bench]'   # trl==1.16.0, for this script only
    python benchmarks/compare_trl.py [--models tiny small] [--steps 12] [--completion-lengths 64 512]
                                     [--memory-steps 2] [--device cpu|cuda]

For each offline model of benchmarks/models.py (saved with a word-level tokenizer of the model's vocabulary to a
temporary directory, so both trainers load the same weights) each trainer runs in its own subprocess, so that
peak memory is its own: peak RSS (ru_maxrss) on CPU, torch.cuda.max_memory_allocated on CUDA (bf16 autocast).
The first completion length runs --steps optimizer steps (timing and reward curves); each further length runs
--memory-steps steps to measure how peak memory grows with the completion length.

Task: G = 8 completions per prompt, max_completion_length from --completion-lengths, per_device_train_batch_size
8, gradient_accumulation_steps 2 (one 16-completion round per optimizer step, on-policy), beta 0, loss "dapo",
scale_rewards "group", temperature 1, top_p 1, top_k 0, AdamW at the same learning rate, seed, and gradient
checkpointing (both defaults). Reward: completion length / max_completion_length.
TRL generates with transformers `generate`; grpo with its own engine.

Step time is wall time per optimizer step, generation included (TRL: a callback around each step; grpo: the
`step_time` of metrics.jsonl); the tables report medians. Generated tokens/s = completion tokens / step time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from models import SIZES, build, prompts  # noqa: E402

ROWS_PER_STEP = 16  # per_device_train_batch_size 8 x gradient_accumulation_steps 2
TRAINERS = ("trl", "grpo")


# ---- the shared task -----------------------------------------------------------------------------------------
def build_tokenizer(vocab_size: int) -> Any:
    """A word-level PreTrainedTokenizerFast over exactly the model's vocabulary: <pad>=0 <s>=1 </s>=2 <unk>=3,
    then t4 ... t{V-1}. Adds <s> in front of every text, like the prompts of benchmarks/models.py."""
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


def save_model(size: str, directory: Path) -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()
    model = build(size)
    model.save_pretrained(directory)
    build_tokenizer(model.config.vocab_size).save_pretrained(directory)


def dataset(vocab_size: int, num: int = 256) -> Any:
    """Prompts of 8-40 random tokens (text of the word-level vocabulary; the tokenizer adds <s>)."""
    from datasets import Dataset

    texts = [" ".join(f"t{max(i, 4)}" for i in ids[1:]) for ids in prompts(num, vocab_size)]
    return Dataset.from_dict({"prompt": texts})


def length_reward(max_length: int) -> Any:
    """r = n / L for a completion of n tokens, L = max_completion_length: the model learns not to stop early, so
    both trainers end up generating and training on full-length completions, the same work per step."""

    def completion_length(completions: list[Any], completion_ids: list[list[int]], **kwargs: Any) -> list[float]:
        return [len(ids) / max_length for ids in completion_ids]

    return completion_length


def common_settings(opts: argparse.Namespace, length: int, steps: int, output_dir: str) -> dict[str, Any]:
    """The GRPOConfig fields both trainers get, with the same names."""
    cuda = opts.device == "cuda"
    return dict(output_dir=output_dir, max_steps=steps, per_device_train_batch_size=8, gradient_accumulation_steps=2,
                num_generations=8, max_completion_length=length, learning_rate=opts.learning_rate, seed=opts.seed,
                beta=0.0, loss_type="dapo", scale_rewards="group", temperature=1.0, top_p=1.0, top_k=0,
                num_iterations=1, epsilon=0.2, max_grad_norm=1.0, weight_decay=0.0, lr_scheduler_type="linear",
                gradient_checkpointing=True, logging_steps=1, report_to="none", disable_tqdm=True,
                bf16=cuda, use_cpu=not cuda, log_completions=False, shuffle_dataset=True)


# ---- the workers (one trainer per subprocess) ----------------------------------------------------------------
def run_trl(opts: argparse.Namespace, vocab_size: int, output_dir: str) -> list[dict[str, float]]:
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.started)

    timer = StepTimer()
    config = GRPOConfig(**common_settings(opts, opts.length, opts.steps, output_dir), use_vllm=False,
                        save_strategy="no")
    trainer = GRPOTrainer(model=opts.model_dir, reward_funcs=length_reward(opts.length), args=config,
                          train_dataset=dataset(vocab_size), callbacks=[timer])
    trainer.train()
    logs = [r for r in trainer.state.log_history if "reward" in r]
    return [dict(step_time=t, reward=r["reward"], completion_length=r["completions/mean_length"],
                 num_tokens=r["num_tokens"]) for t, r in zip(timer.times, logs)]


def run_grpo(opts: argparse.Namespace, vocab_size: int, output_dir: str) -> list[dict[str, float]]:
    from grpo import GRPOConfig, GRPOTrainer

    config = GRPOConfig(**common_settings(opts, opts.length, opts.steps, output_dir))
    trainer = GRPOTrainer(model=opts.model_dir, reward_funcs=length_reward(opts.length), args=config,
                          train_dataset=dataset(vocab_size))
    trainer.train()
    records = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    return [dict(step_time=r["step_time"], reward=r["reward"], completion_length=r["completions/mean_length"],
                 num_tokens=r["num_tokens"]) for r in records if "step_time" in r]


def worker(opts: argparse.Namespace) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoConfig
    from transformers.utils import logging

    logging.disable_progress_bar()

    config = AutoConfig.from_pretrained(opts.model_dir)
    with tempfile.TemporaryDirectory() as output_dir:
        steps = (run_trl if opts.worker == "trl" else run_grpo)(opts, config.vocab_size, output_dir)
    if opts.device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    Path(opts.result).write_text(json.dumps(dict(steps=steps, peak_mib=peak)))


# ---- the driver ----------------------------------------------------------------------------------------------
def run_worker(trainer: str, model_dir: Path, length: int, steps: int, opts: argparse.Namespace) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        command = [sys.executable, __file__, "--worker", trainer, "--model-dir", str(model_dir), "--length",
                   str(length), "--steps", str(steps), "--result", result.name, "--device", opts.device,
                   "--learning-rate", str(opts.learning_rate), "--seed", str(opts.seed)]
        command += ["--threads", str(opts.threads)] if opts.threads else []
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{trainer} worker failed:\n{done.stderr[-4000:]}")
        out = json.loads(Path(result.name).read_text())
    print(f"  {trainer:<5} L={length:<4} {steps} steps in {time.perf_counter() - started:.0f} s, "
          f"peak {out['peak_mib']:.0f} MiB", file=sys.stderr)
    return out


def pool(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Repeats of one (trainer, length) run: their steps pooled (with generated and trained tokens per step; the
    latter is prompt + completion tokens, from the running num_tokens), the reward curve averaged step by step,
    the largest peak memory."""
    steps = []
    for result in results:
        seen = [s["num_tokens"] for s in result["steps"]]
        for step, before, after in zip(result["steps"], [0.0] + seen[:-1], seen):
            steps.append(dict(step, trained=after - before, generated=step["completion_length"] * ROWS_PER_STEP))
    curves = [[s["reward"] for s in result["steps"]] for result in results]
    return dict(steps=steps, rewards=[statistics.mean(r) for r in zip(*curves)],
                times=[[s["step_time"] for s in result["steps"]] for result in results],
                peak_mib=max(result["peak_mib"] for result in results))


def steps_to_reach(rewards: list[float], target: float) -> int | None:
    """First optimizer step (1-based) whose reward is >= target (step 1's reward is that of the initial model)."""
    return next((i + 1 for i, r in enumerate(rewards) if r >= target), None)


def step_stats(steps: list[dict[str, float]]) -> dict[str, float]:
    """Medians of step time and of generated tokens / step time, means of generated and trained tokens."""
    return dict(step_time=statistics.median(s["step_time"] for s in steps),
                tokens_per_s=statistics.median(s["generated"] / s["step_time"] for s in steps),
                generated=statistics.mean(s["generated"] for s in steps),
                trained=statistics.mean(s["trained"] for s in steps))


def matmul_flops(device: str, size: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of a size x size matmul (float32 on CPU, bf16 on CUDA): 2 size^3 / seconds."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def model_flops(params: float, stats: dict[str, float]) -> float:
    """FLOPs of one optimizer step: 6 N T_train (policy forward + backward) + 2 N T_gen (generation). No extra
    no-grad pass here (on-policy, beta 0); recomputation by gradient checkpointing is not counted."""
    return 6 * params * stats["trained"] + 2 * params * stats["generated"]


def ratio(ours: float | None, theirs: float | None) -> str:
    return f"{ours / theirs:.2f}x" if ours is not None and theirs else "-"


def fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def report(size: str, params: float, runs: dict[tuple[str, int], dict[str, Any]], lengths: list[int],
           opts: argparse.Namespace) -> list[str]:
    main = {t: runs[(t, lengths[0])] for t in TRAINERS}
    stats = {t: step_stats(main[t]["steps"]) for t in TRAINERS}
    rewards = {t: main[t]["rewards"] for t in TRAINERS}
    k = max(1, min(opts.k, len(rewards["grpo"]) // 2))
    first = {t: statistics.mean(rewards[t][:k]) for t in TRAINERS}
    last = {t: statistics.mean(rewards[t][-k:]) for t in TRAINERS}
    reach = {t: steps_to_reach(rewards[t], opts.target) for t in TRAINERS}
    memory = "peak RSS" if opts.device == "cpu" else "peak CUDA memory"
    rows = [
        (f"median optimizer-step time (s), L={lengths[0]}", stats["trl"]["step_time"], stats["grpo"]["step_time"],
         ".2f"),
        ("optimizer steps / s", 1 / stats["trl"]["step_time"], 1 / stats["grpo"]["step_time"], ".3f"),
        ("generated tokens / s (completion tokens / step time)", stats["trl"]["tokens_per_s"],
         stats["grpo"]["tokens_per_s"], ".0f"),
        (f"{memory} (MiB), L={lengths[0]}", main["trl"]["peak_mib"], main["grpo"]["peak_mib"], ".0f"),
    ]
    for length in lengths[1:]:
        peaks = {t: runs[(t, length)]["peak_mib"] for t in TRAINERS}
        growth = {t: peaks[t] - main[t]["peak_mib"] for t in TRAINERS}
        rows += [(f"{memory} (MiB), L={length}", peaks["trl"], peaks["grpo"], ".0f"),
                 (f"memory growth L={lengths[0]}->{length} (MiB)", growth["trl"], growth["grpo"], ".0f")]
    rows += [(f"reward, mean of first {k} steps", first["trl"], first["grpo"], ".3f"),
             (f"reward, mean of last {k} steps", last["trl"], last["grpo"], ".3f"),
             (f"first step with reward >= {opts.target}", reach["trl"], reach["grpo"], "d")]
    lines = [f"\n### {size} ({params / 1e6:.1f}M parameters, vocab {SIZES[size][0]}), {opts.device}, "
             f"{len(rewards['grpo'])} steps x {opts.repeats} repeats\n",
             "| metric | TRL | grpo | grpo / TRL |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {fmt(trl, spec)} | {fmt(ours, spec)} | {ratio(ours, trl)} |"
              for name, trl, ours, spec in rows]
    lines.append("")
    for t in TRAINERS:
        lines.append(f"reward per step, {t + ':':<5} {' '.join(f'{r:.2f}' for r in rewards[t])}")
    for t in TRAINERS:
        for i, times in enumerate(main[t]["times"]):
            lines.append(f"step times (s), {t}, repeat {i + 1}: {' '.join(f'{x:.2f}' for x in times)}")
    return lines


def flops_rows(size: str, params: float, runs: dict[tuple[str, int], dict[str, Any]], length: int,
               peak: float) -> list[str]:
    lines = []
    for trainer in ("grpo", "trl"):
        stats = step_stats(runs[(trainer, length)]["steps"])
        flops = model_flops(params, stats)
        rate = flops / stats["step_time"]
        lines.append(f"| {size} | {trainer} | {params / 1e6:.1f}M | {stats['trained']:.0f} | {stats['generated']:.0f} "
                     f"| {flops / 1e9:.1f} | {stats['step_time']:.2f} | {rate / 1e9:.2f} | {peak / 1e9:.1f} "
                     f"| {rate / peak:.1%} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "small"], choices=sorted(SIZES))
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps of the timing runs")
    parser.add_argument("--completion-lengths", nargs="+", type=int, default=[64, 512],
                        help="max_completion_length; the first for timing, the rest for memory growth")
    parser.add_argument("--memory-steps", type=int, default=2, help="optimizer steps of the memory-growth runs")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timing runs per trainer, alternating trainers (machine drift hits both alike)")
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--k", type=int, default=3, help="steps averaged for the first / last reward")
    parser.add_argument("--target", type=float, default=0.9, help="reward whose first crossing is reported")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads per trainer (default: torch's); 1 resists a busy shared machine")
    parser.add_argument("--worker", choices=TRAINERS, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if opts.worker:
        return worker(opts)

    import transformers
    import trl

    print(f"device={opts.device} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"transformers={transformers.__version__} trl={trl.__version__} steps={opts.steps} "
          f"lengths={opts.completion_lengths} lr={opts.learning_rate} seed={opts.seed}")
    report_lines, flops_lines = [], []
    for size in opts.models:
        with tempfile.TemporaryDirectory() as model_dir:
            save_model(size, Path(model_dir))
            params = sum(p.numel() for p in build(size).parameters())
            non_embedding = params - SIZES[size][0] * SIZES[size][1]  # the input embedding is a lookup
            runs = {}
            for i, length in enumerate(opts.completion_lengths):
                steps, repeats = (opts.steps, opts.repeats) if i == 0 else (opts.memory_steps, 1)
                results: dict[str, list[dict[str, Any]]] = {t: [] for t in TRAINERS}
                for repeat in range(repeats):
                    for trainer in TRAINERS if repeat % 2 == 0 else TRAINERS[::-1]:
                        results[trainer].append(run_worker(trainer, Path(model_dir), length, steps, opts))
                runs.update({(t, length): pool(results[t]) for t in TRAINERS})
        report_lines += report(size, params, runs, opts.completion_lengths, opts)
        flops_lines += flops_rows(size, non_embedding, runs, opts.completion_lengths[0], matmul_flops(opts.device))
    print("\n".join(report_lines))
    print(f"\n### Model FLOP/s of a training step, L={opts.completion_lengths[0]}\n")
    print("FLOPs per optimizer step = 6 N T_train + 2 N T_gen: N = parameters without the input embedding, T_train "
          "= prompt + completion tokens trained on (forward + backward), T_gen = completion tokens generated; no "
          "extra no-grad pass (on-policy, beta 0); recomputation by gradient checkpointing not counted. Peak = best "
          f"{'bf16' if opts.device == 'cuda' else 'float32'} 2048 x 2048 matmul on this machine, measured right "
          "after that model's runs.\n")
    print("| model | trainer | N | T_train / step | T_gen / step | GFLOP / step | step time (s) | GFLOP/s "
          "| peak matmul GFLOP/s | fraction of peak |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(flops_lines))


if __name__ == "__main__":
    main()
