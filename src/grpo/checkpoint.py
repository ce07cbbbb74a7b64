"""Checkpoints: everything a run needs to continue exactly where it stopped, written so a crash cannot break one.

A checkpoint is a directory `checkpoint-<step>` in the run directory:

    model weights (or the PEFT adapter) and tokenizer, in `save_pretrained` format, so it also loads as a model
    optimizer.pt, scheduler.pt     the optimizer moments and the learning-rate schedule position
    deepspeed/                     under DeepSpeed, its own checkpoint instead of optimizer.pt (a partition each)
    rng_state.pt                   python, numpy, torch (CPU and CUDA), the rollout engine's and the shuffler's
    round.pt                       the generation round in progress and its micro-batch plan
    grpo_config.json               the config, to refuse resuming with different settings
    trainer_state.json             step, metrics so far (log history and the open logging window), data position

It is written to a hidden temporary directory that is renamed into place only once complete, so a crash during a
save leaves the previous checkpoints intact; half-written temporaries are never picked up and are cleared later.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from grpo import zero
from grpo.distributed import FullState, Processes, gather_full_state, is_sharded, load_full_state
from grpo.rollout import Rollout
from grpo.run_state import EntropyControl, RunPosition, TrainerState
from grpo.trl_fields import IGNORED_FIELDS

CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
# Settings that may change between a checkpoint and the run resuming it: they decide what is logged, saved or
# evaluated, or how long the run goes, not the path of the optimisation up to the checkpoint.
RESUMABLE_CHANGES = frozenset({
    "output_dir", "run_name", "report_to", "logging_steps", "log_completions", "num_completions_to_print",
    "disable_tqdm", "save_strategy", "save_steps", "save_total_limit", "resume_from_checkpoint",
    "overwrite_output_dir", "max_steps", "num_train_epochs", "eval_strategy", "eval_steps",
    "per_device_eval_batch_size", "num_generations_eval", "generation_max_batch_rows",
    "max_consecutive_nonfinite_steps",
    "max_tokens_per_micro_batch",  # memory only: the update does not depend on how a step is cut
    "skip_zero_advantage_rows",  # speed only: rows left out have a loss of exactly 0
    "reward_timeout", "reward_num_workers", "reward_error",  # how rewards are called: a crash's fix is a resume
    "model",  # the path may move; the model itself is compared by its parameter names and shapes
    "logging_strategy", "logging_first_step", "log_unique_prompts", "eval_delay", "eval_on_start", "save_only_model",
    "load_best_model_at_end", "metric_for_best_model", "greater_is_better", "restore_callback_states_from_checkpoint",
    "torch_empty_cache_steps", "use_liger_kernel",
    "cpu_keep_freed_memory",  # how memory is allocated: the same numbers either way
}) | frozenset(IGNORED_FIELDS)  # TRL fields that change nothing here
# TrainerState fields a resume restores (the rest are set by the run: max_steps, logging_steps, ...)
RESTORED_STATE = ("global_step", "epoch", "num_input_tokens_seen", "log_history", "total_flos", "best_metric",
                  "best_global_step", "best_model_checkpoint", "stateful_callbacks")


@dataclass
class TrainingObjects:
    """The objects a checkpoint writes and a resume restores in place, handed over by the loop that owns them."""

    model: torch.nn.Module  # the policy, unwrapped: its weights (or PEFT adapter) in save_pretrained format
    trained: torch.nn.Module  # what the loss runs through; a DeepSpeed engine keeps the optimizer state itself
    optimizer: Any
    lr_scheduler: Any
    tokenizer: Any
    shuffle: torch.Generator  # orders each round's rows into optimizer steps
    sampler: Any  # the generation backend: its random state is saved when it has one (`state_dict`)
    ref_model: torch.nn.Module | None = None  # given only when it moves during the run (sync_ref_model)
    entropy_control: EntropyControl | None = None  # the adaptive entropy coefficient (use_adaptive_entropy)


# ---- finding and checking checkpoints ------------------------------------------------------------------------
def checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in output_dir, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_NAME.match(p.name))
             and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def find_checkpoint(resume: str | bool | None, output_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: None for a fresh run, the latest in output_dir for True, else the path."""
    if resume is None or resume is False:
        return None
    if resume is True:
        found = checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(
                f"resume_from_checkpoint=True but {output_dir} holds no checkpoint (checkpoint-<step> directories). "
                "Check output_dir, pass a checkpoint path, or start without resuming."
            )
        return found[-1]
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        latest = checkpoints(path)  # a run directory given instead of one of its checkpoints
        if latest:
            return latest[-1]
        raise FileNotFoundError(
            f"resume_from_checkpoint='{resume}' is not a grpo checkpoint (no {STATE_FILE} in it). Pass a "
            "checkpoint-<step> directory, a run directory that holds them, or True for the latest in output_dir."
        )
    return path


