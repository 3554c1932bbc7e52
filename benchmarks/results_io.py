"""Where the GPU benchmarks write: ``<stem>_<device>.json`` (everything measured) and, given table
lines, ``<stem>_<device>.md`` under the output folder, the device name made file-safe."""

from __future__ import annotations

import json
from pathlib import Path


def write_results(out: str | Path, stem: str, device: str, results: dict, lines: list[str] | None = None) -> str:
    """Write the result files; returns the markdown text ('' without lines)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tag = device.replace(" ", "_").replace("/", "_")
    (out / f"{stem}_{tag}.json").write_text(json.dumps(results, indent=1))
    if lines is None:
        return ""
    text = "\n".join(lines) + "\n"
    (out / f"{stem}_{tag}.md").write_text(text)
    return text
