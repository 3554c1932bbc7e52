"""The README's Python blocks run as written, in a fresh interpreter (so nothing from another test
leaks in), and the scheduler they use loads no torch."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_the_readme_has_a_python_example():
    assert BLOCKS and any("simulate(sched, costs)" in block for block in BLOCKS)


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_python_block_runs_as_written(block, tmp_path):
    check = "\nimport sys\nassert 'torch' not in sys.modules, 'the README example loaded torch'\n"
    proc = subprocess.run([sys.executable, "-c", block + check], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "step " in proc.stdout and "bubble" in proc.stdout