def model_signature(model: torch.nn.Module) -> dict[str, Any]:
    """What identifies a model's architecture: its class and the names and shapes of its parameters."""
    shapes = sorted((name, zero.full_shape(p)) for name, p in model.named_parameters())
    return {"class": type(model).__name__,
            "parameters": sum(math.prod(zero.full_shape(p)) for p in model.parameters()),
            "shapes_sha1": hashlib.sha1(repr(shapes).encode()).hexdigest()}


def check_resumable(checkpoint: Path, config: dict[str, Any], signature: dict[str, Any],
                    num_processes: int = 1) -> None:
    """Refuse, before anything is loaded or written, a checkpoint made by a different model or settings."""
    state = json.loads((checkpoint / STATE_FILE).read_text())
    if state.get("model_only"):
        raise ValueError(
            f"checkpoint {checkpoint} was written with save_only_model=True: it holds the weights but no optimizer, "
            "schedule or random state, so the run cannot continue from it. Start a new run from its weights "
            "(model=<that checkpoint>), or save full checkpoints."
        )
    if state.get("num_processes", 1) != num_processes:
        raise ValueError(
            f"checkpoint {checkpoint} was written by {state.get('num_processes', 1)} processes and this run has "
            f"{num_processes}; each process resumes its own random state and rows, so resume with "
            f"{state.get('num_processes', 1)} processes."
        )
    if state.get("model_signature") != signature:
        raise ValueError(
            f"checkpoint {checkpoint} was written by a different model ({state.get('model_signature')}) than the "
            f"one given ({signature}). Resume with the model the run started with, or start a new output_dir."
        )
    differing = _differing_settings(json.loads((checkpoint / "grpo_config.json").read_text()), config)
    if differing:
        raise ValueError(
            f"checkpoint {checkpoint} was written with different settings ({', '.join(differing[:8])}); resuming "
            "would not continue the same run. Resume with the original settings, or start a new output_dir. Only "
            "logging, saving, evaluation and length settings (e.g. max_steps) may change on resume."
        )


def prepare_output_dir(output_dir: str | Path, resume: str | bool | None, overwrite: bool,
                       config: dict[str, Any], delete: bool = True) -> Path | None:
    """Before a run writes anything: the checkpoint it resumes from, or None after making sure a fresh run does not
    overwrite another one by accident. Every process checks (so all raise alike); only one may `delete`."""
    checkpoint = find_checkpoint(resume, output_dir)
    if checkpoint is None:
        claim_output_dir(output_dir, overwrite, config, delete)
    return checkpoint


def claim_output_dir(output_dir: str | Path, overwrite: bool, config: dict[str, Any], delete: bool = True) -> None:
    """A fresh run may start over a finished run of the same settings that left no checkpoint; it may not replace
    checkpoints (a run to resume, perhaps) or a run with other settings unless asked to, and then the old
    checkpoints are removed so that none of them is mistaken for this run's."""
    root = Path(output_dir)
    found = [p.name for p in checkpoints(root)]
    saved_config = root / "grpo_config.json"
    differing = _differing_settings(json.loads(saved_config.read_text()), config) if saved_config.is_file() else []
    if not found and not differing:
        return
    if not overwrite:
        held = f"checkpoints {', '.join(found[-3:])}" if found else f"a run with other settings ({differing[0]})"
        raise FileExistsError(
            f"output_dir {root} already holds {held}. Resume it with train(resume_from_checkpoint=True) "
            "(`grpo train --resume`), replace it with overwrite_output_dir=True, or choose another output_dir."
        )
    for name in found if delete else []:
        shutil.rmtree(root / name)


