"""Analytic per-stage costs from the model shape over a hardware preset's achieved rates.

Compute time of an action = matmul FLOPs / achieved matmul rate + elementwise bytes /
achieved HBM bandwidth (memory-bound kernels do not overlap the GEMMs around them).
Per layer and micro-batch of T tokens (S = sequence length, C width, H MLP hidden, n
streams, b bytes per element):

    GEMMs (forward)    2T(4C^2 + C*H_up + H*C)        H_up = 2H for SwiGLU, H for GELU
    attention core     2T*S*C                         causal QK^T and AV
    B (input grads)    GEMMs + 2x attention core      flash-attention backward ~2x forward
    W (weight grads)   GEMMs
    elementwise fwd    b*T*(8C + 3H) + residual       two norms, rotary, SwiGLU (2H for GELU)
    residual, plain    b*T*2*3C                       read x and F(x), write x, per sublayer
    residual, mHC      b*T*2*(reads + writes)         per sublayer, :class:`MhcTraffic`
    mHC GEMMs          per sublayer 2T*nC*(n^2+2n) + 2T*n^2*C + 4T*nC
    backward traffic   ``bwd_traffic`` x forward's elementwise bytes

The first stage adds the embedding (bytes only), the last the LM head (2T*C*V per F, B
and W) and its cross-entropy. Activations kept per in-flight micro-batch and what B needs
beyond them: :func:`stage_kept_bytes`, :func:`backward_transient_bytes` (flash attention: no
S x S score matrix).
A stage's output crossing to the next rank is T x n x C x b bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .costs import Costs
from .split import stage_layers


@dataclass(frozen=True)
class MhcTraffic:
    """Elements of C moved per token and sublayer in mHC's forward, as a*n + b."""

    name: str
    reads: tuple[float, float]
    writes: tuple[float, float]

    def elements(self, n: int) -> float:
        return self.reads[0] * n + self.reads[1] + self.writes[0] * n + self.writes[1]


# docs/DESIGN.md §4: unfused HC-style code reads ~(5n+1)C and writes ~(3n+1)C; fused kernels cut
# the reads to ~(n+1)C. At n = 4, fused, forward + 2x backward this is ~45C elements (90C
# bytes) per sublayer over a plain residual's, near docs/DESIGN.md §6's ~78C-byte floor.
TRAFFIC = {
    "fused": MhcTraffic("fused", (1.0, 1.0), (3.0, 1.0)),
    "unfused": MhcTraffic("unfused", (5.0, 1.0), (3.0, 1.0)),
}


@dataclass(frozen=True)
class ModelShape:
    layers: int
    width: int  # C
    hidden: int  # H
    seq_len: int  # S
    vocab: int
    tokens: int  # T, per micro-batch
    streams: int = 4  # n
    residual: str = "mhc"  # plain | hc | mhc
    mlp: str = "swiglu"
    bytes_per_elem: int = 2
    split: str = "balanced"  # even | balanced: see :mod:`scheduler.split`

    @property
    def n(self) -> int:
        return 1 if self.residual == "plain" else self.streams


@dataclass(frozen=True)
class Hardware:
    flops: float  # achieved matmul FLOP/s
    hbm: float  # achieved memory bandwidth, bytes/s


# The split must be a function of the model alone, so that every rank, the single-process
# reference and the simulator cut the same layers whatever hardware preset they price with: edge
# costs are weighed at this fixed FLOP/byte balance (the h800 preset's), in bf16.
SPLIT_HARDWARE = Hardware(700e12, 2.9e12)


