"""Per-stage action costs the simulator consumes, and the measured-profile file format.

A :class:`Costs` holds, for each model stage s (in path order, 0 .. num_stages-1), the
seconds one micro-batch spends in each action kind, the bytes it sends, the bytes it
keeps alive, and the link between neighbouring ranks. It comes from the analytic model
(:func:`scheduler.analytic.analytic_costs`) or from a profile the runtime measured.

Profile file (JSON, ``format`` = ``"dualpipe-mhc-profile/1"``)::

    {
      "format": "dualpipe-mhc-profile/1",
      "stages": [                         # one object per model stage, in path order
        {"f": 0.0123,                     # s, forward of one micro-batch
         "b": 0.0150,                     # s, backward for input gradients only (IR kind B)
         "w": 0.0110,                     # s, weight gradients (IR kind W)
         "full_b": 0.0255,                # optional: s of one unsplit backward (a B that defers no W);
                                          #   default b + w. A split can cost more than the whole: torch's
                                          #   W re-runs a custom autograd node B already ran
         "act_bytes": 201326592,          # bytes of this stage's output activation per micro-batch
                                          #   (T tokens x n streams x C x bytes/elem); its gradient
                                          #   travels back with the same size
         "act_mem_bytes": 9.1e9,          # optional: bytes kept per in-flight micro-batch (F .. B)
         "recompute": 0.0008},            # optional: s of recomputation already inside "b"
        ...
      ],
      "fb_overlap": 0.93,                 # optional, default 1: time of an overlapped F&B pair
                                          #   divided by F + B run back to back (<1: they overlap)
      "link": {"bandwidth_gbps": 200.0,   # optional: one-way GB/s (1e9 bytes/s) between neighbours
               "latency_us": 3.0},        #   and one-way latency; absent: the config's link
      "links": [{"src": 3, "dst": 4,      # optional: directed pairs that differ from "link"
                 "bandwidth_gbps": 50.0,  #   (e.g. a node boundary over InfiniBand)
                 "latency_us": 5.0}],
      "meta": {...}                       # optional, free-form: device, config, date
    }

Stage times are medians over the measured steps; the runtime writes one file per run.
A runtime that only measured full backwards (no W split) writes b = full - w, with w
measured once from a split backward or estimated as the weight-gradient GEMMs' share.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROFILE_FORMAT = "dualpipe-mhc-profile/1"


@dataclass
class Costs:
    """Costs of one micro-batch per model stage; times in seconds, sizes in bytes."""

    f: list[float]
    b: list[float]  # input-gradient backward (a B whose W is deferred)
    w: list[float]
    act_bytes: list[float]  # output activation of the stage, one micro-batch
    act_mem_bytes: list[float] = field(default_factory=list)  # kept from F to B; empty: unknown
    recompute: list[float] = field(default_factory=list)  # part of b spent recomputing
    link_bandwidth: float = math.inf  # bytes/s, one-way, per neighbour pair
    link_latency: float = 0.0  # s, one-way
    fb_overlap: float = 1.0  # an F&B pair takes fb_overlap * (F + B)
    meta: dict[str, Any] = field(default_factory=dict)
    pair_links: dict[tuple[int, int], tuple[float, float]] = field(default_factory=dict)  # (src, dst) -> (B/s, s)
    full_b: list[float] = field(default_factory=list)  # an unsplit backward (B with its W); empty: b + w

    def __post_init__(self) -> None:
        n = len(self.f)
        for name in ("b", "w", "act_bytes"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"costs.{name} has {len(getattr(self, name))} stages, costs.f has {n}; give one value per stage")
        for name in ("act_mem_bytes", "recompute", "full_b"):
            if getattr(self, name) and len(getattr(self, name)) != n:
                raise ValueError(f"costs.{name} has {len(getattr(self, name))} stages, expected {n} or none")
        if not self.act_mem_bytes:
            self.act_mem_bytes = [0.0] * n
        if not self.recompute:
            self.recompute = [0.0] * n
        if not self.full_b:
            self.full_b = [b + w for b, w in zip(self.b, self.w)]
        if not 0 < self.fb_overlap <= 1.5:
            raise ValueError(f"fb_overlap={self.fb_overlap} is invalid: use a factor in (0, 1.5], 1 = no overlap")
        for bandwidth, latency in [(self.link_bandwidth, self.link_latency), *self.pair_links.values()]:
            if bandwidth <= 0 or latency < 0:
                raise ValueError(f"link bandwidth {bandwidth} B/s / latency {latency} s invalid: use bandwidth > 0, latency >= 0")

    @property
    def num_stages(self) -> int:
        return len(self.f)

    def link(self, src: int, dst: int) -> tuple[float, float]:
        """(bandwidth bytes/s, latency s) of the directed link src -> dst."""
        return self.pair_links.get((src, dst), (self.link_bandwidth, self.link_latency))

    def transfer_time(self, nbytes: float, src: int = 0, dst: int = 1) -> float:
        """One-way time of one message: latency + bytes / bandwidth."""
        bandwidth, latency = self.link(src, dst)
        return latency + nbytes / bandwidth

    @staticmethod
    def uniform(
        stages: int,
        f: float,
        b: float,
        w: float,
        act_bytes: float = 0.0,
        link_bandwidth: float = math.inf,
        link_latency: float = 0.0,
        fb_overlap: float = 1.0,
        act_mem_bytes: float = 0.0,
    ) -> Costs:
        """Identical stages; the formulas' assumption."""
        return Costs(
            [f] * stages, [b] * stages, [w] * stages, [act_bytes] * stages, [act_mem_bytes] * stages,
            link_bandwidth=link_bandwidth, link_latency=link_latency, fb_overlap=fb_overlap,
        )

    def with_link(self, bandwidth: float, latency: float) -> Costs:
        return Costs(
            self.f, self.b, self.w, self.act_bytes, self.act_mem_bytes, self.recompute,
            bandwidth, latency, self.fb_overlap, dict(self.meta), dict(self.pair_links), self.full_b,
        )

    def to_profile(self) -> dict[str, Any]:
        """The profile-file object (see the module docstring)."""
        stages = []
        for s in range(self.num_stages):
            stage = {"f": self.f[s], "b": self.b[s], "w": self.w[s], "act_bytes": self.act_bytes[s]}
            if self.act_mem_bytes[s]:
                stage["act_mem_bytes"] = self.act_mem_bytes[s]
            if self.recompute[s]:
                stage["recompute"] = self.recompute[s]
            if self.full_b[s] != self.b[s] + self.w[s]:
                stage["full_b"] = self.full_b[s]
            stages.append(stage)
        out: dict[str, Any] = {"format": PROFILE_FORMAT, "stages": stages, "fb_overlap": self.fb_overlap}
        if math.isfinite(self.link_bandwidth):
            out["link"] = {"bandwidth_gbps": self.link_bandwidth / 1e9, "latency_us": self.link_latency * 1e6}
        if self.pair_links:
            out["links"] = [
                {"src": a, "dst": b, "bandwidth_gbps": bw / 1e9, "latency_us": lat * 1e6}
                for (a, b), (bw, lat) in sorted(self.pair_links.items())
            ]
        if self.meta:
            out["meta"] = self.meta
        return out

    def write_profile(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_profile(), indent=2) + "\n")

    @staticmethod
    def from_profile(
        source: str | Path | dict[str, Any], link_bandwidth: float | None = None, link_latency: float | None = None
    ) -> Costs:
        """Read a profile file (or its parsed object). ``link_*`` fill in when the file has no link."""
        if isinstance(source, dict):
            data, origin = source, "profile"
        else:
            origin = str(source)
            try:
                data = json.loads(Path(source).read_text())
            except FileNotFoundError:
                raise ValueError(f"profile {origin} does not exist; write one with the runtime or Costs.write_profile") from None
            except IsADirectoryError:
                raise ValueError(f"profile {origin} is a directory; name the costs.json a run wrote") from None
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"profile {origin} cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
            except json.JSONDecodeError as exc:
                raise ValueError(f"profile {origin} is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"profile {origin} must hold a JSON object, got {type(data).__name__}")
        if data.get("format") != PROFILE_FORMAT:
            raise ValueError(f"profile {origin}: format={data.get('format')!r}, expected {PROFILE_FORMAT!r}")
        stages = data.get("stages")
        if not isinstance(stages, list) or not stages:
            raise ValueError(f"profile {origin}: 'stages' must be a non-empty list, one object per model stage")
        cols: dict[str, list[float]] = {k: [] for k in ("f", "b", "w", "act_bytes", "act_mem_bytes", "recompute")}
        full_b = []
        for s, stage in enumerate(stages):
            if not isinstance(stage, dict):
                raise ValueError(f"profile {origin}: stages[{s}]={stage!r} is invalid; use an object with f, b, w, act_bytes")
            for key in cols:
                value = stage.get(key, 0.0 if key in ("act_mem_bytes", "recompute") else None)
                cols[key].append(_number(value, f"profile {origin}: stages[{s}].{key}"))
            full = stage.get("full_b")
            full_b.append(cols["b"][-1] + cols["w"][-1] if full is None else _number(full, f"profile {origin}: stages[{s}].full_b"))
        link = data.get("link") or {}
        if not isinstance(link, dict):
            raise ValueError(f"profile {origin}: link={link!r} is invalid; use an object with bandwidth_gbps and latency_us")
        bandwidth = _number(link["bandwidth_gbps"], f"profile {origin}: link.bandwidth_gbps") * 1e9 if "bandwidth_gbps" in link else link_bandwidth
        latency = _number(link["latency_us"], f"profile {origin}: link.latency_us") * 1e-6 if "latency_us" in link else link_latency
        pair_links = {}
        for k, item in enumerate(data.get("links") or []):
            where = f"profile {origin}: links[{k}]"
            try:
                src, dst, gbps = int(item["src"]), int(item["dst"]), item["bandwidth_gbps"]
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{where} needs src, dst and bandwidth_gbps (latency_us optional)") from None
            pair_links[(src, dst)] = (
                _number(gbps, f"{where}.bandwidth_gbps") * 1e9,
                _number(item.get("latency_us", 0.0), f"{where}.latency_us") * 1e-6,
            )
        return Costs(
            cols["f"], cols["b"], cols["w"], cols["act_bytes"], cols["act_mem_bytes"], cols["recompute"],
            link_bandwidth=bandwidth if bandwidth is not None else math.inf,
            link_latency=latency if latency is not None else 0.0,
            fb_overlap=_number(data.get("fb_overlap", 1.0), f"profile {origin}: fb_overlap"),
            meta=dict(data.get("meta") or {}),
            pair_links=pair_links,
            full_b=full_b,
        )


def _number(value: Any, where: str) -> float:
    """A profile's finite, non-negative number; anything else is a one-line error naming the field."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{where}={value!r} is invalid; use a finite number >= 0")
    return float(value)