def _differing_settings(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'field: saved -> current' for each setting that changes the course of a run. Settings a checkpoint predates
    (fields added to grpo since) are taken as they are now."""
    current = json.loads(json.dumps(current, default=str))
    names = sorted(k for k in saved
                   if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k))
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in names]


# ---- writing -----------------------------------------------------------------------------------------------
def save_checkpoint(objects: TrainingObjects, state: TrainerState, position: RunPosition,
                    window_values: dict[str, list[float]], config: dict[str, Any], *, output_dir: str | Path,
                    save_total_limit: int | None, processes: Processes, model_only: bool = False,
                    keep: str | None = None) -> Path:
    """Write checkpoint-<global_step> atomically, then drop the oldest beyond save_total_limit, never `keep` (the
    best checkpoint). `config`: the resolved config, which a resume must match. `model_only` (save_only_model): the
    weights, tokenizer and state only, which no run can resume."""
    root = Path(output_dir)
    target = root / f"checkpoint-{state.global_step}"
    staging = root / f".checkpoint-{state.global_step}.tmp"
    if processes.is_main:
        for stale in root.glob(".checkpoint-*.tmp"):  # left by a crash during an earlier save
            shutil.rmtree(stale, ignore_errors=True)
        staging.mkdir(parents=True)
    processes.wait()
    if not model_only:
        _write_process_state(staging, objects, position, processes)  # every process: its random states and rows
    if zero.is_engine(objects.trained) and not model_only:  # every process writes its optimizer partition
        zero.save_state(objects.trained, staging / "deepspeed")
    full = gather_full_state(objects.model, None if model_only else objects.optimizer)  # FSDP, ZeRO-3: a collective
    processes.wait()
    if processes.is_main:  # the shared state, then the complete checkpoint renamed into place
        _write_contents(staging, objects, state, position, window_values, config, processes.count, full, model_only)
        _publish(staging, target, save_total_limit, keep)
    processes.wait()
    return target


def _publish(staging: Path, target: Path, save_total_limit: int | None, keep: str | None = None) -> None:
    root = target.parent
    _fsync_tree(staging)
    if target.exists():  # the same step saved again (e.g. a resumed run): swap, never leave a gap
        retired = root / f".{target.name}.old.tmp"
        os.replace(target, retired)
        os.replace(staging, target)
        shutil.rmtree(retired)
    else:
        os.replace(staging, target)
    _fsync_dir(root)
    if save_total_limit is not None:  # the best counts toward the limit, but the newest is always kept too
        found = checkpoints(root)
        best = [p for p in found if keep is not None and p.resolve() == Path(keep).resolve()]
        others = [p for p in found if p not in best]
        for old in others[:max(len(others) - max(save_total_limit - len(best), 1), 0)]:
            shutil.rmtree(old)


def _per_process(stem: str, processes: Processes) -> str:
    return f"{stem}.pt" if processes.count == 1 else f"{stem}_{processes.rank}.pt"


def _write_process_state(out: Path, objects: TrainingObjects, position: RunPosition, processes: Processes) -> None:
    torch.save(rng_state(objects.shuffle, objects.sampler), out / _per_process("rng_state", processes))
    rollout = None if position.rollout is None else {
        f.name: getattr(position.rollout, f.name) for f in dataclasses.fields(position.rollout)}
    torch.save({"rollout": rollout, "plan": position.plan}, out / _per_process("round", processes))


def _write_contents(out: Path, objects: TrainingObjects, state: TrainerState, position: RunPosition,
                    window_values: dict[str, list[float]], config: dict[str, Any], num_processes: int,
                    full: FullState | None, model_only: bool = False) -> None:
    """`full`: an FSDP run's gathered weights and optimizer state (keyed by parameter name), a ZeRO-3 run's
    gathered weights, else None (the state is read from the model and optimizer themselves)."""
    model, deepspeed = objects.model, zero.is_engine(objects.trained)
    model.save_pretrained(out, state_dict=full.model if full else None)
    objects.tokenizer.save_pretrained(out)
    if not deepspeed and not model_only:  # DeepSpeed's optimizer state is in deepspeed/, one partition per process
        torch.save(full.optimizer if full else objects.optimizer.state_dict(), out / "optimizer.pt")
    if not model_only:
        torch.save(objects.lr_scheduler.state_dict(), out / "scheduler.pt")
    if objects.ref_model is not None and not model_only:  # TR-DPO moves the reference too
        torch.save(objects.ref_model.state_dict(), out / "ref_model.pt")
    (out / "grpo_config.json").write_text(json.dumps(config, indent=2, default=str))
    trainer_state = {
        **dataclasses.asdict(state),
        "rounds_consumed": position.rounds_consumed, "round_epoch": position.epoch,
        "round_reward": position.round_reward, "next_step": position.next_step, "loss_sum": position.loss_sum,
        "logging_window": window_values, "model_signature": model_signature(model),
        "num_processes": num_processes, "sharded": full is not None and not deepspeed,
        "deepspeed": deepspeed, "model_only": model_only,
        "entropy_control": None if objects.entropy_control is None else dataclasses.asdict(objects.entropy_control),
    }
    (out / STATE_FILE).write_text(json.dumps(trainer_state, indent=1))  # last: it marks a complete checkpoint


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- reading -----------------------------------------------------------------------------------------------
def load_checkpoint(checkpoint: Path, objects: TrainingObjects, state: TrainerState, processes: Processes
                    ) -> tuple[RunPosition, dict[str, list[float]]]:
    """Restore the objects (weights, optimizer, schedule, RNGs) and `state` in place; return the loop position
    and the open logging window."""
    model, deepspeed = objects.model, zero.is_engine(objects.trained)
    saved = json.loads((checkpoint / STATE_FILE).read_text())
    written = _run_kind(saved.get("deepspeed", False), saved.get("sharded", False))
    running = _run_kind(deepspeed, is_sharded(model))
    if written != running:  # the optimizer state is stored differently
        raise ValueError(f"checkpoint {checkpoint} was written by {written} run, and this is {running} run; resume "
                         "with the accelerate set-up that wrote it.")
    if deepspeed:  # the weights and each process's optimizer partition
        zero.load_state(objects.trained, checkpoint / "deepspeed")
    elif is_sharded(model):  # FSDP: every process reads the full state and keeps its shard
        load_full_state(model, _read_weights(checkpoint), objects.optimizer, _read_moments(checkpoint))
    else:
        load_weights(model, checkpoint)
        objects.optimizer.load_state_dict(_read_moments(checkpoint))
    objects.lr_scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=True))
    if (checkpoint / "ref_model.pt").exists() and objects.ref_model is not None:
        objects.ref_model.load_state_dict(torch.load(checkpoint / "ref_model.pt", weights_only=True))
    restore_rng_state(torch.load(checkpoint / _per_process("rng_state", processes), weights_only=True),
                      objects.shuffle, objects.sampler)
    for name in RESTORED_STATE:
        if name in saved:  # older checkpoints hold fewer
            setattr(state, name, saved[name])
    if objects.entropy_control is not None and saved.get("entropy_control"):
        objects.entropy_control.__dict__.update(saved["entropy_control"])
    saved_round = torch.load(checkpoint / _per_process("round", processes), weights_only=True)
    position = RunPosition(rounds_consumed=saved["rounds_consumed"], epoch=saved["round_epoch"],
                           round_reward=saved["round_reward"], rollout=_saved_rollout(saved_round["rollout"]),
                           plan=saved_round["plan"], next_step=saved["next_step"], loss_sum=saved.get("loss_sum", 0.0))
    return position, saved["logging_window"]


def _saved_rollout(fields: dict[str, Any] | None) -> Rollout | None:
    """The round in progress from round.pt. Fields a Rollout no longer has are ignored: older checkpoints hold
    `sampling_logps`, which nothing read."""
    if fields is None:
        return None
    known = {f.name for f in dataclasses.fields(Rollout)}
    return Rollout(**{name: value for name, value in fields.items() if name in known})


def load_weights(model: torch.nn.Module, checkpoint: Path) -> None:
    """Load weights written by `save_pretrained`: a PEFT adapter, or the full (possibly sharded) state dict."""
    adapter = checkpoint / "adapter_model.safetensors"
    if adapter.exists() and hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(adapter))
        return
    weights = _read_weights(checkpoint)
    own = model.state_dict()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    loaded_storage = {own[name].data_ptr() for name in weights if name in own}
    untied = [name for name in missing if own[name].data_ptr() not in loaded_storage]  # tied ones came along
    if not weights or untied or unexpected:
        raise ValueError(f"checkpoint {checkpoint} does not match the model: missing {untied[:5]}, unexpected "
                         f"{unexpected[:5]}. Resume with the model the run started with.")


def _run_kind(deepspeed: bool, sharded: bool) -> str:
    return "a DeepSpeed" if deepspeed else "an FSDP" if sharded else "a DDP or single-process"


def _read_moments(checkpoint: Path) -> dict[str, Any]:
    return torch.load(checkpoint / "optimizer.pt", weights_only=True)


def _read_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    for shard in sorted(checkpoint.glob("*.safetensors")):
        weights.update(load_file(shard))
    return weights


def rng_state(shuffle: torch.Generator, sampler: Any) -> dict[str, Any]:
    """Every random state the run draws from: the global ones, the row shuffler and the sampler's own."""
    version, mt_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(mt_state), gauss],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "cached": cached},
        "torch": torch.get_rng_state(),
        "shuffle": shuffle.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if hasattr(sampler, "state_dict"):
        state["generator"] = sampler.state_dict()
    return state


def restore_rng_state(state: dict[str, Any], shuffle: torch.Generator, sampler: Any) -> None:
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))
    torch.set_rng_state(state["torch"])
    shuffle.set_state(state["shuffle"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "generator" in state and hasattr(sampler, "load_state_dict"):
        sampler.load_state_dict(state["generator"])