def edge_costs(shape: ModelShape) -> tuple[float, float]:
    """(embedding, head) cost per micro-batch in layer-equivalents (one layer's F + B + W = 1),
    from this module's analytic model at :data:`SPLIT_HARDWARE`; token count cancels out."""
    probe = replace(shape, layers=1, bytes_per_elem=2, tokens=shape.seq_len, split="even")
    alone = analytic_costs(probe, SPLIT_HARDWARE, 1, include_head=False)
    layer = layer_cost(probe, SPLIT_HARDWARE, TRAFFIC["fused"])
    with_head = analytic_costs(probe, SPLIT_HARDWARE, 1, include_head=True)
    unit = layer.f + layer.b + layer.w
    embed = alone.f[0] + alone.b[0] + alone.w[0] - unit
    head = with_head.f[0] + with_head.b[0] + with_head.w[0] - unit - embed
    return embed / unit, head / unit


def shape_stage_layers(shape: ModelShape, num_stages: int) -> list[int]:
    """Layers per stage for ``shape`` (its ``split`` mode): what the model builds and runs."""
    if shape.split == "even":
        return stage_layers(shape.layers, num_stages, mode="even")
    embed, head = edge_costs(shape)
    return stage_layers(shape.layers, num_stages, head_cost=head, embed_cost=embed, mode=shape.split)


def kept_block_inputs(first_layer: int, count: int, block_layers: int) -> int:
    """Recompute blocks are global (``layer // L_r``) and cut at stage boundaries, each piece
    keeping its own input (the runtime's ``recompute.block_segments``): how many a stage keeps."""
    if count <= 0:
        return 0
    return (first_layer + count - 1) // block_layers - first_layer // block_layers + 1


def stage_params(shape: ModelShape, num_stages: int, include_head: bool = True) -> list[float]:
    """Parameters per model stage: attention 4C^2, MLP C*H_up + H*C, mHC's phi and scalars per
    sublayer, the embedding on the first stage and the LM head on the last."""
    c, h, n = shape.width, shape.hidden, shape.n
    h_up = 2 * h if shape.mlp == "swiglu" else h
    mhc = 0 if shape.residual == "plain" else 2 * (n * c * (n * n + 2 * n) + n * n + 2 * n + 3)
    per_layer = 4 * c * c + c * h_up + h * c + mhc
    params = [float(per_layer * count) for count in shape_stage_layers(shape, num_stages)]
    params[0] += shape.vocab * c
    if include_head:
        params[-1] += shape.vocab * c
    return params


# Activation memory, in elements of the stream dtype per token, as this model's autograd keeps
# them (counted op by op, then checked against torch.cuda's allocator on an H200 at the paper-27b
# layer: benchmarks/bench_recompute.py, benchmarks/results/recompute_*.md).
#   F's internals, per layer: attention 7C (the qkv output 3C, which v views; rotary q and k;
#     the attention output and its [T, C] copy for the out projection); MLP, SwiGLU 4H (up
#     output 2H, silu(gate) H, the down projection's input H) or GELU 2H
#   per sublayer: u and RMSNorm(u), 2C (for plain, u is the stream x itself)
#   mHC, per sublayer: x_k nC and the output y_k C, kept for the post/res backward
# Recomputation (dualpipe_mhc.recompute) drops x_k, u and RMSNorm(u), keeps y_k and each block's
# input, and rebuilds them during B: the x_k chain still ahead of the backward (at most 2 L_r - 1)
# plus one sublayer's u and RMSNorm(u).


def _f_internal_elements(shape: ModelShape) -> int:
    return 7 * shape.width + (4 if shape.mlp == "swiglu" else 2) * shape.hidden


def stage_kept_bytes(shape: ModelShape, first_layer: int, count: int, block_layers: int | None = None) -> float:
    """Bytes a stage of ``count`` layers (from global layer ``first_layer``) keeps per micro-batch, F to B."""
    c, n = shape.width, shape.n
    per_layer = _f_internal_elements(shape)
    if shape.residual == "plain":
        per_layer += 2 * 2 * c
        inputs = 0
    elif block_layers:
        per_layer += 2 * c  # y_k
        inputs = n * c * kept_block_inputs(first_layer, count, block_layers)
    else:
        per_layer += 2 * (n + 3) * c
        inputs = 0
    return float(shape.bytes_per_elem * shape.tokens * (per_layer * count + inputs))


