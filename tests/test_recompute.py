"""mHC recomputation: same loss and gradients as without it, less kept, blocks cut at stage boundaries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

from dualpipe_mhc.config import ModelConfig
from dualpipe_mhc.model import build_model
from dualpipe_mhc.recompute import SavedTensorMeter, block_segments, check_block_layers

# mlp_hidden differs from n*C so the meter can tell stream storages from MLP activations by size.
CFG = ModelConfig(vocab_size=64, width=32, heads=2, layers=5, streams=4, seq_len=16, mlp_hidden=80)
BATCH = 2
TOKENS = BATCH * CFG.seq_len


def _data(cfg: ModelConfig = CFG) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (
        torch.randint(0, cfg.vocab_size, (BATCH, cfg.seq_len), generator=g),
        torch.randint(0, cfg.vocab_size, (BATCH, cfg.seq_len), generator=g),
    )


def _pipeline_step(cfg, block_layers, stages, dtype=torch.float32, kernels="reference", meter=None, device="cpu"):
    """Forward the chunks one after another, each stage taking a detached input like a real pipeline,
    then backward them in reverse; returns (loss, {param: grad}, {stage: input grad})."""
    model = build_model(cfg, seed=0, kernels=kernels, dtype=dtype, recompute_layers=block_layers)
    tokens, targets = _data(cfg)
    model, tokens, targets = model.to(device), tokens.to(device), targets.to(device)
    chunks = model.stage_chunks(stages)
    done, x = [], tokens
    with meter if meter is not None else torch.enable_grad():
        for chunk in chunks:
            x_in = x if chunk.is_first else x.detach().requires_grad_()
            out = chunk(x_in, targets if chunk.is_last else None)
            done.append((x_in, out))
            x = out
    grad, input_grads = None, {}
    for s in reversed(range(len(done))):
        x_in, out = done[s]
        out.backward(grad)
        grad = x_in.grad
        input_grads[s] = grad
    return done[-1][1].detach(), {n: p.grad for n, p in model.named_parameters()}, input_grads


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny ops on a shared 2-core box: intra-op threads only spin against each other (70x slower under load).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def baseline(_one_thread):
    return _pipeline_step(CFG, None, 1)


@pytest.mark.parametrize("stages", [1, 2, 3])
@pytest.mark.parametrize("block_layers", [1, 2, 3, 7])  # 2, 3 do not divide L=5; 7 > L; 3 spans stages
def test_gradients_bitwise_equal_on_reference_path(baseline, block_layers, stages):
    loss, grads, _ = _pipeline_step(CFG, block_layers, stages)
    ref_loss, ref_grads, _ = baseline
    assert torch.equal(loss, ref_loss)
    for name, g in ref_grads.items():
        assert g is not None and torch.equal(grads[name], g), name


def test_stage_input_gradients_bitwise_equal():
    _, _, ref = _pipeline_step(CFG, None, 3)
    _, _, got = _pipeline_step(CFG, 2, 3)
    for s in (1, 2):
        assert torch.equal(got[s], ref[s])


@pytest.mark.parametrize("residual,streams", [("plain", 1), ("hc", 4), ("mhc", 2)])
def test_other_residual_kinds(residual, streams):
    cfg = CFG.model_copy(update=dict(residual=residual, streams=streams, layers=4))
    ref_loss, ref_grads, _ = _pipeline_step(cfg, None, 2)
    loss, grads, _ = _pipeline_step(cfg, 3, 2)
    assert torch.equal(loss, ref_loss)
    assert all(torch.equal(grads[k], g) for k, g in ref_grads.items())


def test_bfloat16_streams_bitwise_equal():
    ref_loss, ref_grads, _ = _pipeline_step(CFG, None, 2, dtype=torch.bfloat16)
    loss, grads, _ = _pipeline_step(CFG, 2, 2, dtype=torch.bfloat16)
    assert torch.equal(loss, ref_loss)
    assert all(torch.equal(grads[k], g) for k, g in ref_grads.items())


def test_autocast_forward_replayed_under_autocast():
    tokens, targets = _data()

    def grads(block_layers):
        model = build_model(CFG, seed=0, kernels="reference", recompute_layers=block_layers)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(tokens, targets)
        loss.backward()  # the backward (and so the replay) runs outside the autocast region
        return loss, {n: p.grad for n, p in model.named_parameters()}

    (ref_loss, ref), (loss, got) = grads(None), grads(2)
    assert torch.equal(loss, ref_loss) and all(torch.equal(got[k], g) for k, g in ref.items())


def test_whole_model_forward_and_retained_graph():
    tokens, targets = _data()
    ref = build_model(CFG, seed=0, kernels="reference")
    ref(tokens, targets).backward()
    model = build_model(CFG, seed=0, kernels="reference", recompute_layers=2)
    loss = model(tokens, targets)
    loss.backward(retain_graph=True)  # a second backward over the same graph replays again
    first = {n: p.grad.clone() for n, p in model.named_parameters()}
    loss.backward()
    for n, p in ref.named_parameters():
        assert torch.equal(first[n], p.grad)
        assert torch.equal(model.get_parameter(n).grad, 2 * p.grad)


def test_no_grad_forward_skips_recompute():
    tokens, targets = _data()
    model = build_model(CFG, seed=0, kernels="reference", recompute_layers=2)
    with torch.no_grad():
        assert torch.equal(model(tokens, targets), build_model(CFG, seed=0, kernels="reference")(tokens, targets))


@pytest.mark.parametrize(
    "first,count,lr,expected",
    [
        (0, 5, 2, [(0, 2), (2, 4), (4, 5)]),
        (3, 3, 2, [(0, 1), (1, 3)]),  # the chunk starts mid-block: it caches its own first input
        (3, 2, 4, [(0, 1), (1, 2)]),
        (0, 4, 10, [(0, 4)]),
    ],
)
def test_block_segments(first, count, lr, expected):
    assert block_segments(first, count, lr) == expected


@pytest.mark.parametrize("bad", [0.5, -1, "2", True])
def test_bad_block_layers_one_line_error(bad):
    with pytest.raises(ValueError, match="block_layers") as err:
        check_block_layers(bad)
    assert "\n" not in str(err.value)
    assert check_block_layers(None) is None and check_block_layers(0) is None


def _measure(block_layers, stages):
    meter = SavedTensorMeter(CFG.streams, CFG.width, TOKENS)
    _pipeline_step(CFG, block_layers, stages, meter=meter)
    return meter


@pytest.mark.parametrize("block_layers,stages", [(1, 1), (2, 1), (2, 2), (3, 2), (7, 3)])
def test_only_block_inputs_kept(block_layers, stages):
    """Kept n-stream storages are exactly one per (block x stage) segment, n*C per token each."""
    from dualpipe_mhc.model import stage_layer_ranges

    base = _measure(None, stages)
    got = _measure(block_layers, stages)
    segments = sum(len(block_segments(a, b - a, block_layers)) for a, b in stage_layer_ranges(CFG, stages))
    per_input = CFG.streams * CFG.width * TOKENS * 4
    assert got.kept_bytes("streams") == segments * per_input
    sublayers = 2 * CFG.layers
    assert base.kept_bytes("streams") == sublayers * per_input  # every x_l saved without recomputation
    # Everything recompute drops was kept before; nothing else changes.
    assert got.kept_bytes() + got.dropped_bytes() == base.kept_bytes()
    # The backward materialises one block at a time: at most L_r layers' worth of what was dropped
    # (a layer that opens a block drops one stream tensor fewer than the average).
    per_layer = got.dropped_bytes() / CFG.layers + per_input
    assert 0 < got.replay_peak_bytes <= min(block_layers, CFG.layers) * per_layer


@pytest.mark.parametrize("replay_once,expected", [(False, (2, 4)), (True, (2, 2))])
def test_zero_bubble_split_backward_bitwise_equal(monkeypatch, replay_once, expected):
    """B then W as the runtime runs them (cluster.split_backward's backward_input / backward_weight over a
    retained graph): same gradients; each block is replayed in B and, unless ``replay_once``, again in W."""
    from dualpipe_mhc.cluster.split_backward import backward_input, backward_weight

    from dualpipe_mhc import recompute

    segments = []
    original = recompute._Segment.forward
    monkeypatch.setattr(recompute._Segment, "forward", lambda seg, x: segments.append(seg) or original(seg, x))

    def replays() -> int:  # walks of the x chain, over every block of the step
        return sum(seg.replays for seg in segments)

    def split_step(block_layers):
        model = build_model(CFG, seed=0, kernels="reference").enable_recompute(block_layers, replay_once)
        chunk = model.stage_chunks(2)[1]
        g = torch.Generator().manual_seed(0)
        x = torch.randn(BATCH, CFG.seq_len, CFG.streams, CFG.width, generator=g).requires_grad_()
        loss = chunk(x, _data()[1])
        params = list(chunk.parameters())
        (dx,), groups = backward_input([loss], None, [x], iter(params))
        after_b = replays()
        backward_weight(iter(params), groups)
        return dx, {n: p.grad for n, p in chunk.named_parameters()}, after_b

    ref_dx, ref_grads, _ = split_step(None)
    segments.clear()
    dx, grads, after_b = split_step(1)  # layers 3, 4 of 5 -> two blocks
    assert torch.equal(dx, ref_dx)
    assert all(torch.equal(grads[k], g) for k, g in ref_grads.items())
    assert (after_b, replays()) == expected


def _streams_alive_after_forward(kernels: str, device: str = "cpu") -> int:
    """How many of the n-stream tensors x_1 .. x_{2L-1} survive the forward under one recompute block."""
    cfg = CFG.model_copy(update=dict(layers=3))
    model = build_model(cfg, seed=0, kernels=kernels, recompute_layers=cfg.layers).to(device)
    refs = []
    for hc in model.hyper_connections():
        hc.register_forward_hook(lambda mod, args, out: refs.append(weakref.ref(out)))
    tokens, targets = (t.to(device) for t in _data(cfg))
    loss = model(tokens, targets)
    alive = sum(r() is not None for r in refs[:-1])  # the last output is the head's input, not kept
    loss.backward()
    return alive


def test_recomputed_streams_are_freed_after_forward():
    assert _streams_alive_after_forward("reference") == 0


_INTERPRETED = """
import json, sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from test_recompute import CFG, _pipeline_step, _streams_alive_after_forward
cfg = CFG.model_copy(update=dict(layers=3))
out = dict(alive=_streams_alive_after_forward("triton"))
# fp32 streams run the op-local kernels; bf16 ones, with the junction switched on, chain sublayers
# (kernels/mhc_chain.py), whose junction writes the x that the rebuild re-derives with the post/res kernel
from dualpipe_mhc.kernels.settings import overriding
for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
    with overriding({{"chain": True}}):
        ref = _pipeline_step(cfg, None, 2, dtype=dtype, kernels="triton")
        got = _pipeline_step(cfg, 2, 2, dtype=dtype, kernels="triton")
    out[name] = dict(loss=torch.equal(ref[0], got[0]), grads=[k for k in ref[1] if not torch.equal(ref[1][k], got[1][k])])
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def interpreted_fused():
    """The fused Triton ops run in Triton's CPU interpreter (a subprocess: the switch is read at import)."""
    pytest.importorskip("triton")
    code = _INTERPRETED.format(tests=str(Path(__file__).parent))
    env = dict(os.environ, TRITON_INTERPRET="1", DUALPIPE_MHC_KERNELS="triton")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_fused_kernels_interpreted_bitwise_equal(interpreted_fused, dtype):
    assert interpreted_fused[dtype]["loss"] and interpreted_fused[dtype]["grads"] == []


