"""Forward passes of a causal LM that return per-token log-probs of completion tokens."""

from __future__ import annotations

import inspect
from typing import Any

import torch

from grpo.algorithm import entropy_from_logits, selective_log_softmax


def completion_logps(
    model: Any,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(completion_t | prompt, completion_<t) / temperature-scaled, shape (B, C), and optionally entropy
    (carrying gradient only with `entropy_grad`, for the entropy bonus).

    Position ids come from the attention mask, so a left-padded prompt sees the same positions it saw during
    generation. Only the last C + 1 positions' logits are computed where the model supports `logits_to_keep`.
    """
    device = next(model.parameters()).device
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1).to(device)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1).to(device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    width = completion_ids.size(1)
    kwargs: dict[str, Any] = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  use_cache=False)
    if accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = width + 1
    logits = model(**kwargs).logits[:, -(width + 1):-1]
    logits = logits / temperature
    completion_ids = completion_ids.to(device)
    logps = selective_log_softmax(logits, completion_ids)
    entropy = None
    if with_entropy:
        entropy = entropy_from_logits(logits if entropy_grad else logits.detach())
    return logps, entropy


def accepts_logits_to_keep(model: Any) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


@torch.no_grad()
def completion_logps_in_chunks(model: Any, rollout: Any, temperature: float, chunk_rows: int) -> torch.Tensor:
    """`completion_logps` over a whole round without gradients, `chunk_rows` rows at a time (old / reference)."""
    pieces = []
    for start in range(0, len(rollout), chunk_rows):
        rows = torch.arange(start, min(start + chunk_rows, len(rollout)))
        logps, _ = completion_logps(model, rollout.prompt_ids[rows], rollout.prompt_mask[rows],
                                    rollout.completion_ids[rows], rollout.completion_mask[rows], temperature)
        pieces.append(logps.float().cpu())
    return torch.cat(pieces)
