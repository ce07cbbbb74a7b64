"""Several processes, one run: the few collectives that make N processes train exactly like one.

Every process draws the same global round of prompts from the sampler and generates whole groups for its own
contiguous share of them, so the G completions of a prompt never straddle two processes. Rewards are then
gathered, so advantages (and "batch" reward scaling) are computed over the whole round, exactly as one process
would; each process keeps its own rows' advantages. The loss normaliser counts the whole global optimizer step
(token counts are summed over processes), and since DDP (like FSDP and DeepSpeed) averages gradients over
processes, each process scales its partial loss by the number of processes: the summed gradient is then the
one-process gradient. FSDP2 is set up below; DeepSpeed ZeRO in `grpo.zero`.

Every collective here is called by every process at the same point of the loop (per round, per step, per save),
never inside a branch that depends on one process's data, so processes whose completions finish early wait at
the next collective rather than deadlock.
"""

from __future__ import annotations

import atexit
import functools
import os
import sys
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from grpo import zero


def accelerator_kwargs(args: Any) -> dict[str, Any]:
    """Accelerate runs several CPU processes (gloo) only when told `cpu=True`; without it each process of a
    CPU-only torchrun would silently train alone. (DeepSpeed is told the backend instead: `cpu=True` drops it.)"""
    if zero.requested():
        return zero.accelerator_kwargs()
    return {"cpu": args.use_cpu or (args.world_size > 1 and not torch.cuda.is_available())}


def empty_cache(device: torch.device) -> None:
    """Return the accelerator's cached memory to the driver (torch_empty_cache_steps); nothing on CPU."""
    backend = getattr(torch, device.type, None)
    if device.type != "cpu" and hasattr(backend, "empty_cache"):
        backend.empty_cache()


class Processes:
    """This process's place among the processes of the run, and the collectives the trainer needs."""

    def __init__(self, accelerator: Any | None):
        """`accelerator` None: this process alone (no collective is ever called)."""
        self.accelerator = accelerator
        self.rank = accelerator.process_index if accelerator else 0
        self.count = accelerator.num_processes if accelerator else 1
        self.is_main = accelerator.is_main_process if accelerator else True

    @classmethod
    def alone(cls) -> Processes:
        return cls(None)

    def shard(self, rows: list[Any]) -> list[Any]:
        """This process's contiguous share of a round's prompts (the config makes the split exact)."""
        share = len(rows) // self.count
        return rows[self.rank * share:(self.rank + 1) * share]

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every process's rows, in process order (equal row counts everywhere)."""
        if self.count == 1:
            return tensor
        return self.accelerator.gather(tensor.to(self.accelerator.device)).to(tensor.device)

    def own_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """This process's rows of a gathered tensor."""
        share = tensor.shape[0] // self.count
        return tensor[self.rank * share:(self.rank + 1) * share]

    def sum(self, values: dict[str, float]) -> dict[str, float]:
        """Each value summed over processes (one all-reduce for the whole dict)."""
        if self.count == 1:
            return values
        packed = torch.tensor(list(values.values()), dtype=torch.float64, device=self.accelerator.device)
        packed = self.accelerator.reduce(packed, reduction="sum")
        return dict(zip(values, packed.tolist()))

    def max_each(self, values: list[Any]) -> list[Any]:
        """The element-wise maximum of `values` (ints or floats) over processes (one all-reduce)."""
        if self.count == 1:
            return values
        packed = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        torch.distributed.all_reduce(packed, op=torch.distributed.ReduceOp.MAX)
        return [type(v)(m) for v, m in zip(values, packed.tolist())]

    def broadcast(self, value: Any) -> Any:
        """The main process's `value` (any picklable object), on every process."""
        if self.count == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def wait(self) -> None:
        if self.count > 1:
            self.accelerator.wait_for_everyone()


@functools.cache
def destroy_process_group_at_exit() -> None:
    """Destroy torch.distributed's process group when the program ends, while the interpreter is still whole.

    A process that exits with its gloo group alive can abort after its last line ran (SIGABRT, "terminate called
    without an active exception"): gloo's threads still hold finished work whose tensors drop Python references
    while the interpreter is being torn down (pytorch/pytorch#190489). Here that was about 1 two-process run in
    60, a failed exit status after a complete run. Registered once per process by the trainer; the user's
    program has finished by the time it runs. After an uncaught exception the group is left as it is: the run
    has failed anyway, and the other processes may still be inside a collective with this one.
    """
    atexit.register(_destroy_after_clean_exit)


def _destroy_after_clean_exit() -> None:
    crashed = getattr(sys, "last_value", None) is not None  # set when an uncaught exception was printed
    if torch.distributed.is_available() and torch.distributed.is_initialized() and not crashed:
        torch.distributed.destroy_process_group()


UNSUPPORTED_ENGINES = ("MEGATRON_LM",)
WRAPPED_IN_TRAIN = ("FSDP", "DEEPSPEED")  # `shard_policy` wraps the policy once its optimizer exists


