"""Loading the policy, its tokenizer and the reference model: from a hub id, a local directory or an object."""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from grpo.embedded import EMBEDDED_MODEL_ID, tiny_model_path


def resolve_model_id(model: str) -> str:
    """`grpo:tiny` names the embedded default; anything else is a hub id or a local path."""
    if model == EMBEDDED_MODEL_ID:
        return tiny_model_path()
    expanded = os.path.expanduser(model)
    looks_local = model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model
    if looks_local and not os.path.exists(expanded):
        raise FileNotFoundError(
            f"model path '{model}' does not exist. Pass an existing directory with config.json and weights, "
            f"a hub id such as 'Qwen/Qwen2-0.5B-Instruct', or '{EMBEDDED_MODEL_ID}' for the embedded tiny model."
        )
    return expanded


def _init_kwargs(model_init_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    kwargs = dict(model_init_kwargs or {})
    dtype = kwargs.get("dtype", kwargs.pop("torch_dtype", None))
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    kwargs["dtype"] = dtype if dtype is not None else torch.float32  # TRL: float32 unless asked otherwise
    return kwargs


def load_causal_lm(model: str | PreTrainedModel, model_init_kwargs: dict[str, Any] | None = None
                   ) -> PreTrainedModel:
    if isinstance(model, PreTrainedModel):
        return model
    if not isinstance(model, str):
        raise TypeError(f"model must be a hub id, a local path or a PreTrainedModel, got {type(model).__name__}.")
    path = resolve_model_id(model)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=_trusts_remote_code(model_init_kwargs))
    except OSError as e:
        raise OSError(
            f"could not load model '{model}': {e}\nPass a local directory with config.json and weights, or a hub id "
            "(downloading needs network access)."
        ) from e
    remote = "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING and not remote:  # before any weights are read
        raise ValueError(
            f"model '{model}' is not a causal language model (its config is {type(config).__name__}); GRPO "
            "needs one that AutoModelForCausalLM can load, such as a Llama, Qwen2 or GPT-2 checkpoint."
        )
    return AutoModelForCausalLM.from_pretrained(path, **_init_kwargs(model_init_kwargs))


def _trusts_remote_code(model_init_kwargs: dict[str, Any] | None) -> bool:
    return bool((model_init_kwargs or {}).get("trust_remote_code", False))


def load_tokenizer(model: str | PreTrainedModel, processing_class: Any = None,
                   model_init_kwargs: dict[str, Any] | None = None) -> Any:
    """The tokenizer for generation: given, or loaded beside the model; left padding, pad falls back to EOS."""
    if processing_class is None:
        source = model.config._name_or_path if isinstance(model, PreTrainedModel) else resolve_model_id(model)
        processing_class = AutoTokenizer.from_pretrained(source,
                                                         trust_remote_code=_trusts_remote_code(model_init_kwargs))
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token: generation could never end. Set tokenizer.eos_token.")
    return tokenizer


def reference_model(policy: PreTrainedModel, source: str | PreTrainedModel,
                    model_init_kwargs: dict[str, Any] | None) -> PreTrainedModel:
    """A frozen copy of the initial policy for the KL term (the same weights, loaded again or copied)."""
    ref = load_causal_lm(source, model_init_kwargs) if isinstance(source, str) else copy.deepcopy(policy)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def enable_gradient_checkpointing(model: Any, kwargs: dict[str, Any]) -> None:
    # transformers 5.23 renamed gradient checkpointing to activation checkpointing; older versions lack the new name.
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def wrap_peft(model: PreTrainedModel, peft_config: Any) -> Any:
    try:
        from peft import get_peft_model
    except ImportError as e:
        raise ImportError("peft_config needs the peft library: pip install 'grpo[peft]'") from e
    return get_peft_model(model, peft_config)
