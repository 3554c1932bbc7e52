"""Stability metrics of the residual mixing, trained and untrained (docs/DESIGN.md §4).

Two measurements back the paper's argument that the Sinkhorn projection keeps
deep hyper-connected stacks stable:

* :func:`train_kind` trains the same small LM as ``plain`` (n = 1), ``hc`` and
  ``mhc`` on the same byte batches from the bundled corpus and records the loss,
  the gradient norm and, on a fixed held-out batch, the H_res of every sublayer.
* :func:`random_demo` multiplies random unconstrained HC matrices over depth and
  compares them with their Sinkhorn-Knopp projections, untrained.

Both report the Amax Gain Magnitude of the composite map P_d = H_d ... H_1
(forward: max absolute row sum, backward: max absolute column sum). Trained
H_res depend on the token, so composite gains are per token, reported as the
worst token (max) and the mean over the tokens of the evaluation batch.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .config import RESIDUALS, ModelConfig
from .corpus import VOCAB_SIZE, Corpus
from .kernels.reference import amax_gain, sinkhorn
from .model import MhcLM, build_model

KINDS = RESIDUALS  # every residual kind trains in the comparison


@dataclass(frozen=True)
class TrainSettings:
    """One training run per residual kind; every kind sees exactly these settings."""

    steps: int = 300
    layers: int = 8
    width: int = 64
    heads: int = 4
    streams: int = 4  # n for hc and mhc; plain always has 1
    seq_len: int = 64
    batch_size: int = 16
    lr: float = 3e-3
    warmup: int = 30  # linear warm-up steps, then constant lr
    clip: float = 1.0  # gradient-norm clip (0: none); the recorded norm is the one before clipping
    sinkhorn_iters: int = 20
    seed: int = 0
    eval_batch: int = 8  # sequences in the fixed held-out batch the H_res metrics are measured on
    eval_every: int = 0  # 0: about ten evaluations over the run

    def model_config(self, kind: str) -> ModelConfig:
        return ModelConfig(
            vocab_size=VOCAB_SIZE,
            width=self.width,
            heads=self.heads,
            layers=self.layers,
            streams=1 if kind == "plain" else self.streams,
            residual=kind,
            seq_len=self.seq_len,
            sinkhorn_iters=self.sinkhorn_iters,
        )


@torch.no_grad()
def collect_h_res(model: MhcLM, tokens: Tensor) -> Tensor:
    """H_res of every sublayer on ``tokens [B, S]``: ``[D, B*S, n, n]``, D = 2 * layers, in depth order.

    The input of each wrapped sublayer is caught by a hook during one ordinary
    forward, then mapped through the reference; ``plain`` gives 1x1 identities.
    """
    wrapped = model.hyper_connections()
    inputs: list[Tensor] = []
    hooks = [hc.register_forward_pre_hook(lambda _m, args: inputs.append(args[0])) for hc in wrapped]
    try:
        _run_blocks(model, tokens)
    finally:
        for h in hooks:
            h.remove()
    out = []
    for hc, x in zip(wrapped, inputs):
        if hc.kind == "plain":
            out.append(torch.ones(x.shape[:-2].numel(), 1, 1, dtype=torch.float64))
        else:
            _, _, h_res = hc.mappings(x)
            out.append(h_res.reshape(-1, hc.streams, hc.streams).double())
    return torch.stack(out)


def _run_blocks(model: MhcLM, tokens: Tensor) -> Tensor:
    x = model.embed(tokens)
    for block in model.blocks:
        x = block(x)
    return x


def prefix_product_gains(mats: Tensor) -> tuple[Tensor, Tensor]:
    """``mats [D, B, n, n]`` -> Amax (forward, backward) gains ``[D, B]`` of P_d = mats[d-1] @ ... @ mats[0]."""
    prod = torch.eye(mats.shape[-1], dtype=mats.dtype).expand_as(mats[0])
    fwd, bwd = [], []
    for layer in mats:
        prod = layer @ prod
        f, b = amax_gain(prod)
        fwd.append(f)
        bwd.append(b)
    return torch.stack(fwd), torch.stack(bwd)


def composite_gains(h: Tensor) -> dict[str, list[float]]:
    """Gains over depth of ``h [D, T, n, n]`` (float64), P_d = h[d-1] @ ... @ h[0] per token."""
    fwd_t, bwd_t = prefix_product_gains(h)  # [D, T]
    return {
        "composite_forward_gain": fwd_t.amax(-1).tolist(),
        "composite_backward_gain": bwd_t.amax(-1).tolist(),
        "composite_forward_gain_mean": fwd_t.mean(-1).tolist(),
        "composite_backward_gain_mean": bwd_t.mean(-1).tolist(),
    }


def h_res_metrics(h: Tensor) -> dict[str, list[float]]:
    """Per-layer gains (worst token), distance from I (mean Frobenius norm over tokens) and composite gains."""
    eye = torch.eye(h.shape[-1], dtype=h.dtype)
    fwd, bwd = amax_gain(h)  # [D, T]
    return {
        "layer_forward_gain": fwd.amax(-1).tolist(),
        "layer_backward_gain": bwd.amax(-1).tolist(),
        "identity_distance": torch.linalg.matrix_norm(h - eye).mean(-1).tolist(),
        **composite_gains(h),
    }


def _lr_at(step: int, s: TrainSettings) -> float:
    return s.lr * min(1.0, (step + 1) / max(1, s.warmup))


def train_kind(
    kind: str, s: TrainSettings, corpus: Corpus, progress: Callable[[int], None] | None = None
) -> dict:
    """Train one residual kind from seed ``s.seed`` on batches drawn from the same seed; return its record."""
    torch.manual_seed(s.seed)  # dropout-free model, but keep any stray randomness reproducible too
    model = build_model(s.model_config(kind), seed=s.seed, kernels="reference")
    # No weight decay: decay would pull HC's free b_res towards 0 and confound the comparison.
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(0.9, 0.95), weight_decay=0.0)
    data_gen = torch.Generator().manual_seed(s.seed)
    eval_tokens, eval_targets = corpus.batch(s.eval_batch, s.seq_len, torch.Generator().manual_seed(s.seed + 1), "val")
    every = s.eval_every or max(1, s.steps // 10)

    losses, grad_norms, eval_steps, fwd_hist, bwd_hist = [], [], [], [], []
    diverged_at = None
    start = time.perf_counter()

    def evaluate(step: int) -> dict:
        model.eval()
        m = h_res_metrics(collect_h_res(model, eval_tokens))
        model.train()
        eval_steps.append(step)
        fwd_hist.append(m["composite_forward_gain"][-1])
        bwd_hist.append(m["composite_backward_gain"][-1])
        return m

    initial = evaluate(0)
    for step in range(s.steps):
        tokens, targets = corpus.batch(s.batch_size, s.seq_len, data_gen)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, s)
        loss = model(tokens, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), s.clip if s.clip > 0 else math.inf)
        losses.append(loss.item())
        grad_norms.append(norm.item())
        if not (math.isfinite(losses[-1]) and math.isfinite(grad_norms[-1])):
            diverged_at = step  # an optimiser step on NaNs would only spread them; stop here and say so
            break
        opt.step()
        if (step + 1) % every == 0 and step + 1 < s.steps:
            evaluate(step + 1)
        if progress is not None:
            progress(step + 1)
    seconds = time.perf_counter() - start
    final = evaluate(len(losses))
    with torch.no_grad():
        val_loss = model(eval_tokens, eval_targets).item()
    tail = losses[-max(1, len(losses) // 10) :]
    return {
        "kind": kind,
        "streams": model.cfg.streams,
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": seconds,
        "diverged_at_step": diverged_at,
        "loss": losses,
        "grad_norm": grad_norms,
        "final_loss": sum(tail) / len(tail),
        "val_loss": val_loss,  # on the held-out eval batch
        "max_grad_norm": max(grad_norms),
        "eval_steps": eval_steps,
        "composite_forward_gain_history": fwd_hist,
        "composite_backward_gain_history": bwd_hist,
        "initial": {k: initial[k] for k in ("composite_forward_gain", "composite_backward_gain", "identity_distance")},
        **final,
    }


@dataclass(frozen=True)
class DemoSettings:
    """Random-matrix demonstration: H~ = I + sigma * G, G standard normal, per layer and trial."""

    streams: int = 4
    depth: int = 500
    sigmas: tuple[float, ...] = (0.05, 0.1, 0.2)
    trials: int = 64
    sinkhorn_iters: int = 20
    seed: int = 0
    depths_reported: tuple[int, ...] = field(default=(1, 10, 50, 100, 200, 500))
    # mHC only: Sinkhorn of logits uniform in +-a, where 20 rounds leave a visible column error
    # (about 1e-2 at +-10); HC has no counterpart, products of such raw matrices overflow at once.
    wide_logits: tuple[float, ...] = (3.0, 10.0)


def random_demo(s: DemoSettings) -> dict:
    """Composite gains over depth 1..s.depth of random HC matrices and of their Sinkhorn projections.

    HC uses H~ as it is; mHC uses SinkhornKnopp(H~) (exp, then t_max rounds of
    column and row normalisation, docs/DESIGN.md §4). Float64; each gain is the worst
    of ``trials`` independent products (the median is recorded beside it).
    """
    gen = torch.Generator().manual_seed(s.seed)
    n, eye = s.streams, torch.eye(s.streams, dtype=torch.float64)
    shape = (s.depth, s.trials, n, n)
    out: dict = {**asdict(s), "hc": {}, "mhc": {}, "mhc_wide": {}}
    for sigma in s.sigmas:
        logits = eye + sigma * torch.randn(shape, generator=gen, dtype=torch.float64)
        out["hc"][str(sigma)] = _product_gains(logits)
        out["mhc"][str(sigma)] = _product_gains(sinkhorn(logits, s.sinkhorn_iters))
    for a in s.wide_logits:
        logits = (2 * torch.rand(shape, generator=gen, dtype=torch.float64) - 1) * a
        out["mhc_wide"][str(a)] = _product_gains(sinkhorn(logits, s.sinkhorn_iters))
    return out


def _product_gains(mats: Tensor) -> dict[str, list[float]]:
    """``mats [depth, trials, n, n]`` -> gains of P_d = mats[d-1] @ ... @ mats[0], worst and median over trials."""
    fwd_t, bwd_t = prefix_product_gains(mats)  # [depth, trials]
    return {
        "forward": fwd_t.amax(-1).tolist(),
        "backward": bwd_t.amax(-1).tolist(),
        "forward_median": fwd_t.median(-1).values.tolist(),
        "backward_median": bwd_t.median(-1).values.tolist(),
    }


def run_report(
    train: TrainSettings,
    demo: DemoSettings,
    kinds: tuple[str, ...] = KINDS,
    progress: Callable[[str, int], None] | None = None,
) -> dict:
    """Train every kind and run the random-matrix demo: the whole stability report as a plain dict."""
    corpus = Corpus()
    runs = {}
    for kind in kinds:
        cb = (lambda step, k=kind: progress(k, step)) if progress is not None else None
        runs[kind] = train_kind(kind, train, corpus, cb)
    return {
        "settings": {
            **asdict(train),
            "sublayers": 2 * train.layers,
            "tokens_per_step": train.batch_size * train.seq_len,
            "optimizer": "AdamW(betas=(0.9, 0.95), weight_decay=0)",
            "schedule": f"linear warm-up over {train.warmup} steps, then constant",
            "corpus": "Python 3.11 language reference (pydoc_data.topics), UTF-8 bytes",
            "gain_reduction": "composite_*_gain: worst token of the eval batch; *_mean: mean over its tokens",
            "device": "cpu",
            "threads": torch.get_num_threads(),
        },
        "kinds": runs,
        "random_demo": random_demo(demo),
    }
