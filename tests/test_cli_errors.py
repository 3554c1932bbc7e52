"""Bad input on the command line: exit 2, one line on stderr, no traceback, before any work starts."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

from dualpipe_mhc import cli

BAD_OUTPUTS = {
    "json in a folder that cannot exist": ("--json", "/proc/nonexistent/r.json"),
    "json is a directory": ("--json", "{tmp}"),
    "out cannot be created": ("--out", "/proc/x"),
    "out is a file": ("--out", "{tmp}/file.txt"),
    "out under a file": ("--out", "{tmp}/file.txt/sub"),
}


def _one_line_error(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"dualpipe-mhc {command}: error: ") and "Traceback" not in err
    return lines[0]


@pytest.fixture
def no_work(monkeypatch):
    """Every command's ``main`` fails the test if reached: the error must come before any work."""
    for name in cli.COMMANDS:
        mod = importlib.import_module(f"dualpipe_mhc.commands.{name.replace('-', '_')}")
        monkeypatch.setattr(mod, "main", lambda cfg, args, name=name: pytest.fail(f"{name} started its work"))


@pytest.mark.parametrize("command", list(cli.COMMANDS))
@pytest.mark.parametrize("case", list(BAD_OUTPUTS))
def test_a_bad_output_path_is_refused_before_any_work(command, case, tmp_path, capsys, no_work):
    (tmp_path / "file.txt").write_text("x")
    flag, path = BAD_OUTPUTS[case]
    path = path.format(tmp=tmp_path)
    assert cli.main([command, flag, path]) == 2
    line = _one_line_error(capsys.readouterr().err, command)
    assert f"{flag} {path}" in line


def test_an_existing_json_file_is_probed_without_being_emptied(tmp_path, capsys, no_work, monkeypatch):
    report = tmp_path / "r.json"
    report.write_text('{"kept": true}\n')
    monkeypatch.setattr(importlib.import_module("dualpipe_mhc.commands.plan"), "main", lambda cfg, args: {"new": 1})
    assert cli.main(["plan", "--json", str(report)]) == 0
    assert json.loads(report.read_text()) == {"new": 1}


def test_default_out_is_per_command(tmp_path, monkeypatch, no_work):
    seen = {}
    for name in ("run", "calibrate-link"):
        mod = importlib.import_module(f"dualpipe_mhc.commands.{name.replace('-', '_')}")
        monkeypatch.setattr(mod, "main", lambda cfg, args, name=name: seen.setdefault(name, args.out) and {})
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run"]) == 0 and cli.main(["calibrate-link"]) == 0
    assert seen == {"run": "out/run", "calibrate-link": "out/calibrate-link"}
    assert (tmp_path / "out" / "run").is_dir() and not any((tmp_path / "out" / "run").iterdir())  # probe removed


def _profile(tmp_path):
    from dualpipe_mhc.scheduler import Costs

    costs = Costs.uniform(4, 0.01, 0.01, 0.005, act_bytes=1e6)
    costs.meta = {"schedule": "dualpipev", "ranks": 2}
    path = tmp_path / "costs.json"
    costs.write_profile(path)
    return path


BAD_PROFILES = {
    "a directory": ("{tmp}", "is a directory"),
    "missing": ("{tmp}/none.json", "does not exist"),
    "garbled": ("{tmp}/garbled.json", "is not JSON"),
    "not a profile": ("{tmp}/other.json", "expected 'dualpipe-mhc-profile/1'"),
    "binary": ("{tmp}/binary.json", "cannot be read"),
}


@pytest.mark.parametrize("case", list(BAD_PROFILES))
def test_a_bad_profile_is_one_line(case, tmp_path, capsys):
    (tmp_path / "garbled.json").write_text('{"format": ')
    (tmp_path / "other.json").write_text('{"format": "dualpipe-mhc-profile-report/1"}')
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00\x81")
    path, expected = BAD_PROFILES[case]
    assert cli.main(["simulate", "--profile", path.format(tmp=tmp_path)]) == 2
    assert expected in _one_line_error(capsys.readouterr().err, "simulate")


def test_a_profile_no_schedule_can_take_names_its_stages_and_the_matching_ranks(tmp_path, capsys):
    report = tmp_path / "r.json"
    assert cli.main(["simulate", "--profile", str(_profile(tmp_path)), "--json", str(report)]) == 2
    line = _one_line_error(capsys.readouterr().err, "simulate")
    assert "has 4 stages (measured: dualpipev on 2 ranks)" in line and "pipeline.ranks=8" in line
    assert "--set pipeline.ranks=4 (1f1b, zb1p, dualpipe)" in line and "--set pipeline.ranks=2 (dualpipev)" in line
    assert not report.exists()
    # The suggestion works as printed.
    assert cli.main(["simulate", "--profile", str(_profile(tmp_path)), "--set", "pipeline.ranks=2"]) == 0


def test_the_console_script_prints_no_traceback(tmp_path):
    """The installed entry point, as a user runs it: the same one line, exit 2."""
    proc = subprocess.run(
        [sys.executable, "-m", "dualpipe_mhc.cli", "simulate", "--json", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    line = _one_line_error(proc.stderr, "simulate")
    assert line.endswith("name a file, e.g. --json " + str(tmp_path / "report.json"))


def test_help_lists_every_command_with_a_line_and_loads_no_command_module():
    code = (
        "import sys, contextlib, io\n"
        "from dualpipe_mhc import cli\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):\n"
        "    cli.main(['--help'])\n"
        "print(buf.getvalue())\n"
        "print(sorted(m for m in sys.modules if m.startswith(('dualpipe_mhc.commands.', 'torch', 'rich'))))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    text, loaded = proc.stdout.rsplit("\n", 2)[0], proc.stdout.rsplit("\n", 2)[1]
    for name, spec in cli.COMMANDS.items():
        assert name in text and spec.help.split(":")[0][:30] in " ".join(text.split())
    assert loaded == "[]"


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_each_command_help_says_what_it_does_and_its_preset(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "-h"])
    text = " ".join(capsys.readouterr().out.split())
    spec = cli.COMMANDS[command]
    assert spec.help in text and f"Default config: {spec.preset}" in text
