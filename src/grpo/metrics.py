"""Metrics: averaged over the logging window, written to `metrics.jsonl`, shown on a progress bar.

Metric names are TRL's, so dashboards and habits carry over. (This module is DESIGN.md's `logging.py`; the
name avoids shadowing the standard library's `logging` inside the package.)
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from grpo.algorithm import nanstd


def say(message: str) -> None:
    """Print a line without breaking the progress bar."""
    tqdm.write(message, file=sys.stdout)


class MetricsWindow:
    """Collects values per metric name between two logging steps and averages them, ignoring NaN."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = defaultdict(list)

    def add(self, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.values[name].append(float(value))

    def average(self) -> dict[str, float | None]:
        """Mean of each metric over the window, NaN ignored; None (JSON null) where no value was finite."""
        out: dict[str, float | None] = {}
        for name, values in self.values.items():
            finite = [v for v in values if math.isfinite(v)]
            out[name] = sum(finite) / len(finite) if finite else None
        return out

    def clear(self) -> None:
        self.values.clear()


class MetricsFile:
    """`metrics.jsonl`: one JSON object per logged step, flushed at once so a crash loses nothing logged."""

    def __init__(self, path: Path, history: list[dict[str, Any]] | None = None):
        """`history`: the records of a resumed run up to its checkpoint, which replace whatever the file held."""
        self.path = path
        self.file = open(path, "w", encoding="utf-8")
        for record in history or []:
            self.write(record)

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class CompletionLog:
    """`completions.jsonl`: one JSON object per sampled completion, with its step, rewards and advantage."""

    def __init__(self, path: Path, keep_until_step: int = 0):
        """Keeps the rows of steps up to `keep_until_step` (a resumed run's checkpoint) and drops the rest."""
        self.path = path
        kept = []
        if keep_until_step > 0 and path.exists():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
                    if line.strip() and json.loads(line)["step"] <= keep_until_step]
        self.path.write_text("".join(kept), encoding="utf-8")

    def write(self, rows: list[dict[str, Any]]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)


def round_metrics(reward_names: list[str], rewards_per_func: torch.Tensor, rewards: torch.Tensor,
                  group_std: torch.Tensor, lengths: torch.Tensor, is_eos: torch.Tensor) -> dict[str, float]:
    """TRL's metrics of one generation round (all processes' rows): completion lengths, how many ran to the
    limit, the weighted reward and each function's, and the share of groups whose rewards were all equal."""
    terminated = lengths[is_eos]
    metrics = {
        "completions/mean_length": lengths.mean().item(),
        "completions/min_length": lengths.min().item(),
        "completions/max_length": lengths.max().item(),
        "completions/clipped_ratio": 1.0 - is_eos.float().mean().item(),
        "completions/mean_terminated_length": terminated.mean().item() if len(terminated) else math.nan,
        "completions/min_terminated_length": terminated.min().item() if len(terminated) else math.nan,
        "completions/max_terminated_length": terminated.max().item() if len(terminated) else math.nan,
        "reward": torch.nanmean(rewards).item(),
        "reward_std": nanstd(rewards).item(),
        "frac_reward_zero_std": torch.isclose(group_std.nan_to_num(0.0), torch.zeros_like(group_std)).float()
        .mean().item(),
    }
    for i, name in enumerate(reward_names):
        metrics[f"rewards/{name}/mean"] = torch.nanmean(rewards_per_func[:, i]).item()
        metrics[f"rewards/{name}/std"] = nanstd(rewards_per_func[:, i]).item()
    return metrics


def tool_metrics(counts: dict[str, float], num_completions: int) -> dict[str, float]:
    """TRL's tool metrics from a round's summed calls and failures (`ToolCounts.sums`, all processes): calls per
    completion and failures per call, in total and for each tool (tools/<name>/...; not in TRL)."""
    def frequencies(prefix: str, calls: float, failures: float) -> dict[str, float]:
        return {f"{prefix}call_frequency": calls / max(num_completions, 1),
                f"{prefix}failure_frequency": failures / calls if calls else 0.0}

    metrics = frequencies("tools/", counts["calls"], counts["failures"])
    for name in [key.removesuffix("/calls") for key in counts if key.endswith("/calls")]:
        metrics.update(frequencies(f"tools/{name}/", counts[f"{name}/calls"], counts[f"{name}/failures"]))
    return metrics


def completion_rows(rollout: Any, reward_names: list[str], step: int) -> list[dict[str, Any]]:
    """One record per completion of a round: prompt, completion, each reward (None where not applicable) and
    the advantage, texts flattened for display."""
    rows = []
    for i in range(len(rollout)):
        row: dict[str, Any] = {"step": step, "prompt": _text(rollout.prompts[i]),
                               "completion": _text(rollout.completions[i])}
        for j, name in enumerate(reward_names):
            value = rollout.rewards_per_func[i, j].item()
            row[name] = value if math.isfinite(value) else None
        row["advantage"] = rollout.advantages[i].item()
        row.update(rollout.extra[i] if i < len(rollout.extra) else {})  # reward functions' log_extra columns
        rows.append(row)
    return rows


