"""``idlm``: the command line for people (stages have their own scripts under stages/)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from idlm import config as config_mod


def _config_use(args: argparse.Namespace) -> int:
    cfg = config_mod.load_profile(args.profile, args.overrides)
    path = config_mod.write_active(cfg)
    print(f"wrote {path.name} from configs/{args.profile}.yaml"
          + (f" with {len(args.overrides)} override(s)" if args.overrides else ""))
    return 0


def _config_check(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.file, args.overrides)
    print(f"{args.file or config_mod.active_config().name}: ok (profile {cfg.profile})")
    return 0


def _config_show(args: argparse.Namespace) -> int:
    print(config_mod.dump(config_mod.load(args.file, args.overrides)), end="")
    return 0


def _preflight(args: argparse.Namespace) -> int:
    from idlm.cluster import preflight

    named = config_mod.config_dir() / f"{args.config}.yaml"
    if args.config and not Path(args.config).exists() and named.is_file():
        cfg = config_mod.load_profile(args.config, args.overrides)
    else:
        cfg = config_mod.load(args.config, args.overrides)
    report = preflight.preflight(cfg)
    print(json.dumps(report.to_json(), indent=2) if args.json else report.table())
    for estimate in report.estimates:
        if not estimate.fits(report.budget_gib):
            raise preflight.PreflightError(preflight.refusal(cfg, report.architecture, estimate))
    return 0


def _data_refresh(args: argparse.Namespace) -> int:
    """The flow's first step, by hand: resolve the data source and pin its version."""
    from idlm.data.refresh import refresh
    from idlm.orchestration.params import prepare_params

    root = config_mod.workspace()
    data = refresh(root, config_mod.load(args.config))
    if data is None:
        print("nothing to resolve: the data is versioned by the config (synthetic data or "
              "a local path)")
        return 0
    prepare_params(root, None, [data.override()])
    print(f"data {data.source} is version {data.version} ({data.kind}); wrote "
          f"prepare.dataset.version to params.yaml")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="idlm", description="Train, verify and serve Introspective Diffusion LMs.")
    commands = parser.add_subparsers(dest="command", required=True)
    config = commands.add_parser("config", help="choose, check or show the active config")
    actions = config.add_subparsers(dest="action", required=True)
    use = actions.add_parser("use", help="make a profile (plus overrides) the active params.yaml")
    use.add_argument("profile", help="tiny, qwen3-8b, qwen3-32b or test (a file under configs/)")
    use.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    use.set_defaults(handler=_config_use)
    for name, handler, text in (("check", _config_check, "validate a config file"),
                                ("show", _config_show, "print the resolved config")):
        sub = actions.add_parser(name, help=text)
        sub.add_argument("--file", default=None, help="default: params.yaml")
        sub.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
        sub.set_defaults(handler=handler)
    check = commands.add_parser(
        "preflight", help="per-GPU memory of the training stages against cluster.gpu_memory_gib",
        description="Estimate each training stage's memory per GPU from the config alone (a "
        "meta-device model, no weights); exit 2 with what to change if a stage does not fit.")
    check.add_argument("--config", default=None,
                       help="a config file or a profile name (default: params.yaml)")
    check.add_argument("--json", action="store_true", help="print JSON instead of the table")
    check.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    check.set_defaults(handler=_preflight)
    data = commands.add_parser("data", help="the training data's source and version")
    data_actions = data.add_subparsers(dest="action", required=True)
    refresh = data_actions.add_parser(
        "refresh", help="import / update prepare.dataset.import_url (dvc import-url, dvc "
        "update) or resolve a hub revision to its commit, and pin the version in params.yaml",
        description="What the flow does before any stage: new data gives a new "
        "prepare.dataset.version, so `dvc repro` reruns prepare and everything after it.")
    refresh.add_argument("--config", default=None, help="default: params.yaml")
    refresh.set_defaults(handler=_data_refresh)
    from idlm.cli import generate, score, serve  # light: heavy imports in their handlers

    generate.add_parser(commands)
    score.add_parser(commands)
    serve.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except config_mod.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

