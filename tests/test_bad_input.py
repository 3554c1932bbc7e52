"""Bad input ends in one line on stderr and exit 2, before any work starts: sizes past any real
model, an address with no Ray cluster behind it, a corrupt checkpoint to resume from."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

ABSURD = [
    (["--set", "model.width=1000000000"],
     "model.width=1000000000 is past any real model or setup; use model.width<=65536"),
    (["--set", "model.streams=1000"], "model.streams=1000 is past any real model or setup; use model.streams<=16"),
    (["--set", "model.layers=100000"], "model.layers=100000 is past any real model or setup; use model.layers<=1024"),
    (["--set", "model.vocab_size=9999999999"], "model.vocab_size=9999999999 is past"),
    (["--set", "model.seq_len=100000000"], "use model.seq_len<=1048576"),
    (["--set", "model.mlp_hidden=10000000"], "use model.mlp_hidden<=262144"),
    (["--set", "model.sinkhorn_iters=100000"], "use model.sinkhorn_iters<=1000"),
    (["--set", "link.bandwidth_gbps=1e9"], "use link.bandwidth_gbps<=10000"),
    (["--set", "hardware.memory_gib=1e7"], "use hardware.memory_gib<=4096"),
    (["--set", "hardware.matmul_tflops=1e9"], "use hardware.matmul_tflops<=100000"),
]


def _no_work(monkeypatch):
    """Any attempt to start Ray or simulate fails the test: the error must come first."""

    def forbidden(*a, **k):
        raise AssertionError("work started before the bad input was refused")

    monkeypatch.setattr("dualpipe_mhc.cluster.launch.connect", forbidden)
    monkeypatch.setattr("dualpipe_mhc.cluster.runtime.connect", forbidden)
    monkeypatch.setattr("dualpipe_mhc.scheduler.simulate", forbidden, raising=False)


@pytest.mark.parametrize("command", ["simulate", "run"])
@pytest.mark.parametrize("args, fragment", ABSURD, ids=[a[1] for a, _ in ABSURD])
def test_absurd_size_is_one_line_exit_2(command, args, fragment, capsys, monkeypatch):
    from dualpipe_mhc import cli

    _no_work(monkeypatch)
    assert cli.main([command, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert fragment in err, err


@pytest.mark.parametrize("address", ["127.0.0.1:1", "ray://127.0.0.1:1"])
def test_unreachable_cluster_address_is_one_line_within_timeout(address, tmp_path):
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "dualpipe_mhc.cli", "run", "--set", f"cluster.address={address}",
         "--set", "run.timeout_s=5", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path,
    )
    elapsed = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert f"cluster.address={address}: no Ray cluster answers there" in err
    assert "ray start --head --port=1" in err and "unset cluster.address" in err
    assert elapsed < 5 + 20, f"took {elapsed:.1f} s"  # run.timeout_s plus interpreter start on a busy box


def test_connect_states_token_auth_before_ray_reads_it(monkeypatch):
    """A new local cluster keeps Ray's token authentication, stated explicitly so Ray does not
    warn on every command; with Ray already imported the variable is left to Ray."""
    from dualpipe_mhc.cluster import launch

    monkeypatch.setenv("RAY_AUTH_MODE", "")  # recorded, so the test leaves the variable as it found it
    monkeypatch.delenv("RAY_AUTH_MODE")
    monkeypatch.delitem(sys.modules, "ray", raising=False)  # as in a fresh CLI process
    seen = []
    fake_ray = type(sys)("ray")
    fake_ray.is_initialized = lambda: False
    fake_ray.init = lambda **kw: seen.append(os.environ.get("RAY_AUTH_MODE"))
    real_import = __import__
    monkeypatch.setattr(
        "builtins.__import__", lambda name, *a, **k: fake_ray if name == "ray" else real_import(name, *a, **k)
    )
    assert launch.connect(None, 5.0, 1) is True
    assert seen == ["token"]
