"""The models of a run: loading the policy, its tokenizer and the reference model (from a hub id, a local
directory or an object), and what a loaded model can do (its capabilities, read by the forward passes)."""

from __future__ import annotations

import bisect
import copy
import functools
import inspect
import os
import re
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from grpo import catalog
from grpo.embedded import EMBEDDED_MODEL_ID, tiny_model_path


def resolve_model_id(model: str) -> str:
    """`grpo:tiny` names the embedded default and a catalog name (`smollm2-135m-instruct`) a real model fetched
    once into the cache; an existing local path always wins over a catalog name; anything else is a hub id."""
    if model == EMBEDDED_MODEL_ID:
        return tiny_model_path()
    expanded = os.path.expanduser(model)
    if model in catalog.MODELS and not os.path.exists(expanded):
        return str(catalog.fetch(model))
    looks_local = model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model or model.endswith(".gguf")
    if looks_local and not os.path.exists(expanded):
        raise FileNotFoundError(
            f"model path '{model}' does not exist. Pass an existing directory with config.json and weights, a "
            f".gguf file, a hub id such as 'Qwen/Qwen2-0.5B-Instruct', '{EMBEDDED_MODEL_ID}' for the embedded tiny "
            f"model, or a catalog name ({', '.join(sorted(catalog.MODELS))})."
        )
    return expanded


def gguf_location(model: str, model_init_kwargs: dict[str, Any] | None = None) -> tuple[str, str] | None:
    """(folder, file name) when `model` is a GGUF file, or a folder with `gguf_file` in model_init_kwargs."""
    gguf_file = (model_init_kwargs or {}).get("gguf_file")
    if gguf_file:
        return resolve_model_id(model), gguf_file
    if model.endswith(".gguf"):
        path = resolve_model_id(model)
        return os.path.dirname(path) or ".", os.path.basename(path)
    return None


def check_gguf(folder: str, gguf_file: str) -> None:
    """Before any tensor is read: the file exists, the `gguf` package is there, and transformers can
    dequantize the file's architecture."""
    path = os.path.join(folder, gguf_file)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file '{path}' does not exist (model_init_kwargs['gguf_file'] is taken "
                                "relative to the model folder).")
    try:
        from gguf import GGUFReader
    except ImportError as e:
        raise ImportError("loading a GGUF model needs the gguf package: pip install 'grpo[gguf]'") from e
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    field = GGUFReader(path).fields.get("general.architecture")
    architecture = bytes(field.parts[field.data[0]]).decode() if field is not None else "(none recorded)"
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        supported = ", ".join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))
        raise ValueError(
            f"GGUF file '{path}' holds a '{architecture}' model, which transformers cannot dequantize (it reads: "
            f"{supported}). Use the model's safetensors checkpoint instead."
        )


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
    gguf = gguf_location(model, model_init_kwargs)
    if gguf is not None:
        return _load_gguf(*gguf, model_init_kwargs)
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


def _load_gguf(folder: str, gguf_file: str, model_init_kwargs: dict[str, Any] | None) -> PreTrainedModel:
    """A GGUF file dequantized into an ordinary model of the requested dtype (float32 by default): training
    never touches the quantized blocks, and the model saves as plain safetensors."""
    check_gguf(folder, gguf_file)
    kwargs = _init_kwargs(model_init_kwargs) | {"gguf_file": gguf_file}
    loaded = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    # transformers marks the model as GGUF-quantized, which makes save_pretrained refuse it; the weights are
    # already dequantized, so the same tensors in a model built from the same config (less the marker) are plain
    config = copy.deepcopy(loaded.config)
    del config.quantization_config
    with torch.device("meta"):
        plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict(), assign=True)
    buffers = dict(loaded.named_buffers())
    for name, buffer in list(plain.named_buffers()):  # non-persistent ones (rotary tables) are not in the state
        if buffer.is_meta:
            owner, _, attr = name.rpartition(".")
            plain.get_submodule(owner).register_buffer(attr, buffers[name], persistent=False)
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    return plain.eval()


def _trusts_remote_code(model_init_kwargs: dict[str, Any] | None) -> bool:
    return bool((model_init_kwargs or {}).get("trust_remote_code", False))


def load_tokenizer(model: str | PreTrainedModel, processing_class: Any = None,
                   model_init_kwargs: dict[str, Any] | None = None) -> Any:
    """The tokenizer for generation: given, or loaded beside the model; left padding, pad falls back to EOS."""
    if processing_class is None:
        gguf = None if isinstance(model, PreTrainedModel) else gguf_location(model, model_init_kwargs)
        if gguf is not None:  # the tokenizer and chat template come from the GGUF file too
            check_gguf(*gguf)
            processing_class = AutoTokenizer.from_pretrained(gguf[0], gguf_file=gguf[1])
        else:
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


