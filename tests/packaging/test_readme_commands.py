"""The README's two commands are what CI runs, as a newcomer with an empty HOME, with the answer checked."""

from __future__ import annotations

import re

from tests.support.paths import REPO


def readme_commands() -> list[str]:
    """The first two ```bash blocks of the README: the main job, then the suite."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    return [b.strip() for b in blocks[:2]]


def test_ci_runs_both_readme_commands_verbatim_in_order() -> None:
    main_job, suite = readme_commands()
    assert main_job.startswith("bash scripts/setup.sh && ") and "largemodel run -f examples/" in main_job
    assert suite == "bash scripts/test.sh"
    ci = (REPO / ".ci/run").read_text()
    lines = [line.strip() for line in ci.splitlines()]
    first = next(i for i, line in enumerate(lines) if line.startswith(main_job))
    second = lines.index(suite)
    assert first < second


def test_ci_starts_from_an_empty_home_and_checks_the_answer() -> None:
    ci = (REPO / ".ci/run").read_text()
    assert re.search(r'^HOME="\$\(mktemp -d', ci, flags=re.M), "HOME must be a new empty directory"
    assert "export HOME" in ci
    for cache in ("XDG_CACHE_HOME", "PIP_CACHE_DIR", "LARGEMODEL_MODELS_DIR", "LARGEMODEL_KERNEL_DIR"):
        assert cache in ci.split("unset", 1)[1].splitlines()[0], f"{cache} must not point at an old cache"
    assert 'grep -q "Paris"' in ci
