"""The Dockerfile: hadolint clean, pinned bases, non-root final stages, and images that hold what runs.

These tests read the Dockerfile the way a reviewer would and check it against the package's own
metadata; test_image_build.py builds the images (buildah, a stand-in base) and runs them.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.support.paths import REPO

DOCKERFILE = REPO / "Dockerfile"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
HADOLINT = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
FINAL_STAGES = ("operator", "runtime")


@dataclass
class Stage:
    """One FROM ... AS name block of the Dockerfile, continuation lines joined."""

    name: str
    base: str  # the image it starts from, through stages it builds on (`parent`)
    parent: str = ""
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        """Arguments of every instruction `keyword` (FROM, RUN, USER, ...) in this stage."""
        return [args for kw, args in self.instructions if kw == keyword]


def parse_stages(text: str, global_args: dict[str, str]) -> dict[str, Stage]:
    """The Dockerfile's stages by name, comments dropped, `\\` continuations joined, FROM ${ARG} resolved.

    `global_args` receives the ARGs declared before the first FROM, with their defaults.
    """
    logical = re.sub(r"\\\n(\s*#[^\n]*\n)*", " ", text)
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in logical.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "ARG" and current is None:
            name, _, default = args.strip().partition("=")
            global_args[name] = default
        elif keyword == "FROM":
            match = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", args.strip(), flags=re.IGNORECASE)
            assert match, f"every stage is named: FROM {args}"
            base = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m[1]], match[1])
            parent = stages.get(base)
            current = stages[match[2]] = Stage(name=match[2], base=parent.base if parent else base,
                                               parent=parent.name if parent else "")
        elif current is not None:
            current.instructions.append((keyword, " ".join(args.split())))
    return stages


GLOBAL_ARGS: dict[str, str] = {}  # ARGs before the first FROM, with their defaults
STAGES = parse_stages(DOCKERFILE.read_text(), GLOBAL_ARGS)


def test_hadolint_is_clean() -> None:
    result = subprocess.run([HADOLINT, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_hadolint_would_catch_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\nRUN apt-get install gcc\n")
    result = subprocess.run([HADOLINT, str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3013" in result.stdout


def test_stages_and_pinned_bases() -> None:
    assert list(STAGES) == ["wheel", "operator", "torch-cuda", "torch-cpu", "runtime"]
    # Bases are build args (a mirror, or test_image_build.py's stand-in) whose defaults are the pins.
    assert {s.base for s in STAGES.values()} >= {GLOBAL_ARGS["PYTHON_BASE"], GLOBAL_ARGS["CUDA_TORCH_BASE"]}
    assert GLOBAL_ARGS["TORCH"] == "cuda", "the default runtime is the CUDA one"
    assert STAGES["runtime"].parent == "torch-cuda"  # FROM torch-${TORCH}, at its default
    for stage in STAGES.values():
        assert re.fullmatch(r"[a-z0-9./_-]+:[\w.-]+@sha256:[0-9a-f]{64}", stage.base), (
            f"stage {stage.name}: base {stage.base} is not pinned by tag and digest"
        )
    assert STAGES["operator"].base.startswith("python:3.11")
    assert STAGES["runtime"].base.startswith("pytorch/pytorch:")
    assert STAGES["torch-cpu"].base == STAGES["operator"].base


def test_cpu_runtime_variant_installs_the_cpu_torch_build() -> None:
    (install,) = STAGES["torch-cpu"].all("RUN")
    assert '--index-url "${TORCH_CPU_INDEX}"' in install and "torch==2.13.0+cpu" in install
    assert GLOBAL_ARGS["TORCH_CPU_INDEX"] == "https://download.pytorch.org/whl/cpu"
    # The kernels are built against the same torch release as the runtime it goes into, either way.
    kernels = " ".join(STAGES["wheel"].all("RUN"))
    assert "then echo 2.13.0; else echo 2.8.0; fi" in kernels and "pytorch:2.8.0-" in GLOBAL_ARGS["CUDA_TORCH_BASE"]


def test_runtime_base_torch_satisfies_the_runtime_extra() -> None:
    tag = STAGES["runtime"].base.split(":", 1)[1].split("@")[0]
    torch_version = Version(tag.split("-")[0])
    assert "-cuda" in tag and tag.endswith("-runtime"), "a CUDA runtime (not devel) base"
    (torch_req,) = [Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"]["runtime"]
                    if Requirement(r).name == "torch"]
    assert torch_version in torch_req.specifier, f"base torch {torch_version} outside {torch_req.specifier}"
    # pip keeps the base's CUDA build only if the install names that very version: the runtime stage
    # reads it from the base's torch and names it in every pip install.
    runs = " ".join(STAGES["runtime"].all("RUN"))
    assert "torch==$(python -c 'import torch; print(torch.__version__.split(\"+\")[0])')" in runs
    assert runs.count('"${torch}"') == 2
    python = re.match(r"python:(\d+\.\d+)", STAGES["operator"].base)
    assert python and Version(python[1]) in SpecifierSet(PYPROJECT["project"]["requires-python"])


@pytest.mark.parametrize("name", FINAL_STAGES)
def test_final_stages_run_non_root_without_build_tools(name: str) -> None:
    stage = STAGES[name]
    (user,) = stage.all("USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric non-root USER (runAsNonRoot can verify it)"
    assert len(stage.all("HEALTHCHECK")) == 1
    assert stage.all("ENTRYPOINT") == ['["largemodel"]']
    assert "largemodel" in PYPROJECT["project"]["scripts"]
    commands = " ".join(stage.all("RUN"))
    for tool in ("apt-get", "apk ", "gcc", "build-essential", "make ", "git "):
        assert tool not in commands, f"{name} installs or runs {tool.strip()}"
    assert not stage.all("COPY"), "final stages take the wheel through a bind mount, leaving no copy behind"
    version = PYPROJECT["project"]["version"]
    assert f"LARGEMODEL_VERSION={version}" in stage.all("ARG")


def test_runtime_healthcheck_and_ports_match_the_env_contract() -> None:
    from largemodel import envcontract

    runtime = STAGES["runtime"]
    assert f"{envcontract.METRICS_PORT}={envcontract.DEFAULT_METRICS_PORT}" in " ".join(runtime.all("ENV"))
    assert "/healthz" in runtime.all("HEALTHCHECK")[0]
    assert runtime.all("CMD") == ['["rank"]']
    exposed = {int(p) for args in runtime.all("EXPOSE") for p in args.split()}
    assert {8000, 9000, envcontract.DEFAULT_METRICS_PORT, envcontract.DEFAULT_MASTER_PORT} <= exposed


def test_operator_image_command_is_one_the_operator_accepts() -> None:
    from largemodel.operator.runner import parse_args

    operator = STAGES["operator"]
    (cmd,) = operator.all("CMD")
    argv = json.loads(cmd)
    assert argv[0] == "operator"
    args = parse_args(argv[1:])
    assert f"127.0.0.1:{args.metrics_port}/healthz" in operator.all("HEALTHCHECK")[0]
    assert operator.all("EXPOSE") == [str(args.metrics_port)]


def test_dockerignore_keeps_what_the_wheel_stage_copies() -> None:
    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    assert patterns[0] == "*", "context starts empty: no venvs, models or .git sent to the daemon"
    included = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    for copy in STAGES["wheel"].all("COPY"):
        for source in copy.split()[:-1]:
            assert source.rstrip("/") in included, f"COPY {source} is excluded by .dockerignore"


def _installed_requirements(stage: Stage) -> tuple[set[str], set[str]]:
    """(extras of the largemodel install, other distributions pip installs) in one stage."""
    commands = " ".join(stage.all("RUN"))
    match = re.search(r'"largemodel(?:\[([\w,]+)\])? @ file://', commands)
    assert match, f"stage {stage.name} installs the largemodel wheel"
    extras = set(match[1].split(",")) if match[1] else set()
    pinned = {str(canonicalize_name(name)) for name in re.findall(r"\s([A-Za-z0-9_.-]+)==[\w.]+", commands)}
    return extras, pinned


def _closure(roots: list[Requirement], extras_of_root: set[str]) -> set[str]:
    """Every distribution the requirements pull in, read from the installed metadata of .venv."""
    seen: set[str] = set()
    stack = [(req, extras_of_root) for req in roots]
    while stack:
        req, extras = stack.pop()
        if req.marker and not any(req.marker.evaluate({"extra": e}) for e in extras | {""}):
            continue
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(req.name) or []
        except metadata.PackageNotFoundError:
            continue
        stack.extend((Requirement(r), set(req.extras)) for r in requires)
    return seen


def _third_party_imports(folders: list[str]) -> dict[str, str]:
    """Top-level modules imported anywhere (lazy imports included) in these folders -> first file."""
    found: dict[str, str] = {}
    for folder in folders:
        for path in sorted((REPO / folder).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for top in {n.split(".")[0] for n in names}:
                    if top not in sys.stdlib_module_names and top not in {"largemodel", "__future__"}:
                        found.setdefault(top, f"{folder}/{path.name}")
    return found


@pytest.mark.parametrize(("stage_name", "folders"), [
    ("operator", ["src/largemodel", "operator"]),
    ("runtime", ["src/largemodel", "operator", "runtime"]),
])
def test_every_imported_module_is_installed_in_the_image(stage_name: str, folders: list[str]) -> None:
    extras, pinned = _installed_requirements(STAGES[stage_name])
    project = PYPROJECT["project"]
    roots = [Requirement(r) for r in project["dependencies"]]
    roots += [Requirement(r) for extra in sorted(extras) for r in project["optional-dependencies"][extra]]
    roots += [Requirement(name) for name in pinned]
    available = _closure(roots, extras)
    providers = metadata.packages_distributions()
    missing = []
    # The operator image needs no runtime/ module: the CLI imports `rank` and `run` lazily.
    for module, where in sorted(_third_party_imports(folders).items()):
        dists = {canonicalize_name(d) for d in providers.get(module, [])}
        if not dists & available:
            missing.append(f"{module} (imported by {where}, from {sorted(dists) or 'no installed distribution'})")
    assert missing == [], f"the {stage_name} image lacks: {missing}"
