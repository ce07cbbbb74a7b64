"""`grpo plot RUN_DIR [RUN_DIR ...]`: PNG figures of a run's metrics.jsonl, several runs on one figure.

Needs matplotlib (`pip install 'grpo[plot]'`); training never imports this module.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

# One panel per group of metrics; a panel is drawn when at least one run logged one of its metrics.
PANELS: list[tuple[str, list[str]]] = [
    ("reward", ["reward"]),
    ("eval reward", ["eval_reward"]),
    ("tool calls", ["tools/call_frequency", "tools/failure_frequency"]),  # calls per completion, failed share
    ("kl", ["kl"]),
    ("entropy", ["entropy"]),
    ("completion length", ["completions/mean_length", "completions/min_length", "completions/max_length"]),
    ("clip ratio", ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"]),
    ("loss", ["loss"]),
    ("grad norm", ["grad_norm"]),
    ("zero-spread groups", ["frac_reward_zero_std"]),
]


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a grpo run directory?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, skipping steps where it was not logged or not finite."""
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in points], [p[1] for p in points]


def plot_runs(run_dirs: list[str], output: str | None = None) -> list[Path]:
    """Write `metrics.png` (every panel) and `reward.png`; with several runs, into the first run's directory
    unless `output` names another folder. Returns the files written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("grpo plot needs matplotlib: pip install 'grpo[plot]'") from e

    runs = {Path(d).name or str(d): read_metrics(d) for d in run_dirs}
    reward_keys = sorted({k for records in runs.values() for r in records for k in r
                          if k.startswith("rewards/") and k.endswith("/mean")})
    panels = PANELS[:1] + [(k.removeprefix("rewards/").removesuffix("/mean"), [k]) for k in reward_keys] + PANELS[1:]
    panels = [(title, keys) for title, keys in panels
              if any(series(records, k)[0] for records in runs.values() for k in keys)]
    target = Path(output or run_dirs[0])
    target.mkdir(parents=True, exist_ok=True)

    columns = 3
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.4 * rows), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels):
        for run_name, records in runs.items():
            for key in keys:
                steps, values = series(records, key)
                if not steps:
                    continue
                label = run_name if len(keys) == 1 else f"{run_name} {key.split('/')[-1]}"
                ax.plot(steps, values, label=label)
                if key == "reward":
                    _std_band(ax, records, steps, values)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(runs) > 1 or len(keys) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    written = [target / "metrics.png", target / "reward.png"]
    fig.savefig(written[0], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for run_name, records in runs.items():
        steps, values = series(records, "reward")
        ax.plot(steps, values, label=run_name)
        _std_band(ax, records, steps, values)
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward")
    ax.set_title("reward (band: reward_std)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(written[1], dpi=110)
    plt.close(fig)
    return written


def _std_band(ax: Any, records: list[dict[str, Any]], steps: list[int], values: list[float]) -> None:
    std = dict(zip(*series(records, "reward_std")))
    if all(s in std for s in steps):
        ax.fill_between(steps, [v - std[s] for s, v in zip(steps, values)],
                        [v + std[s] for s, v in zip(steps, values)], alpha=0.2)
