"""The repository root, computed in this one place for every test and support module.

Tests and helpers name files under the root as `REPO / "examples" / ...`; a test that moves to
another folder keeps finding them (counting `parents[N]` per file is how a move broke four tests).
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if not (REPO / "pyproject.toml").is_file():
    raise RuntimeError(f"tests/support/paths.py: no pyproject.toml at the computed repository root {REPO}")
