"""Callbacks, as in transformers' Trainer: any `TrainerCallback` gets its events with (args, state, control,
**kwargs), and the `TrainerControl` flags it sets decide what the loop does next.

The events go through transformers' own `CallbackHandler`, led by its `DefaultFlowCallback`, which sets
should_log / should_evaluate / should_save / should_training_stop from logging_steps, eval_steps (and eval_delay),
save_steps, logging_first_step and max_steps exactly as in transformers; the loop then acts on the flags, whoever
set them. So transformers' callbacks work unchanged: `EarlyStoppingCallback` (with metric_for_best_model, ranked
here by `update_best_metric` as transformers does), `PrinterCallback`, your own. Callbacks that save state
(`ExportableState`, e.g. EarlyStoppingCallback's patience counter) are written to each checkpoint's
trainer_state.json and restored on resume when restore_callback_states_from_checkpoint=True, as in transformers.
"""

from __future__ import annotations

import math
from typing import Any

from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback, ExportableState, TrainerControl


class Callbacks:
    """The run's callbacks and its `TrainerControl`; `event` calls one event on every callback, in order."""

    def __init__(self, callbacks: list[Any] | None, args: Any, model: Any, processing_class: Any):
        self.args = args
        self.handler = CallbackHandler([DefaultFlowCallback, *(callbacks or [])], model, processing_class, None, None)
        self.control = TrainerControl()

    def set_optimizer(self, optimizer: Any, lr_scheduler: Any) -> None:
        """The optimizer and schedule, which exist from train() on; events pass them to callbacks as kwargs."""
        self.handler.optimizer, self.handler.lr_scheduler = optimizer, lr_scheduler

    def event(self, name: str, state: Any, **kwargs: Any) -> TrainerControl:
        """Call `on_<name>` on every callback; returns (and keeps) the control they leave."""
        self.control = getattr(self.handler, name)(self.args, state, self.control, **kwargs)
        return self.control

    # transformers' Trainer API
    def add(self, callback: Any) -> None:
        self.handler.add_callback(callback)

    def pop(self, callback: Any) -> Any:
        return self.handler.pop_callback(callback)

    def remove(self, callback: Any) -> None:
        self.handler.remove_callback(callback)

    # ---- state that checkpoints carry ------------------------------------------------------------------------
    def export(self, state: Any) -> None:
        """Put every stateful callback's state (and the control's) into state.stateful_callbacks, by class name."""
        exported: dict[str, Any] = {}
        for callback in [*self.handler.callbacks, self.control]:
            if isinstance(callback, ExportableState):
                name = type(callback).__name__
                exported[name] = [*exported[name], callback.state()] if name in exported else [callback.state()]
        state.stateful_callbacks = {name: states[0] if len(states) == 1 else states
                                    for name, states in exported.items()}

    def restore(self, state: Any) -> None:
        """On resume with restore_callback_states_from_checkpoint: each saved callback state back into the callbacks
        of the same class (and the control), in order."""
        if not self.args.restore_callback_states_from_checkpoint:
            return
        for name, saved in (state.stateful_callbacks or {}).items():
            targets = [c for c in [*self.handler.callbacks, self.control] if type(c).__name__ == name]
            for callback, data in zip(targets, saved if isinstance(saved, list) else [saved]):
                for attribute, value in data.get("attributes", {}).items():
                    setattr(callback, attribute, value)
                if isinstance(callback, TrainerControl):  # its flags live in "args"
                    for flag, value in data.get("args", {}).items():
                        setattr(callback, flag, value)


def update_best_metric(state: Any, args: Any, metrics: dict[str, float]) -> bool:
    """transformers' ranking of evaluations: with metric_for_best_model, keep state.best_metric and the step it was
    reached at (state.best_global_step); returns whether `metrics` is a new best. An unknown metric is an error
    that lists the ones there are."""
    name = args.metric_for_best_model
    if name is None:
        return False
    key = name if name.startswith("eval_") else f"eval_{name}"
    if key not in metrics:
        raise KeyError(f"GRPOConfig.metric_for_best_model={name!r}: evaluation logged no {key!r}; it logs "
                       f"{sorted(k for k in metrics if k.startswith('eval_'))}.")
    value, best = metrics[key], state.best_metric
    if best is None:
        best = -math.inf if args.greater_is_better else math.inf
    if (value > best) if args.greater_is_better else (value < best):
        state.best_metric = value
        if args.save_strategy == "steps":
            state.best_global_step = state.global_step
        return True
    return False