def test_fused_kernels_free_recomputed_streams(interpreted_fused):
    assert interpreted_fused["alive"] == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for the fused kernels")
def test_fused_kernels_bf16_within_tolerance():
    cfg = CFG.model_copy(update=dict(width=128, heads=4, mlp_hidden=320))
    ref_loss, ref_grads, _ = _pipeline_step(cfg, None, 2, dtype=torch.bfloat16, kernels="triton", device="cuda")
    loss, grads, _ = _pipeline_step(cfg, 2, 2, dtype=torch.bfloat16, kernels="triton", device="cuda")
    torch.testing.assert_close(loss, ref_loss, atol=1e-2, rtol=1e-2)
    for k, g in ref_grads.items():
        torch.testing.assert_close(grads[k].float(), g.float(), atol=2e-2, rtol=5e-2, msg=k)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for the fused kernels")
def test_fused_recompute_frees_stream_memory_on_gpu():
    cfg = CFG.model_copy(update=dict(width=256, heads=4, mlp_hidden=640, layers=4, seq_len=256))

    def held_after_forward(block_layers):
        model = build_model(cfg, seed=0, kernels="triton", dtype=torch.bfloat16, recompute_layers=block_layers)
        model = model.cuda()
        tokens, targets = (t.cuda() for t in _data(cfg))
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        loss = model(tokens, targets)
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - before
        loss.backward()
        return held

    dropped_streams = 2 * cfg.layers - 2  # L_r = 2: two blocks keep their inputs, the other x_l go
    stream_bytes = BATCH * cfg.seq_len * cfg.streams * cfg.width * 2
    saved = held_after_forward(None) - held_after_forward(2)
    assert saved >= 0.5 * dropped_streams * stream_bytes


