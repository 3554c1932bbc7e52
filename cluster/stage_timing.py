"""Timing and memory of one built stage chunk per micro-batch, as the runtime's executor runs it.

    figures = measure_stage(chunk, cfg, device, repeats=5, warmup=2)   # seconds and bytes

See :mod:`.stage_profile` for what each figure means and how stages are chosen.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

from dualpipe_mhc.config import RunConfig
from dualpipe_mhc.recompute import SavedTensorMeter

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class Timer:
    """Seconds of one call: CUDA events on the current stream (synchronised), else perf_counter."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3, out
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out


class _StageRunner:
    """F, split B / W and full B of one chunk on synthetic micro-batches, as the runtime's executor runs them."""

    def __init__(self, chunk: torch.nn.Module, cfg: RunConfig, device: torch.device) -> None:
        from .split_backward import backward_input, backward_weight

        self._bwd_input, self._bwd_weight = backward_input, backward_weight
        self.chunk, self.device = chunk, device
        m, p = cfg.model, cfg.pipeline
        self.tokens_shape = (p.microbatch_size, m.seq_len)
        self.stream_shape = (p.microbatch_size, m.seq_len, m.streams, m.width)
        self.vocab = m.vocab_size
        self.dtype = DTYPES[cfg.run.dtype]
        self._cut: list[torch.Tensor] = []
        if chunk.embed is not None:
            # As the executor: the first stage's B needs a differentiable input, so the chunk
            # runs on a leaf copy of the embedding output and the embedding's backward is in W.
            chunk.embed.register_forward_hook(self._cut_after_embed)
        gen = torch.Generator(device="cpu").manual_seed(0)
        self.tokens = torch.randint(0, self.vocab, self.tokens_shape, generator=gen).to(device)
        self.targets = torch.randint(0, self.vocab, self.tokens_shape, generator=gen).to(device)
        # The gradient a stage receives, allocated once: in the runtime it arrives at B, so it
        # belongs to neither F's kept bytes nor its timing.
        self.out_grad = torch.randn(self.stream_shape, generator=gen).to(device, self.dtype)
        self.loss_grad = torch.ones((), device=device)
        self.x_data = torch.randn(self.stream_shape, generator=gen).to(device, self.dtype)

    def _cut_after_embed(self, _module, _inputs, output: torch.Tensor) -> torch.Tensor:
        leaf = output.detach().requires_grad_()
        self._cut = [output, leaf]
        return leaf

    def forward(self) -> dict[str, Any]:
        chunk = self.chunk
        if chunk.is_first:
            out = chunk(self.tokens, self.targets if chunk.is_last else None)
            embed_out, x_in = self._cut
            self._cut = []
        else:
            x_in = self.x_data.detach().requires_grad_()  # a fresh leaf on the received input's storage
            embed_out = None
            out = chunk(x_in, self.targets if chunk.is_last else None)
        return {"x": x_in, "out": out, "grad": self.loss_grad if chunk.is_last else self.out_grad, "embed_out": embed_out}

    def backward_input(self, mb: dict[str, Any]) -> None:
        dinputs, groups = self._bwd_input([mb["out"]], [mb["grad"]], [mb["x"]], self.chunk.parameters())
        mb["groups"], mb["dx"] = groups, dinputs[0]
        del mb["out"]

    def backward_weight(self, mb: dict[str, Any]) -> None:
        self._bwd_weight(self.chunk.parameters(), mb.pop("groups"))
        if mb["embed_out"] is not None:
            torch.autograd.backward([mb["embed_out"]], [mb["dx"]])

    def backward_full(self, mb: dict[str, Any]) -> None:
        torch.autograd.backward([mb["out"]], [mb["grad"]])
        if mb["embed_out"] is not None:
            torch.autograd.backward([mb["embed_out"]], [mb["x"].grad])


def measure_stage(chunk: torch.nn.Module, cfg: RunConfig, device: torch.device, repeats: int, warmup: int) -> dict[str, Any]:
    """The per-micro-batch figures of one built chunk (see the module docstring); seconds and bytes."""
    run = _StageRunner(chunk, cfg, device)
    timer = Timer(device)
    samples: dict[str, list[float]] = {k: [] for k in ("f", "b", "w", "full_b", "fb_pair")}

    def one_round(record: bool) -> None:
        t_f, mb = timer(run.forward)
        t_b, _ = timer(lambda: run.backward_input(mb))
        t_w, _ = timer(lambda: run.backward_weight(mb))
        mb2 = run.forward()
        t_full, _ = timer(lambda: run.backward_full(mb2))
        mb3 = run.forward()

        def pair() -> dict[str, Any]:  # the runtime's FB: F of one micro-batch, then B of another
            nxt = run.forward()
            run.backward_input(mb3)
            return nxt

        t_pair, mb4 = timer(pair)
        run.backward_weight(mb3)
        del mb4  # its graph goes with it
        if record:
            for key, value in (("f", t_f), ("b", t_b), ("w", t_w), ("full_b", t_full), ("fb_pair", t_pair)):
                samples[key].append(value)

    for _ in range(warmup):
        one_round(False)
    for _ in range(repeats):
        one_round(True)
    out = {key: statistics.median(v) for key, v in samples.items()}
    out["fb_overlap"] = out["fb_pair"] / (out["f"] + out["b"])
    out.update(_memory(run, cfg, device))
    out["recompute"] = 0.0
    if getattr(chunk, "recompute_layers", None) and cfg.model.residual != "plain":
        block = chunk.recompute_layers
        chunk.recompute_layers = None
        try:
            plain_b = []
            for k in range(warmup + repeats):
                mb = run.forward()
                t_b, _ = timer(lambda: run.backward_input(mb))
                run.backward_weight(mb)
                if k >= warmup:
                    plain_b.append(t_b)
        finally:
            chunk.recompute_layers = block
        out["b_without_recompute"] = statistics.median(plain_b)
        out["recompute"] = max(0.0, out["b"] - out["b_without_recompute"])
    return out


def _memory(run: _StageRunner, cfg: RunConfig, device: torch.device) -> dict[str, Any]:
    """Kept bytes after F and B's peak above the pre-F baseline, from one untimed round."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        mb = run.forward()
        torch.cuda.synchronize(device)
        kept = torch.cuda.memory_allocated(device) - base
        torch.cuda.reset_peak_memory_stats(device)
        run.backward_input(mb)
        run.backward_weight(mb)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        return {"kept_bytes": kept, "peak_b_bytes": peak, "memory_source": "cuda allocator"}
    m = cfg.model
    meter = SavedTensorMeter(m.streams, m.width, cfg.tokens_per_microbatch())
    with meter:
        mb = run.forward()
    # The stage output is kept too (the runtime holds it for B); the meter counts what autograd saves.
    kept = meter.kept_bytes() + mb["out"].untyped_storage().nbytes()
    run.backward_full(mb)
    return {"kept_bytes": kept, "peak_b_bytes": None, "memory_source": "saved-tensor meter"}
