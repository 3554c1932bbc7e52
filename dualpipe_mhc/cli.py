"""``dualpipe-mhc <command>``: the command line. Command modules are imported only when chosen,
so ``simulate`` and ``plan`` start without torch."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

# Optional dependencies and the extra that brings each.
_EXTRAS = {"ray": "cluster", "pynvml": "cluster", "triton": "kernels"}

COMMANDS = ("simulate", "run", "profile", "profile-stages", "plan", "stability", "calibrate-link")


def _module(command: str):
    return importlib.import_module(f"dualpipe_mhc.commands.{command.replace('-', '_')}")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dualpipe-mhc",
        description="Simulate, run and profile DualPipe-style pipeline schedules for mHC transformers.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name in COMMANDS:
        # Help texts of the other commands would cost their imports; only the chosen one is loaded.
        mod = _module(name) if name == command else None
        p = sub.add_parser(name, help=getattr(mod, "HELP", None) if mod else f"see 'dualpipe-mhc {name} -h'")
        p.add_argument("--config", metavar="FILE", help="TOML/YAML/JSON config file or bundled preset name")
        p.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="a.b=v", help="override a config field"
        )
        p.add_argument("--json", metavar="FILE", help="write the report as a JSON object to FILE")
        p.add_argument("--out", metavar="DIR", help="write traces, pictures and other files here")
        if mod is not None and hasattr(mod, "add_arguments"):
            mod.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if a in COMMANDS), None)
    args = build_parser(command).parse_args(argv)
    mod = _module(args.command)

    from .config import ConfigError, load_config

    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        print(f"dualpipe-mhc {args.command}: error: --out {args.out} is a file; name a directory", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config or getattr(mod, "DEFAULT_CONFIG", None), args.overrides)
        report = mod.main(cfg, args)
    except (ConfigError, ValueError) as exc:
        # A command that reached an answer before failing (an infeasible plan, say) attaches it
        # as ``exc.report``: the JSON still tells a script what was found.
        if args.json and getattr(exc, "report", None) is not None:
            _write_json(args.json, {**exc.report, "error": str(exc)})
        print(f"dualpipe-mhc {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        extra = _EXTRAS.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        print(
            f"dualpipe-mhc {args.command}: error: needs {exc.name}, which is not installed; "
            f"pip install 'dualpipe-mhc[{extra}]' (or pip install -e '.[{extra}]' from a checkout)",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(f"dualpipe-mhc {args.command}: interrupted", file=sys.stderr)
        return 130
    if args.json:
        _write_json(args.json, report)
    return 0


def _write_json(file: str, report: dict) -> None:
    path = Path(file)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    sys.exit(main())