@pytest.mark.parametrize("block_layers", [1, 2, 5])
def test_backward_transient_is_the_x_chain_plus_one_sublayer(block_layers):
    """The rebuild holds the x_k still ahead of the backward (at most 2 L_r - 1 of them) and one
    sublayer's u_k, RMSNorm(u_k) and what the norm saved, not a whole block's intermediates."""
    meter = _measure(block_layers, 1)
    per_input = CFG.streams * CFG.width * TOKENS * 4
    sublayers = 2 * CFG.layers
    one_sublayer = (meter.dropped_bytes() - meter.dropped_bytes("streams")) / sublayers
    chain = (2 * block_layers - 1) * per_input
    blocks = -(-CFG.layers // block_layers)
    assert meter.dropped_bytes("streams") == (sublayers - blocks) * per_input  # every x_k but the block inputs
    # Two sublayers' u_k and norms held at once would break this (the old whole-block replay did).
    assert 0 < meter.replay_peak_bytes <= chain + one_sublayer


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for the fused kernels")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rebuilt_u_is_bitwise_the_forward_u_on_gpu(dtype):
    """The aggregate kernel the rebuild uses and the forward's fused aggregate share one tile function."""
    from dualpipe_mhc.kernels import fused

    g = torch.Generator(device="cuda").manual_seed(0)
    t, n, c = 1537, 4, 2048
    x = torch.randn(t, n, c, device="cuda", generator=g).to(dtype)
    phi = torch.randn(n * c, 2 * n + n * n, device="cuda", generator=g) / (n * c) ** 0.5
    alpha, bias = torch.full((3,), 0.5, device="cuda"), torch.randn(2 * n + n * n, device="cuda", generator=g)
    u, h_pre, _, _ = fused.mhc_pre(x, phi, alpha, bias, 20, return_h_pre=True)
    assert torch.equal(fused.pre_aggregate(x, h_pre), u)
