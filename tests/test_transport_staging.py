"""The host-staged route of the transport (ranks that share a GPU), without Ray: which pair
goes which way, and that a staged message is copied through a separate host buffer, in
order, with failures and timeouts named like any other transfer. A recording stand-in for
torch.distributed plays the peer."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

from dualpipe_mhc.cluster import transport as tp
from dualpipe_mhc.cluster.transport import DIRECT, HOST, TransferError, TransferTimeout, pair_routes

GPU_A, GPU_B = "GPU-aaaa", "GPU-bbbb"


def test_routes_follow_devices_and_backend():
    assert pair_routes(0, ["cpu", "cpu"], "gloo") == {1: DIRECT}
    assert pair_routes(0, ["cpu", "cpu", "cpu"], "gloo", host_staging=True) == {1: HOST, 2: HOST}
    assert pair_routes(1, [GPU_A, GPU_B], "nccl") == {0: DIRECT}
    # gloo cannot send CUDA tensors: every GPU pair is staged, shared GPU or not
    assert pair_routes(0, [GPU_A, GPU_A, GPU_B], "gloo") == {1: HOST, 2: HOST}


def test_nccl_between_ranks_on_one_gpu_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"ranks 0 and 2 share GPU GPU-aaaa .* cluster.backend=auto"):
        pair_routes(2, [GPU_A, GPU_B, GPU_A], "nccl")


class _Work:
    def __init__(self, fail: str | None = None, hang: bool = False) -> None:
        self.fail, self.hang = fail, hang

    def wait(self, timeout=None):
        if self.hang:
            raise RuntimeError("[../gloo/transport/unbound_buffer.cc:81] Timed out waiting 100ms for recv operation")
        if self.fail:
            raise RuntimeError(self.fail)
        return True

    def is_completed(self):
        return True


class _FakeDist:
    """Rank 0 of two; ``incoming`` is what rank 1 will have sent, in order."""

    def __init__(self, incoming: list[torch.Tensor], recv_work: _Work | None = None) -> None:
        self.sent: list[tuple[torch.Tensor, int, str]] = []
        self.incoming = list(incoming)
        self.recv_work = recv_work or _Work()
        self.groups = iter(["up", "down"])
        self.threads: set[str] = set()

    def new_group(self, ranks):
        return next(self.groups)

    def isend(self, tensor, dst, group):
        self.threads.add(threading.current_thread().name)
        self.sent.append((tensor, dst, group))
        return _Work()

    def irecv(self, buf, src, group):
        buf.copy_(self.incoming.pop(0).view_as(buf))
        return self.recv_work


def _transport(monkeypatch, fake, routes=None, shaper=None) -> tp.Transport:
    monkeypatch.setattr(tp, "dist", fake)
    return tp.Transport(0, 2, torch.device("cpu"), timeout_s=5.0, shaper=shaper, routes=routes or {1: HOST})


def test_staged_send_hands_gloo_a_host_copy_in_order_from_a_thread(monkeypatch):
    fake = _FakeDist([])
    t = _transport(monkeypatch, fake)
    msgs = [torch.randn(2, 3, 4, 8) for _ in range(3)]
    handles = [t.isend(m, 1, f"activation F{i}.s0") for i, m in enumerate(msgs)]
    for h in handles:
        t.wait_send(h, "test")
    assert [dst for _, dst, _ in fake.sent] == [1, 1, 1]
    assert {g for _, _, g in fake.sent} == {"up"}  # low -> high
    for (staged, _, _), m in zip(fake.sent, msgs):
        assert staged.data_ptr() != m.data_ptr(), "the staged path sends a separate host buffer"
        torch.testing.assert_close(staged, m, rtol=0, atol=0)
    assert fake.threads == {"host->r1"}, "the compute thread never issues a staged send"
    t.close()


def test_direct_route_sends_the_tensor_itself(monkeypatch):
    fake = _FakeDist([])
    t = _transport(monkeypatch, fake, routes={1: DIRECT})
    m = torch.randn(4)
    t.wait_send(t.isend(m, 1, "x"), "test")
    assert fake.sent[0][0].data_ptr() == m.data_ptr()
    t.close()


def test_staged_receive_lands_in_host_buffer_then_the_output(monkeypatch):
    payload = torch.randn(2, 3, 4, 8)
    fake = _FakeDist([payload])
    t = _transport(monkeypatch, fake)
    h = t.irecv(tuple(payload.shape), payload.dtype, 1, "gradient B0.s1")
    assert h.host is not None and h.host.data_ptr() != h.tensor.data_ptr()
    got = t.wait_recv(h, "test")
    torch.testing.assert_close(got, payload, rtol=0, atol=0)
    t.close()


def test_staged_route_with_a_shaped_link_stages_every_chunk(monkeypatch):
    from dualpipe_mhc.cluster.shaping import LinkShaper

    shaper = LinkShaper(1e9, 0.0, chunk_bytes=256)
    payload = torch.randn(200)  # 800 bytes: 4 chunks of 256, 256, 256, 32
    chunks = [payload[0:64], payload[64:128], payload[128:192], payload[192:200]]
    fake = _FakeDist([c.clone() for c in chunks])
    t = _transport(monkeypatch, fake, shaper=shaper)
    t.wait_send(t.isend(payload, 1, "x"), "test")
    assert [s.numel() for s, _, _ in fake.sent] == [64, 64, 64, 8]
    assert all(s.data_ptr() != payload.data_ptr() + 4 * 64 * i for i, (s, _, _) in enumerate(fake.sent))
    torch.testing.assert_close(torch.cat([s for s, _, _ in fake.sent]), payload, rtol=0, atol=0)
    h = t.irecv((200,), torch.float32, 1, "y")
    assert len(h.works) == 4
    torch.testing.assert_close(t.wait_recv(h, "test"), payload, rtol=0, atol=0)
    t.close()


def test_staged_failures_and_timeouts_are_named(monkeypatch):
    fake = _FakeDist([torch.zeros(4)], recv_work=_Work(fail="Connection closed by peer [10.0.0.2]:4242"))
    t = _transport(monkeypatch, fake)
    with pytest.raises(TransferError, match=r"rank 0: receive of act from rank 1 failed \(step 3\): Connection closed"):
        t.wait_recv(t.irecv((4,), torch.float32, 1, "act"), "step 3")
    fake = _FakeDist([torch.zeros(4)], recv_work=_Work(hang=True))
    t = _transport(monkeypatch, fake)
    with pytest.raises(TransferTimeout, match=r"receive of act from rank 1 did not complete within 5 s"):
        t.wait_recv(t.irecv((4,), torch.float32, 1, "act"), "step 3")

    def broken_isend(tensor, dst, group):
        raise RuntimeError("gloo: peer gone")

    fake = _FakeDist([])
    t = _transport(monkeypatch, fake)
    monkeypatch.setattr(tp, "dist", SimpleNamespace(isend=broken_isend, irecv=fake.irecv, new_group=fake.new_group))
    with pytest.raises(TransferError, match=r"send of grad to rank 1 failed \(end of step 0\): gloo: peer gone"):
        t.wait_send(t.isend(torch.ones(3), 1, "grad"), "end of step 0")
    t.close()
