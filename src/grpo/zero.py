"""DeepSpeed ZeRO-2 and ZeRO-3, launched with `accelerate launch` and a DeepSpeed config.

ZeRO partitions the optimizer state and the gradients (stage 2), and the weights too (stage 3), over the
processes. DeepSpeed's engine then owns backward, the gradient reduction, clipping and the optimizer step, so the
trainer calls `backward` and `step` here instead of torch's:

- `backward` tells the engine whether this micro-batch ends the optimizer step. The number of micro-batches per
  step varies (the token budget cuts long ones), so DeepSpeed's own accumulation counter is set to 1 and never
  consulted: without the flag ZeRO-2 would treat every backward as a step boundary.
- `step` clips to GRPOConfig.max_grad_norm (written into DeepSpeed's `gradient_clipping`) and updates. The
  learning-rate schedule stays grpo's: DeepSpeed's optimizer reads the rate from the param groups it sets.

Everything else is the trainer's own: the loss and its normalisers, the schedule, checkpoints (DeepSpeed writes its
partitioned optimizer state into them, `save_state`). Under ZeRO-3 the full weights are gathered for generation
and the no-grad passes (`full_weights`), as under FSDP. Each process loads the whole model first (transformers'
partitioned loading, `zero.Init`, is kept off) and the reference model stays whole on every process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

SUPPORTED_STAGES = (2, 3)


def requested() -> bool:
    """Whether the launcher asked for DeepSpeed (`accelerate launch` with a DeepSpeed config sets this)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def accelerator_kwargs() -> dict[str, Any]:
    """Accelerate starts DeepSpeed on CPU processes only when told the backend: without it a CPU run would fall
    back to one process. (On CPU, DeepSpeed communicates over gloo.)"""
    from accelerate.utils import InitProcessGroupKwargs

    return {} if torch.cuda.is_available() else {"kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}


def check_deepspeed(plugin: Any, args: Any) -> None:
    """The DeepSpeed settings grpo has run (see docs/distributed.md); the others are refused up front."""
    config = plugin.deepspeed_config
    zero = config.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage not in SUPPORTED_STAGES:
        raise NotImplementedError(f"DeepSpeed ZeRO stage {stage}: grpo supports stages 2 and 3; set `zero_stage` "
                                  "in the accelerate config (examples/accelerate/deepspeed_zero2.yaml).")
    for part in ("offload_optimizer", "offload_param"):
        device = (zero.get(part) or {}).get("device", "none")
        if device not in ("none", None):
            raise NotImplementedError(f"DeepSpeed {part} to {device!r} is not supported by grpo yet (it needs "
                                      "DeepSpeed's compiled CPU Adam); set it to 'none'.")
    if config.get("fp16", {}).get("enabled") in (True, "true"):
        raise NotImplementedError("DeepSpeed fp16 (loss scaling) is not supported by grpo; use bf16 "
                                  "(mixed_precision: bf16) or fp32.")
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise ValueError(f"the DeepSpeed config has a {section!r} section; grpo builds AdamW and the "
                             "learning-rate schedule from GRPOConfig. Remove the section.")
    clipping = config.get("gradient_clipping", "auto")
    if clipping not in ("auto", None) and float(clipping) != float(args.max_grad_norm):
        raise ValueError(f"the DeepSpeed config sets gradient_clipping={clipping} but GRPOConfig.max_grad_norm is "
                         f"{args.max_grad_norm}; set one of them (GRPOConfig.max_grad_norm is enough).")


def configure(plugin: Any, args: Any) -> None:
    """Write what grpo decides into DeepSpeed's config: the micro-batch size, no accumulation counting (the
    trainer marks each step's last micro-batch), and clipping at GRPOConfig.max_grad_norm (0: none)."""
    config = plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = args.per_device_train_batch_size
    config["gradient_accumulation_steps"] = 1
    config.pop("train_batch_size", None)  # derived by DeepSpeed from the two above
    config["gradient_clipping"] = float(args.max_grad_norm)
    # transformers would build models already partitioned (zero.Init) under a registered ZeRO-3 config, and the
    # rollout engine and the reference model read whole weights: models load whole, the engine partitions them
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def prepare(accelerator: Any, policy: torch.nn.Module, optimizer: Any) -> torch.nn.Module:
    """The DeepSpeed engine around `policy` (the training forward); `optimizer` is wrapped by ZeRO and keeps
    receiving the schedule's learning rates through its param groups."""
    engine, _ = accelerator.prepare(policy, optimizer)
    return engine


def is_engine(module: Any) -> bool:
    return type(module).__name__ == "DeepSpeedEngine"


def backward(engine: Any, loss: torch.Tensor, last: bool) -> None:
    """Accumulate the gradient of `loss`; `last`: this micro-batch ends the optimizer step (the gradients are
    reduced over processes then)."""
    engine.set_gradient_accumulation_boundary(last)
    engine.backward(loss, scale_wrt_gas=False)  # the loss is already scaled for the whole step


def step(engine: Any) -> float:
    """Clip, update and zero the gradients; returns the global gradient norm before clipping."""
    engine.step()
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


def is_partitioned(model: torch.nn.Module) -> bool:
    """Whether `model`'s weights are ZeRO-3 partitions."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """A weight's whole shape, also for a ZeRO-3 partition (whose own shape is empty)."""
    return tuple(getattr(param, "ds_shape", param.shape))


@contextmanager
def full_weights(engine: Any) -> Iterator[None]:
    """Under ZeRO-3: within the block every weight is whole and forwards run without DeepSpeed's hooks, so a
    process may run as many forwards as its data needs (or none) with no communication. A collective: every
    process enters at the same point. Nothing happens for ZeRO-2, whose weights are whole anyway."""
    import deepspeed

    module = engine.module
    if not is_partitioned(module):
        yield
        return
    offload = engine.optimizer.parameter_offload
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        # the hooks would fetch and release weights around each submodule's forward: collectives in a
        # data-dependent loop, and released weights under the rollout engine's direct reads
        for param in module.parameters():
            param.ds_active_sub_modules.clear()
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            offload._register_deepspeed_module(offload.module)


def gather_weights(model: torch.nn.Module, is_main: bool) -> dict[str, torch.Tensor] | None:
    """The full state dict of a ZeRO-3 model on the main process's CPU (others get an empty dict); None when
    `model` is not partitioned. A collective: every process calls it. Gathers one weight at a time."""
    if not is_partitioned(model):
        return None
    import deepspeed

    weights = {}
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if is_main:
                weights[name] = param.detach().cpu().clone()
    return weights


def save_state(engine: Any, directory: str | os.PathLike) -> None:
    """DeepSpeed's own checkpoint of the engine (weights and each process's optimizer partition) into
    `directory`. A collective; every process writes its partition."""
    engine.save_checkpoint(str(directory), tag="state", save_latest=False)


def load_state(engine: Any, directory: str | os.PathLike) -> None:
    """Restore what `save_state` wrote: the weights and the optimizer partitions (same number of processes)."""
    path, _ = engine.load_checkpoint(str(directory), tag="state", load_optimizer_states=True,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise ValueError(f"no DeepSpeed state in {directory}; resume with the accelerate set-up that wrote it.")
