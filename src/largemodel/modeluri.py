"""Model URIs: where the builders mount weights and where the runtime finds them."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

MODELS_MOUNT = "/models"
HF_CACHE_MOUNT = "/models/hf"


def pvc_claim(uri: str) -> str | None:
    """The PersistentVolumeClaim name of a pvc://CLAIM/path URI, else None."""
    parsed = urlparse(uri)
    return parsed.netloc if parsed.scheme == "pvc" else None


def resolve_model_dir(uri: str, models_mount: str = MODELS_MOUNT) -> Path:
    """Local directory holding config.json, safetensors and tokenizer files for `uri`.

    file:///abs/path is used as is; pvc://CLAIM/sub is the claim mounted at `models_mount`;
    hf://org/name is a snapshot directory under `models_mount`/hf (pre-populated cache or PVC).
    """
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(parsed.path)
    if parsed.scheme == "pvc":
        return Path(models_mount) / parsed.path.lstrip("/")
    if parsed.scheme == "hf":
        return Path(models_mount) / "hf" / parsed.netloc / parsed.path.lstrip("/")
    if parsed.scheme == "":
        return Path(uri)
    raise ValueError(f"unsupported model URI scheme {parsed.scheme!r} in {uri!r}; use file://, pvc:// or hf://")