def backward_transient_bytes(shape: ModelShape, count: int, block_layers: int | None = None) -> float:
    """Bytes a stage's B needs on top of what F kept, parameter gradients excluded (they are state):
    the MLP backward's gradient buffers, 2H + C (SwiGLU, measured: 0.31 GiB at the paper-27b layer,
    plain and mHC alike; GELU's H + C is by analogy, not measured), and with recomputation the x_k
    chain still ahead of the backward and one sublayer's u_k and RMSNorm(u_k)."""
    c, n = shape.width, shape.n
    el = (2 if shape.mlp == "swiglu" else 1) * shape.hidden + c
    if shape.residual != "plain" and block_layers:
        el += (min(2 * block_layers, 2 * count) - 1) * n * c + 2 * c
    return float(shape.bytes_per_elem * shape.tokens * el)


def recompute_bytes(shape: ModelShape, first_layer: int, count: int, block_layers: int) -> float:
    """HBM bytes one backward pass of a stage moves rebuilding its blocks: per sublayer the aggregate
    (read nC, write C) and the pre-norm (read C, write C), and per sublayer but a block's last the
    post/res forward (read nC + C, write nC)."""
    c, n = shape.width, shape.n
    sublayers = 2 * count
    pieces = kept_block_inputs(first_layer, count, block_layers)
    el = sublayers * ((n + 1) * c + 2 * c) + (sublayers - pieces) * (2 * n + 1) * c
    return float(shape.bytes_per_elem * shape.tokens * el)


@dataclass(frozen=True)
class LayerCost:
    """One layer, one micro-batch: seconds and bytes."""

    f: float
    b: float
    w: float


def layer_cost(shape: ModelShape, hw: Hardware, traffic: MhcTraffic, bwd_traffic: float = 2.0) -> LayerCost:
    t, c, h, s, n, b = shape.tokens, shape.width, shape.hidden, shape.seq_len, shape.n, shape.bytes_per_elem
    h_up = 2 * h if shape.mlp == "swiglu" else h
    gemm = 2.0 * t * (4 * c * c + c * h_up + h * c)
    attn = 2.0 * t * s * c
    act_el = 8 * c + (3 * h if shape.mlp == "swiglu" else 2 * h)
    base_bytes = b * t * act_el
    if shape.residual == "plain":
        mhc_gemm, mhc_bytes, resid_bytes = 0.0, 0.0, b * t * 2 * 3 * c
    else:
        mhc_gemm = 2 * (2.0 * t * n * c * (n * n + 2 * n) + 2.0 * t * n * n * c + 4.0 * t * n * c)
        mhc_bytes = b * t * 2 * traffic.elements(n) * c
        resid_bytes = mhc_bytes
    fwd_bytes = base_bytes + resid_bytes
    return LayerCost(
        f=(gemm + attn + mhc_gemm) / hw.flops + fwd_bytes / hw.hbm,
        b=(gemm + 2 * attn + mhc_gemm) / hw.flops + bwd_traffic * fwd_bytes / hw.hbm,
        w=gemm / hw.flops,
    )


