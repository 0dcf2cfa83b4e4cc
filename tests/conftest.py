"""Suite-wide settings every test and every child process inherits."""

import os
from typing import Any

# operator/ at the repository root shadows the standard library's `operator` module in any
# `python -c`/`-m` child whose working directory is the root (multiprocessing spawn included).
os.environ["PYTHONSAFEPATH"] = "1"
# Two cores: one thread per rank, or ranks fight over them.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


# --- No silent skips -------------------------------------------------------------------------------
# A test may skip only for a reason on `allowed_skips` (pyproject.toml, [tool.pytest.ini_options]):
# each entry is a regular expression searched in the skip reason. Any other skip fails the run, and
# the allowed ones are listed at the end, so a missing tool or a CPU the suite has not seen cannot
# turn a green run into one that tested less.
import re  # noqa: E402

import pytest  # noqa: E402

_skips: list[tuple[str, str, bool]] = []  # (test id, reason, allowed)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini("allowed_skips", "regular expressions of skip reasons that do not fail the run", type="linelist")


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    config = _config
    patterns = config.getini("allowed_skips") if config is not None else []
    reason = _skip_reason(report)
    _skips.append((report.nodeid, reason, any(re.search(p, reason) for p in patterns)))


_config: pytest.Config | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _config
    _config = config


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if any(not allowed for _, _, allowed in _skips) and session.exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if not _skips:
        terminalreporter.write_line("skips: none")
        return
    allowed = [(t, r) for t, r, ok in _skips if ok]
    refused = [(t, r) for t, r, ok in _skips if not ok]
    if allowed:
        terminalreporter.section(f"{len(allowed)} allowed skips (allowed_skips in pyproject.toml)", sep="-")
        for test, reason in allowed:
            terminalreporter.write_line(f"{test}: {reason}")
    if refused:
        terminalreporter.section(f"{len(refused)} skips NOT on allowed_skips: the run fails", sep="-", red=True)
        for test, reason in refused:
            terminalreporter.write_line(f"{test}: {reason}", red=True)