def prepare_policy(model: str | PreTrainedModel, args: Any, peft_config: Any,
                   model_init_kwargs: dict[str, Any] | None) -> Any:
    """The policy as training needs it: loaded, wrapped in the PEFT adapter, its LM head in float32
    (cast_lm_head_to_fp32), dropout off (disable_dropout), gradient checkpointing on (gradient_checkpointing)."""
    model = load_causal_lm(model, model_init_kwargs)
    if peft_config is not None:
        model = wrap_peft(model, peft_config)
    if args.cast_lm_head_to_fp32:
        cast_lm_head_to_fp32(model)
    copy_file_mapped_weights(model)
    if args.disable_dropout:
        disable_dropout(model)
    if args.gradient_checkpointing:  # None: decided when training starts (needs_gradient_checkpointing)
        enable_gradient_checkpointing(model, args.gradient_checkpointing_kwargs)
    return model


def copy_file_mapped_weights(model: torch.nn.Module) -> int:
    """Trainable CPU parameters that are views of a memory-mapped file (transformers maps safetensors checkpoints
    copy-on-write) get a copy in the process's own memory; returns how many. Otherwise the optimizer's first write
    to each 4 KiB page of them is a copy-on-write fault: measured on SmolLM2-135M (2-core CPU VM, fused AdamW),
    the first step took 3.2 s mapped against 1.1 s copied, the copy 0.14 s; steps after the first 0.08 s either
    way. Peak memory is unchanged: the mapped pages are the file's, and leave the process with their mapping."""
    mapped = _file_mapped_ranges()
    copied = 0
    for param in model.parameters():
        if param.requires_grad and param.device.type == "cpu" and _inside(mapped, param.data_ptr()):
            param.data = param.data.clone()
            copied += 1
    return copied


def _file_mapped_ranges() -> list[tuple[int, int]]:
    """(start, end) of this process's private mappings of files, sorted ([] where /proc/self/maps is not)."""
    try:
        with open("/proc/self/maps") as maps:
            lines = maps.read().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:  # "start-end perms offset dev inode path"
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/") and fields[1].endswith("p"):
            start, end = fields[0].split("-")
            ranges.append((int(start, 16), int(end, 16)))
    return sorted(ranges)


def _inside(ranges: list[tuple[int, int]], address: int) -> bool:
    index = bisect.bisect_right(ranges, (address, float("inf"))) - 1
    return index >= 0 and ranges[index][0] <= address < ranges[index][1]


def prepare_reference(policy: PreTrainedModel, source: str | PreTrainedModel, args: Any,
                      model_init_kwargs: dict[str, Any] | None) -> PreTrainedModel:
    """The frozen reference for beta > 0 (`reference_model`), prepared like the policy (dropout, float32 head)."""
    ref = reference_model(policy, source, model_init_kwargs)
    if args.disable_dropout:
        disable_dropout(ref)
    if args.cast_lm_head_to_fp32 and isinstance(source, str):  # a copy of the policy has its head cast already
        cast_lm_head_to_fp32(ref)
    return ref


def disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def enable_gradient_checkpointing(model: Any, kwargs: dict[str, Any] | None) -> None:
    kwargs = kwargs or {"use_reentrant": False}
    # transformers 5.23 renamed gradient checkpointing to activation checkpointing; older versions lack the new name.
    base = base_model(model)
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if base is not model:  # PEFT: a frozen embedding's output must require grad for the recomputed layers
        model.enable_input_require_grads()