def engine(accelerator: Any) -> str:
    """Accelerate's distributed type as an upper-case name: "NO", "MULTI_GPU", "MULTI_CPU", "FSDP", ..."""
    return str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type)).upper()


def check_distributed_support(accelerator: Any, args: Any, peft: bool = False) -> None:
    """Refuse, before the model loads, the multi-process set-ups the trainer cannot yet run exactly (and write
    grpo's settings into a DeepSpeed config, `grpo.zero.configure`)."""
    kind = engine(accelerator)
    if kind in UNSUPPORTED_ENGINES:
        raise NotImplementedError(
            f"accelerate is configured for {kind}, which grpo does not support yet. Use DDP (`accelerate launch "
            "--multi_gpu`), FSDP2 or DeepSpeed ZeRO (examples/accelerate/); see docs/distributed.md."
        )
    if kind == "FSDP":
        check_fsdp(accelerator.state.fsdp_plugin, peft)
    if kind == "DEEPSPEED":
        zero.check_deepspeed(accelerator.state.deepspeed_plugin, args)
        zero.configure(accelerator.state.deepspeed_plugin, args)
    count = accelerator.num_processes
    if args.world_size != count:
        raise ValueError(
            f"GRPOConfig was built for WORLD_SIZE={args.world_size} but accelerate runs {count} process(es). Create "
            "the config inside the launched script, and launch with `accelerate launch` or torchrun."
        )
    if count == 1:
        return
    for name, on in (("dynamic_sampling", args.dynamic_sampling), ("top_entropy_quantile < 1",
                                                                    args.top_entropy_quantile < 1)):
        if on:
            raise NotImplementedError(f"{name} is not supported with several processes yet; turn it off or run "
                                      "a single process.")


# ---- FSDP2 ---------------------------------------------------------------------------------------------------
# The policy is sharded with torch's FSDP2 (`fully_shard`) through Accelerate's FSDP plugin. Each process holds
# a 1/N shard of the weights, gradients and optimizer moments; the full weights are gathered only where the whole
# model is needed at once (generation, the no-grad log-prob passes, TR-DPO reference mixing, saving), and always
# by every process at the same point of the loop.

def check_fsdp(plugin: Any, peft: bool) -> None:
    """The FSDP settings grpo has run (see docs/distributed.md); the others are refused rather than half-working."""
    if plugin.fsdp_version != 2:
        raise NotImplementedError("grpo supports FSDP2 only (fully_shard): set `fsdp_version: 2` in the accelerate "
                                  "config (FSDP_VERSION=2); see examples/accelerate/fsdp.yaml.")
    if plugin.activation_checkpointing:
        raise NotImplementedError("fsdp_activation_checkpointing is not supported by grpo (it renames the decoder "
                                  "layers the rollout engine reads); set GRPOConfig.gradient_checkpointing=True "
                                  "instead, which works under FSDP.")
    if peft:
        raise NotImplementedError("peft_config with FSDP is not supported yet; use DDP for LoRA training.")


def enable_fsdp_on_cpu(accelerator: Any) -> None:
    """Turn Accelerate's FSDP plugin on for a multi-process CPU run launched with ACCELERATE_USE_FSDP=true.

    Accelerate (1.15) enables FSDP only for accelerator devices: CPU processes (`cpu=True`, gloo) asked for FSDP
    silently run as plain data parallel. torch's FSDP2 runs on CPU with gloo, so grpo sets the plugin up itself
    there, from the same FSDP_* variables `accelerate launch` sets; this is how FSDP is tested without GPUs.
    """
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not asked or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()  # reads FSDP_VERSION, FSDP_AUTO_WRAP_POLICY, ...
    if accelerator.state.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.state.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP


def shard_policy(accelerator: Any, policy: torch.nn.Module, optimizer: Any) -> torch.nn.Module:
    """Shard the training forward (`PolicyLogps` around the causal LM) with FSDP2, or wrap it in DeepSpeed's
    ZeRO engine (`grpo.zero`); a no-op for other engines.

    Accelerate's FSDP2 needs the model and its optimizer together: it shards the parameters in place and points
    the optimizer (built on the full parameters, ours or the user's) at the shards. The decoder layers
    (`_no_split_modules` of the causal LM) become their own FSDP units under TRANSFORMER_BASED_WRAP; the
    embeddings, final norm and LM head stay in the root unit, which the chunked LM head reads directly.
    """
    from torch.distributed.fsdp import FSDPModule

    if engine(accelerator) == "DEEPSPEED" and not zero.is_engine(policy):
        return zero.prepare(accelerator, policy, optimizer)
    if engine(accelerator) != "FSDP" or isinstance(policy, FSDPModule):
        return policy
    policy._no_split_modules = getattr(policy.model, "_no_split_modules", None)  # PolicyLogps has none itself
    policy, _ = accelerator.prepare(policy, optimizer)  # the optimizer is updated in place; keep the plain one
    return policy


