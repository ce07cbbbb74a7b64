"""Loading the policy (grpo/models.py): what happens to its weights before training."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from grpo.models import _file_mapped_ranges, _inside, copy_file_mapped_weights


def is_file_mapped(tensor: torch.Tensor) -> bool:
    return _inside(_file_mapped_ranges(), tensor.data_ptr())


def test_trainable_weights_mapped_from_the_checkpoint_get_a_copy_of_their_own(tmp_path):
    """transformers maps a safetensors checkpoint copy-on-write: each trainable weight leaves the mapping (values,
    names and tying unchanged), a frozen one stays, and a second call finds nothing to copy."""
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, tie_word_embeddings=True)).save_pretrained(tmp_path)
    model = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    frozen = model.model.layers[1].mlp.down_proj.weight
    frozen.requires_grad_(False)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    mapped = [name for name, p in model.named_parameters() if is_file_mapped(p)]
    assert len(mapped) == len(before)  # every weight a view of the file: the case this exists for

    assert copy_file_mapped_weights(model) == len(before) - 1
    still_mapped = [name for name, p in model.named_parameters() if is_file_mapped(p)]
    assert still_mapped == ["model.layers.1.mlp.down_proj.weight"]
    assert model.lm_head.weight is model.model.embed_tokens.weight
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    assert copy_file_mapped_weights(model) == 0


def test_weights_in_the_process_own_memory_are_left_alone():
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2))
    pointers = [p.data_ptr() for p in model.parameters()]
    assert copy_file_mapped_weights(model) == 0
    assert [p.data_ptr() for p in model.parameters()] == pointers
