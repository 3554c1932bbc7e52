"""``dualpipe-mhc <command>``: the command line. Command modules are imported only when chosen,
so ``--help`` and ``simulate`` / ``plan`` start without torch; the table below holds what the
top-level help needs.

Output rule, one for every command: files go under ``--out DIR``, default ``out/<command>/``;
``--json FILE`` writes the report. Both are checked (created and probed) before any work starts.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Command:
    help: str  # one line: what the command does
    preset: str  # the config it runs without --config
    writes_files: bool  # True: always writes under --out (default out/<command>/); False: only with --out


COMMANDS = {
    "simulate": Command("compare the four schedules at n = 1 and n (no GPU, no Ray)", "paper-27b", False),
    "plan": Command("choose the mHC recompute block L_r under a memory budget", "paper-27b", False),
    "run": Command("train on Ray stage workers; measured vs simulated step", "tiny", True),
    "profile": Command("mHC vs the plain residual on one pipeline: the overhead", "tiny", True),
    "profile-stages": Command("measure each distinct stage on this device, simulate every schedule from it", "tiny",
                              True),
    "stability": Command("plain / HC / mHC trained side by side: Amax gains", "tiny", True),
    "calibrate-link": Command("achieved one-way bandwidth between two workers", "tiny", True),
}

# Optional dependencies and the extra that brings each.
_EXTRAS = {"ray": "cluster", "pynvml": "cluster", "triton": "kernels"}


class OutputError(ValueError):
    """An output path that cannot be written; raised before any work starts."""


def _module(command: str):
    return importlib.import_module(f"dualpipe_mhc.commands.{command.replace('-', '_')}")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dualpipe-mhc",
        description="Simulate, run and profile DualPipe-style pipeline schedules for mHC transformers.",
        epilog="'dualpipe-mhc COMMAND -h' lists a command's options.",
    )
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")
    for name, spec in COMMANDS.items():
        files = f"out/{name}/" if spec.writes_files else "none unless --out is given"
        p = sub.add_parser(
            name, help=spec.help.replace("%", "%%"),  # argparse %-formats help, not descriptions
            description=f"{spec.help}. Default config: {spec.preset}; files: {files}."
            + (f"\n\n{_module(name).__doc__.strip()}" if name == command else ""),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--config", metavar="FILE", help=f"TOML/YAML/JSON config file or bundled preset name "
                                                         f"(default: {spec.preset})")
        p.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="a.b=v", help="override a config field"
        )
        p.add_argument("--json", metavar="FILE", help="write the report as a JSON object to FILE")
        p.add_argument("--out", metavar="DIR", help=f"write traces, pictures and other files here (default: {files})")
        # Only the chosen command's options are loaded: the others would cost their imports.
        if name == command:
            mod = _module(name)
            if hasattr(mod, "add_arguments"):
                mod.add_arguments(p)
    return parser


def check_output_file(path: str, flag: str) -> Path:
    """Make sure ``path`` can be written as a file, creating its parent folders; a probe file is
    created and removed where none exists, an existing file is opened for appending (not truncated)."""
    target = Path(path)
    if target.is_dir():
        raise OutputError(f"{flag} {path} is a directory; name a file, e.g. {flag} {target / 'report.json'}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            with open(target, "a"):
                pass
        else:
            with open(target, "x"):
                pass
            target.unlink()
    except OSError as exc:
        raise OutputError(f"{flag} {path} cannot be written ({exc.strerror or exc}); name a writable file") from None
    return target


def check_output_dir(path: str, flag: str) -> Path:
    """Make sure ``path`` is a writable folder, creating it: a probe file is created and removed."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise OutputError(f"{flag} {path} is a file; name a directory")
    try:
        target.mkdir(parents=True, exist_ok=True)
        probe = target / f".dualpipe-mhc-probe-{os.getpid()}"
        with open(probe, "x"):
            pass
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or exc
        raise OutputError(f"{flag} {path} cannot be written ({reason}); name a writable directory") from None
    return target


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if a in COMMANDS), None)
    args = build_parser(command).parse_args(argv)
    spec = COMMANDS[args.command]

    def fail(message: object) -> int:
        print(f"dualpipe-mhc {args.command}: error: {message}", file=sys.stderr)
        return 2

    mod = _module(args.command)
    from .config import ConfigError, load_config

    try:
        # A command that sweeps schedules checks each one it runs, not pipeline.schedule's rules.
        rules = not getattr(mod, "SWEEPS_SCHEDULES", False)
        cfg = load_config(args.config or spec.preset, args.overrides, schedule_rules=rules)
        # Output places before any work: a bad one is found before minutes of training, not after.
        if args.json:
            check_output_file(args.json, "--json")
        if args.out is None and spec.writes_files:
            args.out = f"out/{args.command}"
        if args.out is not None:
            check_output_dir(args.out, "--out")
        report = mod.main(cfg, args)
    except (ConfigError, ValueError) as exc:
        # A command that reached an answer before failing (an infeasible plan, say) attaches it
        # as ``exc.report``: the JSON still tells a script what was found.
        if args.json and getattr(exc, "report", None) is not None:
            _write_json(args.json, {**exc.report, "error": str(exc)})
        return fail(exc)
    except ModuleNotFoundError as exc:
        extra = _EXTRAS.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        return fail(
            f"needs {exc.name}, which is not installed; "
            f"pip install 'dualpipe-mhc[{extra}]' (or pip install -e '.[{extra}]' from a checkout)"
        )
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
