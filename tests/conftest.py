"""Shared fixtures: the embedded tiny model saved to a local directory, as a user's checkpoint would be."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    os.environ["GRPO_CACHE"] = str(tmp_path_factory.mktemp("grpo-cache"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    from grpo.embedded import build_model, build_tokenizer

    path = tmp_path_factory.mktemp("tiny-model")
    tokenizer = build_tokenizer()
    build_model(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