def text_config(config: Any) -> Any:
    """The language model's part of a config (a multimodal config nests it; a text model's is the config)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def attention_widths(config: Any) -> tuple[int, int]:
    """(heads x head_dim, kv heads x head_dim) of a decoder config: the widths of its queries and of its keys
    (or values)."""
    text = text_config(config)
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return heads * head_dim, (getattr(text, "num_key_value_heads", None) or heads) * head_dim


# ---- gradient checkpointing chosen by memory (gradient_checkpointing=None) ------------------------------------
def activation_bytes(config: Any, tokens: int, dtype_bytes: int, predicted_tokens: int = 0) -> int:
    """Memory a decoder keeps for the backward pass of one forward over `tokens` tokens without gradient
    checkpointing, `predicted_tokens` of them completion tokens whose LM-head probabilities are kept
    (`logprobs._LinearTokenLogps`), estimated as

        A = tokens x L x (10 h + 4 i) x dtype_bytes + predicted_tokens x V x 4

    with L layers, hidden size h, MLP size i and vocabulary V. Per layer and token: the two norms' inputs and
    outputs, q, k, v, the attention output and the residual sum (about 10 h values), and the MLP's gate, up,
    activation and product (4 i; the product is the down projection's input). Counted without k/v sharing (grouped-query
    attention keeps less) and without an attention matrix (SDPA keeps none; eager attention does). An upper
    bound for a transformers Llama: SmolLM2-135M's layers keep 11275 values a token (10898 with `fused_ops`)
    against 11904 here (`tests/test_recompute.py` checks the bound on small models)."""
    text = text_config(config)
    hidden = text.hidden_size
    mlp = getattr(text, "intermediate_size", None) or 4 * hidden
    logits = predicted_tokens * (getattr(text, "vocab_size", None) or 0) * 4
    return tokens * text.num_hidden_layers * (10 * hidden + 4 * mlp) * dtype_bytes + logits


def checkpoints_activations(model: torch.nn.Module) -> bool:
    """Whether a backward through `model` would recompute layers (gradient checkpointing is on in some module)
    rather than keep their activations: only while autograd records."""
    return torch.is_grad_enabled() and any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def needs_gradient_checkpointing(activations: int, trainable_parameters: int, free_bytes: int) -> bool:
    """On when a forward's activations A exceed half the memory left once the trainable parameters' gradients
    and AdamW's two moments (3 x 4 bytes a parameter, not allocated before the first step) are set aside:

        A > (free - 12 P) / 2

    Half, not all: the backward's own buffers, the LM head's chunks and the allocator need room too."""
    return activations > (free_bytes - 12 * trainable_parameters) / 2


def choose_gradient_checkpointing(model: Any, args: Any, prompt_tokens: int, dtype_bytes: int, free_bytes: int
                                  ) -> tuple[bool, int]:
    """(on, estimated activation bytes) for gradient_checkpointing=None: one training forward holds at most
    per_device_train_batch_size rows of `prompt_tokens` (the longest prompt) plus max_completion_length tokens,
    fewer when max_tokens_per_micro_batch cuts it."""
    config = base_model(model).config
    row = prompt_tokens + args.max_completion_length
    tokens = args.per_device_train_batch_size * row
    if args.max_tokens_per_micro_batch is not None:
        tokens = min(tokens, max(args.max_tokens_per_micro_batch, row))
    predicted = tokens * args.max_completion_length // row
    activations = activation_bytes(config, tokens, dtype_bytes, predicted)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return needs_gradient_checkpointing(activations, trainable, free_bytes), activations


def free_memory_bytes(device: torch.device) -> int:
    """Memory this process can still use: the GPU's free memory, or on CPU the system's available memory
    (MemAvailable) shared by the processes of this machine (LOCAL_WORLD_SIZE)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/proc/meminfo") as meminfo:  # free pages exclude the page cache the kernel would give back
            available = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        pass
    return available // max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)


def wrap_peft(model: PreTrainedModel, peft_config: Any) -> Any:
    try:
        from peft import get_peft_model
    except ImportError as e:
        raise ImportError("peft_config needs the peft library: pip install 'grpo[peft]'") from e
    return get_peft_model(model, peft_config)


class Float32LMHead(torch.nn.Linear):
    """An LM head kept in float32 whose logits are computed in float32 whatever the input's dtype or autocast
    (ScaleRL, arXiv 2510.13786: a float32 head makes the sampled and the trained log-probs agree more closely)."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            return torch.nn.functional.linear(hidden.float(), self.weight.float(),
                                              None if self.bias is None else self.bias.float())


def cast_lm_head_to_fp32(model: Any) -> None:
    """cast_lm_head_to_fp32: the policy's (or reference's) LM head becomes a `Float32LMHead` in place. With tied
    embeddings the input embedding shares the float32 weight, so its output is cast back to the model's dtype."""
    base = base_model(model)
    head = base.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        raise ValueError(
            f"cast_lm_head_to_fp32=True needs a plain nn.Linear LM head; this model's is a {type(head).__name__} "
            "(a PEFT adapter on lm_head is not supported: remove 'lm_head' from target_modules), or set "
            "cast_lm_head_to_fp32=False."
        )
    dtype = head.weight.dtype
    head.float()
    head.__class__ = Float32LMHead  # the same parameters (and tying), a float32 forward
    embeddings = base.get_input_embeddings()
    if embeddings is not None and embeddings.weight is head.weight and dtype != torch.float32:
        embeddings.register_forward_hook(lambda module, inputs, output: output.to(dtype))


def router_aux_loss_coef(model: Any, coef: float | None) -> float:
    """The weight of a Mixture-of-Experts model's router loss, as TRL decides it: `coef`, or the model config's own
    (0 for a model without one). A model counts as MoE when its config has `output_router_logits`."""
    config = base_model(model).config
    text = text_config(config)
    if coef and not hasattr(text, "output_router_logits"):
        raise ValueError(
            f"GRPOConfig.router_aux_loss_coef={coef} but {type(base_model(model)).__name__} is not a "
            "Mixture-of-Experts model that returns router logits, so there is no auxiliary loss to weight. Leave it "
            "None."
        )
    if not hasattr(text, "output_router_logits"):
        return 0.0
    return getattr(text, "router_aux_loss_coef", 0.0) if coef is None else coef


