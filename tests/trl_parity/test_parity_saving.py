"""`save_model` writes the same files in TRL and grpo (a full model, or a LoRA adapter), and what it writes loads
with `AutoModelForCausalLM` as a user would load it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from parity import Case
from transformers import AutoModelForCausalLM


@pytest.mark.parametrize("peft", [False, True], ids=["full-model", "lora-adapter"])
def test_same_files_and_they_load(run_both, tmp_path, peft):
    written = {}
    for library, seen in run_both(Case(peft=peft), train=False).items():
        assert seen.refused_at is None, seen.error
        target = tmp_path / f"saved-{library}"
        seen.trainer.save_model(str(target))
        written[library] = sorted(p.name for p in Path(target).iterdir())
        loaded = AutoModelForCausalLM.from_pretrained(target)  # an adapter directory loads its base model too
        # the loaded weights are the trainer's: the adapter's A matrix (B starts at 0), or the LM head
        name = "model.layers.0.self_attn.q_proj.lora_A.default.weight" if peft else "lm_head.weight"
        in_trainer = ("base_model.model." if peft else "") + name
        torch.testing.assert_close(loaded.state_dict()[name], seen.trainer.model.state_dict()[in_trainer])
    assert written["grpo"] == written["trl"]
