"""Several processes, one run: the few collectives that make N processes train exactly like one.

Every process draws the same global round of prompts from the sampler and generates whole groups for its own
contiguous share of them, so the G completions of a prompt never straddle two processes. Rewards are then
gathered, so advantages (and "batch" reward scaling) are computed over the whole round, exactly as one process
would; each process keeps its own rows' advantages. The loss normaliser counts the whole global optimizer step
(token counts are summed over processes), and since DDP averages gradients over processes, each process scales
its partial loss by the number of processes: the summed gradient is then the one-process gradient.

Every collective here is called by every process at the same point of the loop (per round, per step, per save),
never inside a branch that depends on one process's data, so processes whose completions finish early wait at
the next collective rather than deadlock.
"""

from __future__ import annotations

from typing import Any

import torch


def accelerator_kwargs(args: Any) -> dict[str, Any]:
    """Accelerate runs several CPU processes (gloo) only when told `cpu=True`; without it each process of a
    CPU-only torchrun would silently train alone."""
    return {"cpu": args.use_cpu or (args.world_size > 1 and not torch.cuda.is_available())}


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

    def wait(self) -> None:
        if self.count > 1:
            self.accelerator.wait_for_everyone()


# Sharded engines need the full weights gathered for generation and their own checkpoint format; not built yet.
UNSUPPORTED_ENGINES = ("FSDP", "DEEPSPEED", "MEGATRON_LM")


def check_distributed_support(accelerator: Any, args: Any) -> None:
    """Refuse, before the model loads, the multi-process set-ups the trainer cannot yet run exactly."""
    kind = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type)).upper()
    if kind in UNSUPPORTED_ENGINES:
        raise NotImplementedError(
            f"accelerate is configured for {kind}, which grpo does not support yet: it needs the full weights "
            "gathered for generation. Use DDP (`accelerate launch --multi_gpu`, or `accelerate config` without "
            "FSDP/DeepSpeed); see docs/distributed.md."
        )
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
