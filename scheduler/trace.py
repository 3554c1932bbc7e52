"""Export a simulated (or measured) step: Chrome/Perfetto trace JSON and a PNG timeline.

The trace has one process per rank and one thread per stream ("compute", "send->r<k>"),
complete events ("ph": "X") in microseconds named like ``F3.c1`` or ``F3.c0&B1.c1``.
The PNG follows the DualPipe figure: ranks as rows, F / B / W / F&B coloured (the second
chunk, i.e. the reverse direction or the V's way back, in a darker shade), micro-batch
numbers on the blocks. matplotlib is imported only when a PNG is drawn.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .simulate import COMPUTE_STREAM, Event, SimResult

# (chunk 0, chunk 1) face colours, close to the DualPipe README figure.
COLORS = {
    "F": ("#f4b183", "#c55a11"),
    "B": ("#a9d18e", "#548235"),
    "W": ("#9dc3e6", "#2e75b6"),
}


def chrome_trace(result: SimResult, title: str | None = None) -> dict[str, Any]:
    """The trace as a JSON-ready object (``{"traceEvents": [...], ...}``)."""
    streams: dict[tuple[int, str], int] = {}
    events: list[dict[str, Any]] = []
    for r in range(result.ranks):
        events.append({"ph": "M", "name": "process_name", "pid": r, "tid": 0, "args": {"name": f"rank {r}"}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": r, "tid": 0, "args": {"sort_index": r}})
    for ev in result.events:
        key = (ev.rank, ev.stream)
        if key not in streams:
            tid = 0 if ev.stream == COMPUTE_STREAM else 1 + sum(1 for k in streams if k[0] == ev.rank and k[1] != COMPUTE_STREAM)
            streams[key] = tid
            events.append({"ph": "M", "name": "thread_name", "pid": ev.rank, "tid": tid, "args": {"name": ev.stream}})
        events.append(
            {
                "name": ev.name,
                "cat": ev.kind,
                "ph": "X",
                "pid": ev.rank,
                "tid": streams[key],
                "ts": ev.start * 1e6,
                "dur": (ev.end - ev.start) * 1e6,
                "args": {"microbatch": ev.microbatch, "chunk": ev.chunk},
            }
        )
    meta = {"schedule": result.schedule, "step_time_s": result.step_time, "bubble_fraction": result.bubble_fraction}
    if title:
        meta["title"] = title
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": meta}


def write_chrome_trace(result: SimResult, path: str | Path, title: str | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(chrome_trace(result, title)))
    return path


def write_timeline_png(result: SimResult, path: str | Path, title: str | None = None, max_labels: int = 4000) -> Path:
    """Ranks as rows, time left to right; an F&B pair is drawn as its F over its B."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import PolyCollection
    from matplotlib.patches import Patch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compute = [ev for ev in result.events if ev.stream == COMPUTE_STREAM]
    scale, unit = (1e3, "ms") if result.step_time < 10 else (1.0, "s")
    width = min(40.0, max(10.0, len(compute) / max(1, result.ranks) * 0.18))
    fig, ax = plt.subplots(figsize=(width, 0.45 * result.ranks + 1.6))
    label = len(compute) <= max_labels
    verts, faces, texts = [], [], []
    for ev in compute:
        _blocks(ev, scale, label, verts, faces, texts)
    ax.add_collection(PolyCollection(verts, facecolors=faces, edgecolors="black", linewidths=0.4))
    for x, y, text, size in texts:
        ax.text(x, y, text, ha="center", va="center", fontsize=size)
    ax.set_ylim(result.ranks - 0.5, -0.5)
    ax.set_xlim(0, result.step_time * scale)
    ax.set_yticks(range(result.ranks))
    ax.set_yticklabels([f"rank {r}" for r in range(result.ranks)])
    ax.set_xlabel(f"time ({unit})")
    heading = title or result.schedule
    ax.set_title(f"{heading}: step {result.step_time * scale:.4g} {unit}, bubble {100 * result.bubble_fraction:.1f} %")
    present = {(ev.kind, max(ev.chunk, 0)) for ev in compute if ev.kind != "FB"}
    for ev in compute:
        if ev.kind == "FB":
            f_part, b_part = ev.name.split("&")
            present |= {("F", int(f_part.rsplit(".c", 1)[1])), ("B", int(b_part.rsplit(".c", 1)[1]))}
    handles = [
        Patch(facecolor=COLORS[k][c], edgecolor="black", label=f"{k} chunk {c}")
        for k in ("F", "B", "W") for c in (0, 1) if (k, c) in present
    ]
    if any(ev.kind == "FB" for ev in compute):
        handles.append(Patch(facecolor="white", edgecolor="black", label="F&B pair: F over B"))
    height = fig.get_size_inches()[1]
    fig.legend(handles=handles, loc="lower center", ncol=7, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.3 / height, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _blocks(ev: Event, scale: float, label: bool, verts: list, faces: list, texts: list) -> None:
    """Append the rectangle(s) and labels of one compute event; an F&B pair is F over B."""
    x0, x1 = ev.start * scale, ev.end * scale
    if ev.kind == "FB":
        f_part, b_part = ev.name.split("&")
        parts = [(f_part, "F", ev.rank - 0.4, 0.4), (b_part, "B", ev.rank, 0.4)]
    else:
        parts = [(ev.name, ev.kind, ev.rank - 0.4, 0.8)]
    for name, kind, y0, height in parts:
        chunk = int(name.rsplit(".c", 1)[1])
        verts.append([(x0, y0), (x1, y0), (x1, y0 + height), (x0, y0 + height)])
        faces.append(COLORS[kind][chunk])
        if label:
            mb = name.split(".")[0][1:]
            texts.append(((x0 + x1) / 2, y0 + height / 2, mb, 6 if height < 0.5 else 7))