def first_row_per_prompt(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """log_unique_prompts: each prompt's first row only, as TRL's completions table shows them."""
    seen: set[str] = set()
    return [row for row in rows if not (row["prompt"] in seen or seen.add(row["prompt"]))]


def run_summary(seconds: float, steps: int, completions_per_step: int, train_loss: float, epoch: float,
                total_flos: float) -> dict[str, float]:
    """transformers' end-of-training record (the last entry of log_history): wall time, completions and optimizer
    steps per second over the steps this train() call ran, the mean loss per step, epoch and total_flos."""
    seconds = max(seconds, 1e-9)
    return {"train_runtime": round(seconds, 4),
            "train_samples_per_second": round(steps * completions_per_step / seconds, 3),
            "train_steps_per_second": round(steps / seconds, 3), "total_flos": total_flos,
            "train_loss": train_loss, "epoch": epoch}


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return " / ".join(_message_text(m) for m in value)


def _message_text(message: dict[str, Any]) -> str:
    """A message's content, with its tool calls written out (a turn that only calls has no content)."""
    calls = [call.get("function", call) for call in message.get("tool_calls") or []]
    written = [f"{c.get('name')}({json.dumps(c.get('arguments'))})" for c in calls]
    return " ".join([str(message.get("content") or ""), *written]).strip()


class ProgressBar:
    """Optimizer steps with the running reward and throughput."""

    def __init__(self, total: int, disable: bool = False, initial: int = 0):
        self.bar = tqdm(total=total, initial=initial, desc="GRPO", unit="step", disable=disable, dynamic_ncols=True)
        self.started = time.perf_counter()
        self.tokens = 0

    def update(self, reward: float, completion_tokens: int) -> None:
        self.tokens += completion_tokens
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix(reward=f"{reward:.3f}", tok_s=f"{self.tokens / elapsed:.0f}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def format_completions_table(rows: list[dict[str, Any]], max_rows: int | None, width: int = 48) -> str:
    """A plain-text table of sampled completions, one line each, for the console."""
    rows = rows[:max_rows] if max_rows else rows
    if not rows:
        return ""
    columns = list(rows[0])

    def cell(value: Any) -> str:
        text = f"{value:.3f}" if isinstance(value, float) else str(value)
        text = text.replace("\n", "\\n")
        return text if len(text) <= width else text[: width - 1] + "…"

    cells = [[cell(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(columns)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(columns, widths)), "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(v.ljust(w) for v, w in zip(line, widths)) for line in cells]
    return "\n".join(lines)


ZERO_STD_WARNING = (
    "{:.0%} of groups had the same reward for every completion in the last logging window: they give no "
    "learning signal. Make the task easier or the reward more graded, raise num_generations or temperature."
)


class RunLog:
    """Where a run's numbers go: the logging window, the log history, `metrics.jsonl`, the trackers,
    `completions.jsonl` and the console. Only the process that `writes` (the main one) touches files or prints;
    the others keep the same window and history, so every process holds the same state."""

    def __init__(self, run_dir: Path, args: Any, resolved: dict[str, Any], history: list[dict[str, Any]],
                 resumed_step: int, writes: bool, on_write: Callable[[dict[str, Any]], None] | None = None):
        """`on_write`: called with every record once it is in the history (the trainer's callbacks' on_log)."""
        from grpo.trackers import Trackers

        self.window, self.history, self.writes, self.on_write = MetricsWindow(), history, writes, on_write
        self.num_completions_to_print = args.num_completions_to_print
        self.unique_prompts = getattr(args, "log_unique_prompts", False)
        self.sinks: list[Any] = []
        self.completions = None
        if writes:
            self.sinks.append(MetricsFile(run_dir / "metrics.jsonl", history=history))
            if args.report_to:
                self.sinks.append(Trackers(args.report_to, run_dir, args.run_name or run_dir.name, resolved))
            if args.log_completions:
                self.completions = CompletionLog(run_dir / "completions.jsonl", keep_until_step=resumed_step)
        self.warned_zero_std = False

    def say(self, message: str) -> None:
        if self.writes:
            say(message)

    def write(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        for sink in self.sinks:
            sink.write(record)
        if self.on_write is not None:
            self.on_write(record)

    def flush(self, step: int, epoch: float, rollout: Any, reward_names: list[str]) -> None:
        """Write the window's averages as the record of `step`, with the last round's completions if asked."""
        record = {"step": step, "epoch": round(epoch, 4), **self.window.average()}
        self.window.clear()
        self.write(record)
        if (record.get("frac_reward_zero_std") or 0.0) >= 0.5 and not self.warned_zero_std and self.writes:
            self.warned_zero_std = True  # once per run: a converged run keeps tripping it
            warnings.warn(ZERO_STD_WARNING.format(record["frac_reward_zero_std"]), stacklevel=4)
        if self.completions is not None:
            rows = completion_rows(rollout, reward_names, step)
            self.completions.write(rows)
            say(format_completions_table(first_row_per_prompt(rows) if self.unique_prompts else rows,
                                         self.num_completions_to_print))

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
