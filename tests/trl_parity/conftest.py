"""Fixtures of the TRL parity suite: one tiny causal LM and one tiny reward model per session, and `run_both`."""

from __future__ import annotations

import pytest
from parity import LIBRARIES, Case, Observation, observe


@pytest.fixture(scope="session")
def reward_model_dir(tmp_path_factory, tiny_model_dir) -> str:
    """A tiny sequence-classification model (one score) with the embedded model's tokenizer, as a user's reward
    model checkpoint would be."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.num_labels, config.pad_token_id = 1, AutoTokenizer.from_pretrained(tiny_model_dir).pad_token_id
    path = tmp_path_factory.mktemp("tiny-reward-model")
    LlamaForSequenceClassification(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return str(path)


@pytest.fixture
def run_both(tmp_path, tiny_model_dir, reward_model_dir):
    """run_both(case, train=True) -> {"trl": Observation, "grpo": Observation}."""

    def run(case: Case, train: bool = True) -> dict[str, Observation]:
        return {lib: observe(lib, case, tiny_model_dir, str(tmp_path / lib), reward_model_dir, train)
                for lib in LIBRARIES}

    return run
