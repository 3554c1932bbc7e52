"""The NVML sampler against a synthetic backend with pynvml's shape and known values."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from dualpipe_mhc.cluster.nvml import UNAVAILABLE, NvmlSampler

POWER_W = 300.0
NVLINK_TX_KIB_PER_S = 1_000_000.0  # ~1 GB/s per link
NVLINKS = 18


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


class NVMLError(Exception):
    pass


class FakeNvml:
    """Enough of pynvml for the sampler: counters are exact functions of the fake clock."""

    NVML_CLOCK_SM = 1
    NVML_PCIE_UTIL_TX_BYTES = 0
    NVML_PCIE_UTIL_RX_BYTES = 1
    NVMLError = NVMLError

    def __init__(self, clock: FakeClock, missing: tuple[str, ...] = (), links: int = NVLINKS) -> None:
        self.clock, self.missing, self.links = clock, set(missing), links
        self.shutdown = False

    def _check(self, name: str) -> None:
        if name in self.missing:
            raise NVMLError("Not Supported")

    def nvmlInit(self) -> None:
        self._check("init")

    def nvmlShutdown(self) -> None:
        self.shutdown = True

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        return f"gpu{index}"

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> str:
        return uuid

    def nvmlDeviceGetName(self, h) -> str:
        return "NVIDIA H200"

    def nvmlDeviceGetPowerUsage(self, h) -> int:
        self._check("power")
        return int(POWER_W * 1000)  # mW

    def nvmlDeviceGetTotalEnergyConsumption(self, h) -> int:
        self._check("energy")
        return int(POWER_W * self.clock() * 1000)  # mJ

    def nvmlDeviceGetUtilizationRates(self, h):
        self._check("util")
        return SimpleNamespace(gpu=80, memory=40)

    def nvmlDeviceGetClockInfo(self, h, kind: int) -> int:
        return 1980

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(used=int(self.clock()) * 2**20, total=141 * 2**30, free=0)

    def nvmlDeviceGetPcieThroughput(self, h, counter: int) -> int:
        self._check("pcie")
        return 2048 if counter == self.NVML_PCIE_UTIL_TX_BYTES else 1024  # KB/s

    def nvmlDeviceGetFieldValues(self, h, field_ids):
        out = []
        for fid in field_ids:
            fid, scope = fid if isinstance(fid, tuple) else (fid, 0)
            value = SimpleNamespace(dVal=0.0, uiVal=0, ulVal=0, ullVal=0, sllVal=0, siVal=0, usVal=0)
            ret, vtype = 0, 3
            if fid == 91:
                value.uiVal, vtype = self.links, 1
                ret = 3 if "nvlink" in self.missing else 0
            elif fid in (138, 139):
                kib = NVLINK_TX_KIB_PER_S * self.clock() * (1 if fid == 138 else 0.5)
                value.ullVal = int(kib)
                ret = 3 if "nvlink" in self.missing or scope >= self.links else 0
            out.append(SimpleNamespace(fieldId=fid, scopeId=scope, nvmlReturn=ret, valueType=vtype, value=value))
        return out


def test_step_energy_and_nvlink_bytes_from_counters():
    clock = FakeClock()
    sampler = NvmlSampler(0, period_s=10.0, backend=FakeNvml(clock), clock=clock).start()
    try:
        sampler.begin_step()
        clock.advance(1.0)
        sampler.sample_now()
        clock.advance(1.0)
        step = sampler.end_step()
    finally:
        sampler.stop()
    assert sampler.available and not sampler.unavailable and sampler.report()["device"] == "NVIDIA H200"
    assert step["energy_source"] == "counter"
    assert step["energy_j"] == pytest.approx(2.0 * POWER_W)
    assert step["mean_power_w"] == pytest.approx(POWER_W)
    assert step["nvlink_tx_bytes"] == pytest.approx(2.0 * NVLINK_TX_KIB_PER_S * NVLINKS * 1024, rel=1e-6)
    assert step["nvlink_rx_bytes"] == pytest.approx(step["nvlink_tx_bytes"] / 2, rel=1e-6)
    assert step["pcie_tx_bytes"] == pytest.approx(2048 * 1024 * 2.0)
    assert step["mean_util_gpu_pct"] == 80 and step["mean_sm_clock_mhz"] == 1980
    assert step["max_mem_used_bytes"] == 102 * 2**20
    assert sampler.report()["nvlink_links"] == NVLINKS and sampler.report()["steps"] == [step]


def test_energy_falls_back_to_power_integration():
    clock = FakeClock()
    sampler = NvmlSampler(0, period_s=10.0, backend=FakeNvml(clock, missing=("energy",)), clock=clock).start()
    sampler.begin_step()
    for _ in range(4):
        clock.advance(0.5)
        sampler.sample_now()
    step = sampler.end_step()
    sampler.stop()
    assert "energy_j" in sampler.unavailable
    assert step["energy_source"] == "power-integration"
    assert step["energy_j"] == pytest.approx(2.0 * POWER_W)


def test_missing_counters_reported_unavailable():
    clock = FakeClock()
    backend = FakeNvml(clock, missing=("energy", "power", "nvlink", "pcie", "util"))
    sampler = NvmlSampler(0, period_s=10.0, backend=backend, clock=clock).start()
    sampler.begin_step()
    clock.advance(1.0)
    step = sampler.end_step()
    sampler.stop()
    for key in ("energy_j", "energy_source", "mean_power_w", "nvlink_tx_bytes", "nvlink_rx_bytes", "pcie_tx_bytes"):
        assert step[key] == UNAVAILABLE, key
    assert step["mean_util_gpu_pct"] == UNAVAILABLE
    assert step["mean_sm_clock_mhz"] == 1980  # what works is still reported
    assert set(sampler.unavailable) >= {"energy_j", "power_w", "nvlink_tx_bytes", "util_gpu_pct"}


def test_partial_nvlink_links_are_summed():
    clock = FakeClock()
    sampler = NvmlSampler(0, period_s=10.0, backend=FakeNvml(clock, links=4), clock=clock).start()
    sampler.begin_step()
    clock.advance(1.0)
    step = sampler.end_step()
    sampler.stop()
    assert sampler.report()["nvlink_links"] == 4
    assert step["nvlink_tx_bytes"] == pytest.approx(NVLINK_TX_KIB_PER_S * 4 * 1024, rel=1e-6)


def test_background_thread_samples_at_its_period():
    clock = FakeClock()
    sampler = NvmlSampler("GPU-fake", period_s=0.005, backend=FakeNvml(clock), clock=clock).start()
    time.sleep(0.2)
    sampler.stop()
    assert len(sampler.samples) >= 5
    assert sampler.samples_as_dicts()[0]["power_w"] == POWER_W


def test_without_nvml_the_run_goes_on():
    clock = FakeClock()
    sampler = NvmlSampler(0, backend=FakeNvml(clock, missing=("init",)), clock=clock).start()
    sampler.begin_step()
    clock.advance(0.25)
    step = sampler.end_step()
    sampler.stop()
    assert not sampler.available and "NVML unavailable" in sampler.reason
    assert step["duration_s"] == pytest.approx(0.25)
    assert step["energy_j"] == UNAVAILABLE and step["nvlink_tx_bytes"] == UNAVAILABLE


def test_real_pynvml_on_this_machine_never_raises():
    pytest.importorskip("pynvml")
    with NvmlSampler(0, period_s=0.01) as sampler:
        sampler.begin_step()
        step = sampler.end_step()
    assert set(step) >= {"energy_j", "mean_power_w", "nvlink_tx_bytes", "duration_s"}
    if not sampler.available:
        assert step["energy_j"] == UNAVAILABLE


def test_bad_period_and_unbalanced_steps():
    with pytest.raises(ValueError, match="period_s"):
        NvmlSampler(0, period_s=0)
    sampler = NvmlSampler(0, backend=FakeNvml(FakeClock(), missing=("init",))).start()
    with pytest.raises(RuntimeError, match="begin_step"):
        sampler.end_step()


def test_lazy_import_picks_up_an_injected_pynvml_module(monkeypatch):
    import sys
    import types

    clock = FakeClock()
    fake = FakeNvml(clock)
    module = types.ModuleType("pynvml")
    for name in dir(fake):
        if name.startswith(("nvml", "NVML")):
            setattr(module, name, getattr(fake, name))
    monkeypatch.setitem(sys.modules, "pynvml", module)
    sampler = NvmlSampler(0, period_s=10.0, clock=clock).start()
    sampler.begin_step()
    clock.advance(3.0)
    step = sampler.end_step()
    sampler.stop()
    assert step["energy_j"] == pytest.approx(3.0 * POWER_W) and fake.shutdown


def test_sampler_without_history_keeps_only_the_current_step():
    """A worker's sampler lives as long as the run: memory must not grow with the step count."""
    clock = FakeClock()
    sampler = NvmlSampler(0, period_s=10.0, backend=FakeNvml(clock), clock=clock, keep_history=False).start()
    try:
        for _ in range(50):
            sampler.begin_step()
            for _ in range(3):
                clock.advance(0.5)
                sampler.sample_now()
            step = sampler.end_step()
            clock.advance(1.0)
            sampler.sample_now()  # between steps, as the polling thread does
        assert len(sampler.samples) <= 7 and sampler.steps == []  # the last step and the one sample after it
        assert step["energy_j"] == pytest.approx(1.5 * POWER_W)
    finally:
        sampler.stop()
