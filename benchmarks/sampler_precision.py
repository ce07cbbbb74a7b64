"""How the sampler's precision changes learning: the same bf16 GRPO run on SmolLM2, sampling three ways.

    python benchmarks/sampler_precision.py [--samplers float32 bf16-copies autocast] [--steps 12]
                                           [--learning-rate 5e-5] [--seed 42] [--device cpu|cuda]

Each run trains SmolLM2-135M-Instruct on the course's length task with compare_trl.py's settings (G = 8, GA = 2,
64 completion tokens, bf16 autocast in the training passes, each trainer default otherwise), in its own
subprocess, and prints the reward per step. Only the sampler differs:

- float32: grpo's default, the engine's float32 weight copies (on CUDA: generation without autocast);
- bf16-copies: the engine's bfloat16 weight copies (`RolloutEngine(copy_dtype=torch.bfloat16)`, CPU);
- autocast: generation under bf16 autocast, the weights rounded to bfloat16 at every matmul (grpo's CUDA
  default).

Measured 2026-12-04 on the 2-core CPU (docs/performance.md, "bf16 on this CPU"): reward at step 12, float32 /
bf16-copies / autocast: -12.1 / -153.2 / -70.7 (seed 42), -12.3 / -18.3 / -27.8 (seed 7).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from compare_trl import dataset, prepare_model, reward_function, settings  # noqa: E402

SAMPLERS = ("float32", "bf16-copies", "autocast")


def run(opts: argparse.Namespace) -> None:
    """One training run with `opts.worker`'s sampler; writes the steps' rewards and times to `opts.result`."""
    from grpo import GRPOConfig, GRPOTrainer
    from grpo.models import load_tokenizer
    from grpo.rollout import RolloutEngine

    config = GRPOConfig(**settings(opts, opts.output_dir))
    trainer_class = GRPOTrainer
    generator = None
    if opts.worker == "bf16-copies":
        generator = RolloutEngine(load_tokenizer(opts.model_dir), config.sampling_params, seed=config.seed,
                                  copy_dtype=torch.bfloat16)
    elif opts.worker == "autocast":
        class AutocastGeneration(GRPOTrainer):
            def _autocast(self, generation: bool = False) -> Any:
                return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.use_bf16 else nullcontext()

        trainer_class = AutocastGeneration
    elif opts.device == "cuda":
        class Float32Generation(GRPOTrainer):
            def _autocast(self, generation: bool = False) -> Any:
                return nullcontext() if generation else super()._autocast()

        trainer_class = Float32Generation
    trainer = trainer_class(model=opts.model_dir, reward_funcs=reward_function("smollm2", opts.length), args=config,
                            train_dataset=dataset("smollm2", 0), generator=generator)
    trainer.train()
    records = [json.loads(line) for line in (Path(opts.output_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [dict(reward=r["reward"], step_time=r["step_time"]) for r in records if "step_time" in r]
    Path(opts.result).write_text(json.dumps(steps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    for hidden in ("--worker", "--model-dir", "--result", "--output-dir"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    # what compare_trl.settings reads
    opts.g, opts.length, opts.bf16, opts.gradient_checkpointing = 8, 64, True, "default"
    if opts.worker:
        return run(opts)
    model_dir, _ = prepare_model("smollm2", Path(tempfile.gettempdir()))
    print(f"SmolLM2, G=8, L=64, bf16 training, lr {opts.learning_rate}, {opts.steps} steps, seed {opts.seed}, "
          f"{opts.device}")
    for sampler in opts.samplers:
        with tempfile.TemporaryDirectory() as output_dir, tempfile.NamedTemporaryFile(suffix=".json") as result:
            command = [sys.executable, __file__, "--worker", sampler, "--model-dir", model_dir, "--result",
                       result.name, "--output-dir", output_dir, "--steps", str(opts.steps), "--learning-rate",
                       str(opts.learning_rate), "--seed", str(opts.seed), "--device", opts.device]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{sampler} run failed:\n{done.stderr[-4000:]}")
            steps = json.loads(Path(result.name).read_text())
        rewards = " ".join(f"{s['reward']:.1f}" for s in steps)
        median = statistics.median(s["step_time"] for s in steps)
        print(f"{sampler:<12} reward per step: {rewards}  (median step {median:.2f} s)", flush=True)


if __name__ == "__main__":
    main()