def analytic_costs(
    shape: ModelShape,
    hw: Hardware,
    num_stages: int,
    traffic: str | MhcTraffic = "fused",
    recompute_block: int | None = None,
    include_head: bool = True,
    bwd_traffic: float = 2.0,
) -> Costs:
    """Per-stage costs (link left unlimited: see :meth:`Costs.with_link`).

    ``recompute_block``: L_r, recompute mHC intermediates in blocks of that many layers.
    """
    if isinstance(traffic, str):
        if traffic not in TRAFFIC:
            raise ValueError(f"mHC traffic model {traffic!r} is unknown; use one of {sorted(TRAFFIC)}")
        traffic = TRAFFIC[traffic]
    layer = layer_cost(shape, hw, traffic, bwd_traffic)
    t, c, v, n, b = shape.tokens, shape.width, shape.vocab, shape.n, shape.bytes_per_elem
    f, bb, w, act, mem, rec = [], [], [], [], [], []
    first_layer = 0
    for s, count in enumerate(shape_stage_layers(shape, num_stages)):
        sf, sb, sw = layer.f * count, layer.b * count, layer.w * count
        block = recompute_block if shape.residual != "plain" else None
        smem = stage_kept_bytes(shape, first_layer, count, block)
        srec = recompute_bytes(shape, first_layer, count, block) / hw.hbm if block else 0.0
        first_layer += count
        if s == 0:  # embedding gather and the copy to n streams
            sf += b * t * c * (1 + n) / hw.hbm
            sb += b * t * c * (1 + n) / hw.hbm
            sw += 2 * b * t * c / hw.hbm
        if s == num_stages - 1 and include_head:  # stream reduce, LM head, cross-entropy on fp32 logits
            head = 2.0 * t * c * v / hw.flops
            sf += head + (b * t * n * c + 4 * t * v * 2) / hw.hbm
            sb += head + (b * t * n * c + 4 * t * v * 2) / hw.hbm
            sw += head
            smem += 4 * t * v
        f.append(sf)
        bb.append(sb + srec)
        w.append(sw)
        rec.append(srec)
        mem.append(smem)
        act.append(0.0 if s == num_stages - 1 else float(b * t * n * c))
    return Costs(f, bb, w, act, mem, rec, meta={"source": "analytic", "traffic": traffic.name, "streams": n})


def shape_from_model(m, tokens: int | None = None, bytes_per_elem: int = 2) -> ModelShape:
    """The shape of a ModelConfig (duck-typed), ``tokens`` per micro-batch (default one sequence)."""
    return ModelShape(
        layers=m.layers, width=m.width, hidden=m.hidden, seq_len=m.seq_len, vocab=m.vocab_size,
        tokens=m.seq_len if tokens is None else tokens, streams=m.streams, residual=m.residual, mlp=m.mlp,
        bytes_per_elem=bytes_per_elem, split=getattr(m, "split", "balanced"),
    )


def model_stage_layers(m, num_stages: int) -> list[int]:
    """Layers per stage of a ModelConfig: the split the model, the runtime and the simulator share."""
    return shape_stage_layers(shape_from_model(m), num_stages)


def shape_from_config(cfg, streams: int | None = None) -> ModelShape:
    """The model shape of a RunConfig (duck-typed: the scheduler does not import the config module).
    ``streams=1`` means the plain-residual baseline of the same model."""
    m = cfg.model
    n = m.streams if streams is None else streams
    residual = "plain" if n == 1 else (m.residual if m.residual != "plain" else "mhc")
    return replace(
        shape_from_model(m, cfg.tokens_per_microbatch(), 2 if cfg.run.dtype == "bfloat16" else 4),
        streams=n, residual=residual,
    )


def costs_from_config(
    cfg, num_stages: int, streams: int | None = None, traffic: str = "fused", recompute_block: int | None = None
) -> Costs:
    """Analytic costs for ``cfg`` cut into ``num_stages``, with the config's link.

    ``recompute_block``: the L_r the run uses, resolved once by the caller
    (:func:`dualpipe_mhc.scheduler.planner.resolve_block_layers`); None: no recomputation."""
    calibration = getattr(cfg.hardware, "calibration", None)
    if calibration is not None:  # fitted to a device by profile-stages: measured per-part efficiencies
        from .calibrate import calibrated_costs, read_calibration

        cal = read_calibration(calibration)
        costs = calibrated_costs(shape_from_config(cfg, streams), cal, num_stages, traffic, recompute_block)
        return costs.with_link(cfg.link.bandwidth, cfg.link.latency)
    hw = Hardware(cfg.hardware.flops, cfg.hardware.bandwidth)
    costs = analytic_costs(shape_from_config(cfg, streams), hw, num_stages, traffic, recompute_block)
    return costs.with_link(cfg.link.bandwidth, cfg.link.latency)
