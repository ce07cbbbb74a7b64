"""The embedded default: a tiny model and tokenizer built offline, and small built-in tasks."""

from grpo.embedded.model import EMBEDDED_MODEL_ID, build_model, build_tokenizer, tiny_model_path
from grpo.embedded.tasks import TASKS, arithmetic_task, length_task

__all__ = [
    "EMBEDDED_MODEL_ID", "TASKS", "arithmetic_task", "build_model", "build_tokenizer", "length_task",
    "tiny_model_path",
]
