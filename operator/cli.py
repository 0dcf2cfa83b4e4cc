"""The `largemodel` command.

crd, inspect, plan and render live here; operator, rank and run belong to other modules and are
imported only when used, so `largemodel plan` never imports kopf's runner or torch.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from largemodel.operator import api
from largemodel.operator.manifest import (  # noqa: F401 - re-exported for callers of the CLI module
    InputError,
    describe_validation_error,
    load_largemodel,
    parse_largemodel,
)

EXIT_USAGE = 2
# subcommand -> (module with main(argv) -> int, help line)
LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "operator": ("largemodel.operator.runner", "run the operator (watches LargeModel resources)"),
    "rank": ("largemodel.runtime.launch", "pod entrypoint: start this pod's local ranks from the env contract"),
    "run": ("largemodel.runtime.local", "run a LargeModel locally: every stage on this machine"),
}


def _dump(data: Any, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(data, indent=2) + "\n"
    return yaml.safe_dump(data, sort_keys=False)


def cmd_crd(args: argparse.Namespace) -> int:
    """Print the CRD generated from the API models."""
    from largemodel.operator.crd import crd_yaml, generate_crd

    sys.stdout.write(_dump(generate_crd(), "json") if args.output == "json" else crd_yaml())
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print the architecture block of a Hugging Face config.json."""
    from largemodel.operator.modelconfig import ModelConfigError, inspect_model

    try:
        arch = inspect_model(Path(args.path))
    except ModelConfigError as err:
        raise InputError(str(err)) from None
    block = {"architecture": arch.model_dump(mode="json", by_alias=True, exclude_none=True)}
    sys.stdout.write(_dump(block, args.output))
    return 0


def plan_report(lm: api.LargeModel) -> dict[str, Any]:
    """What `largemodel plan` prints: status.plan plus the memory budget behind it."""
    from largemodel.operator.planner import plan_parallelism

    plan = plan_parallelism(lm.spec)
    return {
        "name": lm.metadata.name,
        "plan": plan.to_status().model_dump(mode="json", by_alias=True),
        "replicas": plan.replicas,
        "totalGPUs": plan.total_gpus,
        "memory": {
            "gpuMemoryGiB": lm.spec.gpu.memory_gib,
            "utilization": plan.memory_utilization,
            "usableGiBPerGPU": round(plan.usable_gib_per_gpu, 2),
            "overheadGiB": plan.overhead_gib,
            "totalGiBPerGPU": round(plan.gib_per_gpu, 2),
        },
    }


def cmd_plan(args: argparse.Namespace) -> int:
    """Plan a LargeModel file; a rejected layout exits 2 with the reason."""
    from largemodel.operator.planner import PlanError

    lm = load_largemodel(args.file)
    try:
        report = plan_report(lm)
    except PlanError as err:
        raise InputError(f"{args.file}: rejected: {err}") from None
    sys.stdout.write(_dump(report, args.output))
    return 0


def render_children(lm: api.LargeModel) -> list[dict[str, Any]]:
    """The children the operator would create for `lm`, the group Secret (a fresh random key) first."""
    import secrets

    from largemodel.operator.builders import build_children, build_group_secret, template_revision
    from largemodel.operator.planner import plan_parallelism

    plan = plan_parallelism(lm.spec)
    return [build_group_secret(lm, secrets.token_hex(32)), *build_children(lm, plan, template_revision(lm, plan))]


def cmd_render(args: argparse.Namespace) -> int:
    """Print the children as multi-document YAML (kubectl apply -f - accepts it)."""
    from largemodel.operator.planner import PlanError

    lm = load_largemodel(args.file)
    try:
        children = render_children(lm)
    except PlanError as err:
        raise InputError(f"{args.file}: rejected: {err}") from None
    sys.stdout.write(yaml.safe_dump_all(children, sort_keys=False))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="largemodel", description="Serve LLMs too big for one GPU.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    crd = sub.add_parser("crd", help="print the LargeModel CRD")
    crd.add_argument("-o", "--output", choices=["yaml", "json"], default="yaml")
    crd.set_defaults(func=cmd_crd)
    inspect = sub.add_parser("inspect", help="print the architecture block of a config.json (file or dir)")
    inspect.add_argument("path")
    inspect.add_argument("-o", "--output", choices=["yaml", "json"], default="yaml")
    inspect.set_defaults(func=cmd_inspect)
    plan = sub.add_parser("plan", help="plan the parallelism of a LargeModel file")
    plan.add_argument("-f", "--file", required=True, help="LargeModel YAML file, - for stdin")
    plan.add_argument("-o", "--output", choices=["yaml", "json"], default="yaml")
    plan.set_defaults(func=cmd_plan)
    render = sub.add_parser("render", help="print the objects the operator creates for a LargeModel file")
    render.add_argument("-f", "--file", required=True, help="LargeModel YAML file, - for stdin")
    render.set_defaults(func=cmd_render)
    for name, (_, help_line) in LAZY_COMMANDS.items():
        sub.add_parser(name, help=help_line, add_help=False)
    return parser


def _run_lazy(name: str, argv: list[str]) -> int:
    module_name = LAZY_COMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        missing = err.name or "?"
        if missing == module_name:
            print(f"largemodel: error: `largemodel {name}` is not available in this install", file=sys.stderr)
        else:
            print(
                f"largemodel: error: `largemodel {name}` needs module {missing!r}: "
                "install largemodel[runtime] (torch first, see README)",
                file=sys.stderr,
            )
        return EXIT_USAGE
    result: int = module.main(argv)
    return result


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `largemodel` console script."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] in LAZY_COMMANDS:
        return _run_lazy(args_list[0], args_list[1:])
    args = _parser().parse_args(args_list)
    try:
        code: int = args.func(args)
    except InputError as err:
        print(f"largemodel: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # `largemodel render ... | head` closes stdout early; that is not an error.
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())