# ---- what a model can do -----------------------------------------------------------------------------------------
# LM heads whose logits are exactly h W^T + b (the chunked log-probs compute them from the weights)
LINEAR_HEADS = (torch.nn.Linear, Float32LMHead)
# Decoders of plain Llama structure: embed the ids, then norm / attention / gated MLP layers, a final norm. The
# rollout's lean decode step computes them from their weights, and the training forward their lookup.
LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")
# Their RMSNorm normalises in float32, rounds to the input dtype, then multiplies by the weight: the same numbers
# as `F.rms_norm` (checked bit for bit in the tests), which the lean decoder calls, and the same math as
# `fused_ops.rms_norm`, which the training forward calls.
STANDARD_RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
SILU_ACTIVATIONS = ("SiLU", "SiLUActivation")  # torch's and transformers' x * sigmoid(x)
# Config fields of models whose logits are rescaled or soft-capped after the LM head; the forward-source check
# (`_body_attribute`) catches these too, this is a second line of defence.
LOGIT_TRANSFORM_FIELDS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "logits_soft_cap",
                          "lm_head_multiplier", "output_multiplier")

# What a `*ForCausalLM.forward` does between the decoder body and the loss when its logits are plain h W^T + b:
# transformers >= 5 slices with `slice_logits_to_keep`, 4.5x with `slice_indices`.
_PLAIN_HEADS = (
    ["hidden_states = slice_logits_to_keep(hidden_states, logits_to_keep)", "logits = self.lm_head(hidden_states)"],
    ["slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep",
     "logits = self.lm_head(hidden_states[:, slice_indices, :])"],
)
_BODY_CALL = re.compile(r"^outputs(?:\s*:\s*[\w.\[\], ]+)?\s*=\s*self\.(\w+)\(")


def lm_body_and_head(model: Any) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(decoder body, LM head) of a causal LM whose logits are exactly lm_head(body(...).last_hidden_state), or
    None where that cannot be relied on: soft-capped or rescaled logits, a forward that does more, a head that is
    not a (PEFT-wrapped) `nn.Linear`, or a prompt-learning PEFT adapter (it changes the inputs)."""
    base = model
    if hasattr(model, "get_base_model"):  # PEFT: LoRA-style adapters live inside the base model's modules
        peft_config = getattr(model, "active_peft_config", None)
        if peft_config is None or getattr(peft_config, "is_prompt_learning", True):
            return None
        base = model.get_base_model()
    body_name = _body_attribute(type(base))
    config = getattr(base, "config", None)
    if body_name is None or config is None or _transforms_logits(config):
        return None
    body, head = getattr(base, body_name, None), getattr(base, "lm_head", None)
    if not isinstance(body, torch.nn.Module) or not _is_linear_head(head):
        return None
    return body, head


def vocab_size(head: torch.nn.Module) -> int:
    """Output width of an `nn.Linear` head or of a PEFT layer wrapping one."""
    return head.out_features if type(head) in LINEAR_HEADS else head.base_layer.out_features


def accepts_logits_to_keep(model: Any) -> bool:
    """Whether the model's forward can return the logits of the last few positions only (`logits_to_keep`)."""
    return "logits_to_keep" in inspect.signature(base_model(model).forward).parameters


def base_model(model: Any) -> Any:
    """The transformers model inside a PEFT wrapper, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@functools.cache
def _body_attribute(cls: type) -> str | None:
    """Name of the decoder-body attribute when `cls.forward` computes lm_head(body(...).last_hidden_state) and
    nothing else on the way to the logits; None otherwise (read from the forward's source)."""
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError, AttributeError):
        return None
    code = source.rsplit('"""', 1)[-1]  # after the docstring
    lines = [line.split("#", 1)[0].strip() for line in code.splitlines()]
    lines = [line for line in lines if line]
    try:
        start = lines.index("hidden_states = outputs.last_hidden_state")
        end = lines.index("loss = None", start)
    except ValueError:
        return None
    calls = [m.group(1) for m in map(_BODY_CALL.match, lines[:start]) if m]
    return calls[0] if len(calls) == 1 and lines[start + 1:end] in _PLAIN_HEADS else None


def _transforms_logits(config: Any) -> bool:
    text = text_config(config)
    return any(getattr(text, name, None) is not None for name in LOGIT_TRANSFORM_FIELDS)


def _is_linear_head(head: Any) -> bool:
    """An `nn.Linear`, or a PEFT layer (LoRA, ...) wrapping one."""
    return type(head) in LINEAR_HEADS or type(getattr(head, "base_layer", None)) is torch.nn.Linear