_GATHERED: weakref.WeakSet = weakref.WeakSet()  # FSDP roots whose full weights are gathered right now


@contextmanager
def full_weights(root: torch.nn.Module) -> Iterator[None]:
    """Within the block every module under `root` holds its full, unsharded weights as plain tensors, and runs
    its forward without any communication. Nothing happens unless `root` is sharded with FSDP2.

    Every process must enter at the same point (the gather is a collective); inside, each process may run as
    many forwards as its data needs (generation lengths differ), or none. Re-entering a gathered root does
    nothing, so a block run by one process only (evaluation on the main process) may nest inside. Weights
    written inside the block are not kept: the shards are the truth. Under DeepSpeed ZeRO-3 the same holds
    (`grpo.zero.full_weights`).
    """
    from torch.distributed.fsdp import FSDPModule

    if zero.is_engine(root):
        if root in _GATHERED:
            yield
            return
        with zero.full_weights(root):
            _GATHERED.add(root)
            try:
                yield
            finally:
                _GATHERED.discard(root)
        return
    units = [m for m in root.modules() if isinstance(m, FSDPModule)]
    if not units or root in _GATHERED:
        yield
        return
    # FSDP decides which unit is the root on the first forward; generation calls the causal LM, not `root`, and
    # may come first, so that decision is made here (else a decoder layer would become a root of its own).
    root._get_fsdp_state()._lazy_init()
    groups = [g for m in units for g in m._get_fsdp_state()._fsdp_param_groups]
    after_forward = [g.post_forward_mesh_info for g in groups]
    # FSDP records every forward's module order to prefetch in the next backward; forwards in this block are
    # not followed by one, and their number differs between processes (the main one alone may evaluate), so
    # their records are dropped at the end, else the processes would prefetch different units and deadlock.
    forward_order = [g.comm_ctx.post_forward_order for g in groups]
    recorded = [(len(order), len(g._post_forward_indices)) for g, order in zip(groups, forward_order)]
    for unit in units:
        unit.unshard()
    for group in groups:  # no reshard after each forward: the next forward would all-gather again
        group.post_forward_mesh_info = None
    _GATHERED.add(root)
    try:
        yield
    finally:
        _GATHERED.discard(root)
        for group, info, order, (orders, indices) in zip(groups, after_forward, forward_order, recorded):
            group.post_forward_mesh_info = info
            del order[orders:], group._post_forward_indices[indices:]
        for unit in units:
            unit.reshard()


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether `model`'s parameters are FSDP2 shards (DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


@dataclass
class FullState:
    """The full (unsharded) model and optimizer state of an FSDP run, on the CPU of the main process (a ZeRO-3
    run's weights only: its optimizer partitions go into DeepSpeed's own checkpoint)."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None


def gather_full_state(model: torch.nn.Module, optimizer: Any = None) -> FullState | None:
    """The full state dicts of an FSDP2-sharded causal LM and its optimizer; None when `model` is not sharded.

    A collective: every process calls it; the tensors land on the main process's CPU (the others get empty
    dicts). Keys are the causal LM's own names, so `save_pretrained(state_dict=...)` writes a normal checkpoint
    and the optimizer state is keyed by parameter name.
    """
    if zero.is_partitioned(model):  # ZeRO-3: the weights; its optimizer state is DeepSpeed's own checkpoint
        return FullState(zero.gather_weights(model, torch.distributed.get_rank() == 0), None)
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    tied = _tied_names(model)  # written once, as `save_pretrained` does for an unsharded model
    weights = {k: v for k, v in get_model_state_dict(model, options=options).items() if k not in tied}
    moments = get_optimizer_state_dict(model, optimizer, options=options) if optimizer is not None else None
    return FullState(weights, moments)


def load_full_state(model: torch.nn.Module, weights: dict[str, torch.Tensor], optimizer: Any = None,
                    moments: dict[str, Any] | None = None) -> None:
    """Load full state dicts (as `gather_full_state` wrote them) into an FSDP2-sharded model and optimizer; each
    process keeps its own shard. A collective: every process calls it with the same full dicts."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, strict=False)
    missing, unexpected = set_model_state_dict(model, weights, options=options)
    untied = [name for name in missing if name not in _tied_names(model)]
    if not weights or untied or unexpected:
        raise ValueError(f"the checkpoint does not match the model: missing {untied[:5]}, unexpected "
                         f"{unexpected[:5]}. Resume with the model the run started with.")
    if moments is not None:
        set_optimizer_state_dict(model, optimizer, optim_state_dict=moments,
                                 options=StateDictOptions(full_state_dict=True))


def _tied_names(model: torch.nn.Module) -> set[str]:
    """Parameter names that alias another parameter (a tied LM head): `save_pretrained` writes them once."""
    seen, tied = set(), set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        seen.add(id(p))
    return tied
