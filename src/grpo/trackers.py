"""Experiment trackers behind `report_to`: TensorBoard, Weights & Biases and Trackio, with the same metric names
as `metrics.jsonl`. Each is an optional install, imported only when asked for, so `report_to="none"` needs none.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class TensorBoardTracker:
    def __init__(self, run_dir: Path, run_name: str, config: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """Online by default; WANDB_MODE=offline writes the run under <run_dir>/wandb with no network."""

    def __init__(self, run_dir: Path, run_name: str, config: dict[str, Any]):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "grpo"), name=run_name, dir=str(run_dir),
                              config=config, reinit="finish_previous")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log({k: v for k, v in metrics.items() if v is not None}, step=step)

    def close(self) -> None:
        self.run.finish()


class TrackioTracker:
    """Trackio's local store (TRACKIO_DIR, default ~/.cache/huggingface/trackio); `trackio show` opens it."""

    def __init__(self, run_dir: Path, run_name: str, config: dict[str, Any]):
        import trackio

        self.trackio = trackio
        self.run = trackio.init(project=os.environ.get("TRACKIO_PROJECT", "grpo"), name=run_name, config=config)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.trackio.log({k: v for k, v in metrics.items() if v is not None}, step=step)

    def close(self) -> None:
        self.trackio.finish()


TRACKERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "trackio": TrackioTracker}


class Trackers:
    """Every tracker of `report_to`, fed the same records as `metrics.jsonl`."""

    def __init__(self, names: list[str], run_dir: Path, run_name: str, config: dict[str, Any]):
        self.trackers = [TRACKERS[name](run_dir, run_name, config) for name in names]

    def write(self, record: dict[str, Any]) -> None:
        metrics = {k: v for k, v in record.items() if k != "step"}
        for tracker in self.trackers:
            tracker.log(metrics, record["step"])

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
