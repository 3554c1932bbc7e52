"""The design document the sources cite exists with the sections they cite, and the README's
config section states the config's size bounds as the code has them."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from dualpipe_mhc import config

ROOT = Path(__file__).resolve().parents[1]


def test_every_design_citation_names_an_existing_section():
    sections = set(re.findall(r"^## (\d+)\. ", (ROOT / "docs" / "DESIGN.md").read_text(), re.M))
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    cited, stray = {}, []
    for name in tracked:
        path = ROOT / name
        skip = name in ("docs/DESIGN.md", "tests/test_docs.py")  # the document itself; this test's patterns
        if skip or path.suffix not in (".py", ".md", ".sh", ".toml") or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for n in re.findall(r"docs/DESIGN\.md §(\d+)", text):
            cited.setdefault(n, []).append(name)
        # a citation of a file the repository does not have
        stray += [name for _ in re.finditer(r"(?<!docs/)\b(?:DESIGN|STYLE|KINDS)\.md", text)]
    assert cited, "no file cites docs/DESIGN.md"
    assert set(cited) <= sections, {n: files for n, files in cited.items() if n not in sections}
    assert not stray, f"files citing a design file outside docs/: {sorted(set(stray))}"


def _written(limit: float) -> str:
    if float(limit).is_integer() and limit >= 2**18 and (int(limit) & (int(limit) - 1)) == 0:
        return f"2^{int(limit).bit_length() - 1}"
    return f"{int(limit)}" if float(limit).is_integer() and limit < 1e5 else f"{limit:.0e}".replace("e+0", "e")


def test_readme_states_the_config_bounds():
    readme = " ".join((ROOT / "README.md").read_text().split())
    for prefix, limits in (("", config.MODEL_LIMITS), ("link.", config.LINK_LIMITS),
                           ("hardware.", config.HARDWARE_LIMITS), ("run.", {"steps": config.RUN_LIMITS["steps"]})):
        for name, limit in limits.items():
            assert f"{prefix}{name} ≤ {_written(limit)}" in readme, f"{prefix}{name} ≤ {_written(limit)}"
    assert config.RUN_LIMITS["timeout_s"] == 7 * 86400 and "run.timeout_s ≤ 7 days" in readme
