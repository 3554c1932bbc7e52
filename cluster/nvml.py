"""Per-GPU NVML sampler: a background thread polling power, energy, utilisation, clocks, memory,
PCIe and NVLink counters, and per-step summaries (energy in J, mean power, bytes over NVLink).

``pynvml`` (nvidia-ml-py) is imported when a sampler starts, never at module import.
Where NVML or one counter is missing (CPU runs, VMs, MIG, old drivers) that field is
reported as ``"unavailable"`` and everything else goes on.

    sampler = NvmlSampler(device=0, period_s=0.02).start()
    sampler.begin_step()
    ...                                        # one training step
    summary = sampler.end_step()               # {"energy_j": 412.3, "energy_source": "counter", ...}
    sampler.stop()

Energy comes from the total-energy counter (mJ since driver load) read at the step's
two ends; without it, from the trapezoid integral of the power samples. NVLink bytes
come from the per-link ``NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX/RX`` field values
(cumulative KiB), summed over the device's links. PCIe throughput is NVML's sampled
rate (KB/s over ~20 ms), so its bytes per step are an estimate: mean rate x duration.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable

UNAVAILABLE = "unavailable"
_KIB = 1024
_FI_NVLINK_LINK_COUNT = 91
_FI_NVLINK_DATA_TX = 138
_FI_NVLINK_DATA_RX = 139
_MAX_LINKS = 18  # NVML_NVLINK_MAX_LINKS; H100/H200 SXM have all 18 (docs/DESIGN.md §6)


@dataclass
class Sample:
    """One reading; ``None`` where the counter is unavailable."""

    t: float  # seconds, the sampler's clock
    power_w: float | None = None
    energy_j: float | None = None  # total-energy counter (absolute, since driver load)
    util_gpu_pct: float | None = None
    util_mem_pct: float | None = None
    sm_clock_mhz: float | None = None
    mem_used_bytes: float | None = None
    pcie_tx_bytes_per_s: float | None = None
    pcie_rx_bytes_per_s: float | None = None
    nvlink_tx_bytes: float | None = None  # cumulative over all links
    nvlink_rx_bytes: float | None = None


COUNTERS = tuple(f.name for f in fields(Sample) if f.name != "t")


def _field_value(v: Any) -> float:
    """The number inside an ``nvmlFieldValue_t``, by its value type."""
    member = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}[int(v.valueType)]
    return float(getattr(v.value, member))


class NvmlSampler:
    """Background sampler for one GPU.

    ``device``: NVML index, or a UUID string (see :func:`nvml_device_for_torch`).
    ``backend``: the ``pynvml`` module or an object of the same shape (tests inject fakes).
    ``clock``: the time source, ``time.monotonic`` unless a test drives it.
    ``keep_history``: keep every sample and step summary (for a report). A sampler that lives
    as long as a training run passes False: each :meth:`begin_step` then drops the samples
    before it and :meth:`end_step` keeps no summaries, so memory and the per-step scan stay
    bounded by one step (polling at 20 Hz otherwise grows by ~1.7 M samples a day).
    """

    def __init__(
        self,
        device: int | str = 0,
        period_s: float = 0.05,
        backend: Any = None,
        clock: Callable[[], float] = time.monotonic,
        keep_history: bool = True,
    ) -> None:
        if not period_s > 0:
            raise ValueError(f"NVML sampling period_s={period_s} is invalid: use a positive number of seconds, e.g. 0.05")
        self.device, self.period_s, self.clock = device, period_s, clock
        self.keep_history = keep_history
        self._nvml = backend
        self._handle: Any = None
        self._readers: dict[str, Callable[[], float]] = {}
        self._links: list[int] = []
        self.available = False
        self.reason: str | None = None
        self.name: str | None = None  # e.g. "NVIDIA H200", from NVML
        self.unavailable: dict[str, str] = {}  # counter -> why
        self.samples: list[Sample] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._step_start: Sample | None = None
        self.steps: list[dict[str, Any]] = []

    def start(self) -> NvmlSampler:
        """Initialise NVML (or note why not) and start polling; returns self."""
        self._open()
        if self.available:
            self._stop.clear()
            self._thread = threading.Thread(target=self._poll, name=f"nvml-sampler-{self.device}", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        if self.available:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # shutting down a half-broken NVML must not fail the run
                pass

    def __enter__(self) -> NvmlSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _open(self) -> None:
        try:
            if self._nvml is None:
                import pynvml

                self._nvml = pynvml
            nv = self._nvml
            nv.nvmlInit()
            if isinstance(self.device, str):
                self._handle = nv.nvmlDeviceGetHandleByUUID(self.device)
            else:
                self._handle = nv.nvmlDeviceGetHandleByIndex(self.device)
        except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, DriverNotLoaded, ...
            self.available, self.reason = False, f"NVML unavailable: {type(exc).__name__}: {exc}"
            self.unavailable = {name: self.reason for name in COUNTERS}
            return
        self.available = True
        try:
            name = self._nvml.nvmlDeviceGetName(self._handle)
            self.name = name.decode() if isinstance(name, bytes) else str(name)
        except Exception:
            self.name = None
        self._links = self._probe_links()
        for name, reader in self._candidate_readers().items():
            try:
                reader()
                self._readers[name] = reader
            except Exception as exc:
                self.unavailable[name] = f"{type(exc).__name__}: {exc}"

    def _probe_links(self) -> list[int]:
        nv, h = self._nvml, self._handle
        try:
            (count,) = nv.nvmlDeviceGetFieldValues(h, [_FI_NVLINK_LINK_COUNT])
            n = int(_field_value(count)) if int(count.nvmlReturn) == 0 else _MAX_LINKS
        except Exception:
            n = _MAX_LINKS
        try:
            got = nv.nvmlDeviceGetFieldValues(h, [(_FI_NVLINK_DATA_TX, link) for link in range(n)])
        except Exception:
            return []
        return [link for link, v in zip(range(n), got) if int(v.nvmlReturn) == 0]

    def _candidate_readers(self) -> dict[str, Callable[[], float]]:
        nv, h = self._nvml, self._handle
        readers: dict[str, Callable[[], float]] = {
            "power_w": lambda: nv.nvmlDeviceGetPowerUsage(h) / 1e3,  # mW
            "energy_j": lambda: nv.nvmlDeviceGetTotalEnergyConsumption(h) / 1e3,  # mJ
            "util_gpu_pct": lambda: float(nv.nvmlDeviceGetUtilizationRates(h).gpu),
            "util_mem_pct": lambda: float(nv.nvmlDeviceGetUtilizationRates(h).memory),
            "sm_clock_mhz": lambda: float(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)),
            "mem_used_bytes": lambda: float(nv.nvmlDeviceGetMemoryInfo(h).used),
            "pcie_tx_bytes_per_s": lambda: nv.nvmlDeviceGetPcieThroughput(h, nv.NVML_PCIE_UTIL_TX_BYTES) * _KIB,
            "pcie_rx_bytes_per_s": lambda: nv.nvmlDeviceGetPcieThroughput(h, nv.NVML_PCIE_UTIL_RX_BYTES) * _KIB,
        }
        if self._links:
            readers["nvlink_tx_bytes"] = lambda: self._nvlink_bytes(_FI_NVLINK_DATA_TX)
            readers["nvlink_rx_bytes"] = lambda: self._nvlink_bytes(_FI_NVLINK_DATA_RX)
        else:
            self.unavailable["nvlink_tx_bytes"] = self.unavailable["nvlink_rx_bytes"] = "no NVLink throughput field values"
        return readers

    def _nvlink_bytes(self, field_id: int) -> float:
        values = self._nvml.nvmlDeviceGetFieldValues(self._handle, [(field_id, link) for link in self._links])
        bad = [int(v.nvmlReturn) for v in values if int(v.nvmlReturn) != 0]
        if bad:
            raise RuntimeError(f"NVLink field {field_id} returned NVML error {bad[0]}")
        return sum(_field_value(v) for v in values) * _KIB

    def sample_now(self) -> Sample:
        """Read every available counter once, record and return the sample."""
        s = Sample(t=self.clock())
        for name, reader in self._readers.items():
            try:
                setattr(s, name, reader())
            except Exception:  # a transient failure leaves a hole in one sample, not in the run
                pass
        with self._lock:
            self.samples.append(s)
        return s

    def _poll(self) -> None:
        while not self._stop.wait(self.period_s):
            self.sample_now()

    def begin_step(self) -> None:
        self._step_start = start = self.sample_now()
        if not self.keep_history:
            with self._lock:
                self.samples = [s for s in self.samples if s.t >= start.t]

    def end_step(self) -> dict[str, Any]:
        """Summary of the window since :meth:`begin_step`; also appended to ``self.steps``."""
        if self._step_start is None:
            raise RuntimeError("end_step() without begin_step(); call begin_step() when the step starts")
        start, end = self._step_start, self.sample_now()
        self._step_start = None
        summary = self.summarise(start, end)
        if self.keep_history:
            self.steps.append(summary)
        return summary

    def summarise(self, start: Sample, end: Sample) -> dict[str, Any]:
        """Energy, mean power, NVLink/PCIe bytes and mean readings between two samples."""
        with self._lock:
            window = [s for s in self.samples if start.t <= s.t <= end.t]
        dt = end.t - start.t
        out: dict[str, Any] = {"duration_s": dt, "samples": len(window)}
        energy, source = None, UNAVAILABLE
        if start.energy_j is not None and end.energy_j is not None:
            energy, source = end.energy_j - start.energy_j, "counter"
        else:
            energy = _integrate([(s.t, s.power_w) for s in window])
            source = "power-integration" if energy is not None else UNAVAILABLE
        out["energy_j"] = _or_unavailable(energy)
        out["energy_source"] = source
        mean_power = energy / dt if energy is not None and dt > 0 else _mean(s.power_w for s in window)
        out["mean_power_w"] = _or_unavailable(mean_power)
        for d in ("tx", "rx"):
            a, b = getattr(start, f"nvlink_{d}_bytes"), getattr(end, f"nvlink_{d}_bytes")
            out[f"nvlink_{d}_bytes"] = _or_unavailable(b - a if a is not None and b is not None else None)
            rate = _mean(getattr(s, f"pcie_{d}_bytes_per_s") for s in window)
            out[f"pcie_{d}_bytes"] = _or_unavailable(rate * dt if rate is not None else None)
        for name in ("util_gpu_pct", "util_mem_pct", "sm_clock_mhz"):
            out[f"mean_{name}"] = _or_unavailable(_mean(getattr(s, name) for s in window))
        used = [s.mem_used_bytes for s in window if s.mem_used_bytes is not None]
        out["max_mem_used_bytes"] = max(used) if used else UNAVAILABLE
        return out

    def report(self) -> dict[str, Any]:
        """Everything a JSON report needs: availability, why not, the per-step summaries."""
        return {
            "available": self.available,
            "reason": self.reason,
            "device": self.name,
            "unavailable_counters": dict(self.unavailable),
            "nvlink_links": len(self._links),
            "period_s": self.period_s,
            "steps": list(self.steps),
        }

    def samples_as_dicts(self) -> list[dict[str, Any]]:
        with self._lock:
            return [asdict(s) for s in self.samples]


def _or_unavailable(value: float | None) -> float | str:
    return UNAVAILABLE if value is None else value


def _mean(values: Any) -> float | None:
    got = [v for v in values if v is not None]
    return sum(got) / len(got) if got else None


def _integrate(points: list[tuple[float, float | None]]) -> float | None:
    """Trapezoid integral of power over time (J); ``None`` with fewer than two readings."""
    pts = [(t, p) for t, p in points if p is not None]
    if len(pts) < 2:
        return None
    return sum((t1 - t0) * (p0 + p1) / 2 for (t0, p0), (t1, p1) in zip(pts, pts[1:]))


def nvml_device_for_torch(index: int = 0) -> int | str:
    """The NVML identity of CUDA device ``index`` as this process sees it: its UUID when torch
    reports one (``CUDA_VISIBLE_DEVICES`` renumbers devices, NVML does not), else the index."""
    import torch

    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    if uuid is None:
        return index
    text = str(uuid)
    return text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}"
