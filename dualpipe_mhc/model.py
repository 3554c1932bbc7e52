"""The n-stream decoder-only LM and its split into pipeline stage chunks.

    tokens [B, S] -> embed [B, S, C] -> widen (copy) [B, S, n, C]
      -> L x (attention sublayer, MLP sublayer), each wrapped by a HyperConnection
      -> reduce (mean over streams; dsv4: the learned HyperHead) [B, S, C] -> RMSNorm -> head [B, S, V] -> loss

A stage chunk is a contiguous slice of that: the first takes tokens, the last
returns the loss, the rest map ``[B, S, n, C] -> [B, S, n, C]``. Layers per stage
come from :func:`dualpipe_mhc.scheduler.analytic.model_stage_layers` (``model.split``),
the split the simulator prices. :meth:`MhcLM.stage_chunks` shares the whole model's
parameter objects; :func:`build_stage` builds one chunk alone (on the meta device, then
materialised), equal bit for bit to the same slice of :func:`build_model`'s model,
because every parameter is drawn from its own generator seeded by (run seed, global
parameter name), not from one stream whose position depends on what came before.

Recomputation (``recompute_layers = L_r``, see :mod:`dualpipe_mhc.recompute`): the
layers run in global blocks ``layer // L_r`` cut at chunk boundaries; each block
keeps only its input streams and re-derives the mHC intermediates in the backward.
The numbers are unchanged, only what is held between forward and backward.
"""

from __future__ import annotations

import functools
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .mhc import ALPHA_INIT, RES_INIT, HyperConnection, HyperHead
from .recompute import check_block_layers, run_blocks
from .scheduler.analytic import model_stage_layers
from .scheduler.split import stage_ranges


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: Tensor) -> Tensor:
        # torch's fused kernel on CUDA (fp32 inside): one pass, where the spelled-out norm took six
        # and kept fp32 copies for the backward (H200, paper-27b layer: 90.7 -> 85.1 ms fwd+bwd for
        # 4 plain layers, benchmarks/results/recompute_*.md)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rotary_table(s: int, d: int, base: float, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(cos, sin) ``[S, D/2]`` of the angles ``pos * base^(-2i/D)``, formed in float64, then cast to ``dtype``."""
    inv = 1.0 / (base ** (torch.arange(0, d, 2, device=device, dtype=torch.float64) / d))
    angles = torch.arange(s, device=device, dtype=torch.float64)[:, None] * inv[None, :]  # [S, D/2]
    return angles.cos().to(dtype), angles.sin().to(dtype)


@functools.lru_cache(maxsize=64)
def _cached_rotary_table(
    s: int, d: int, base: float, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    # Built outside inference mode and the graph: the tables are reused by every later forward and backward.
    with torch.inference_mode(False), torch.no_grad():
        return rotary_table(s, d, base, device, dtype)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, inverse: bool = False) -> Tensor:
    """Pairs (x_2i, x_2i+1) of ``x [..., S, D]`` rotated by the angles of ``cos``/``sin [S, D/2]``
    (``inverse``: by their negatives), in x's dtype.

    Each product and sum is rounded as ``x1 * cos - x2 * sin`` and ``x1 * sin + x2 * cos`` round
    it (so the result equals that formula's bit for bit), in 5 kernels instead of 7 and without
    the stack's copy; the products are not fused (an FMA or an fp32 complex product rounds once
    and gives other bf16 values).
    """
    pairs = x.unflatten(-1, (-1, 2))  # [..., S, D/2, 2]
    out = pairs * cos.unsqueeze(-1)
    even, odd = out[..., 0], out[..., 1]
    (even.add_ if inverse else even.sub_)(pairs[..., 1] * sin)
    (odd.sub_ if inverse else odd.add_)(pairs[..., 0] * sin)
    return out.flatten(-2)


class _Rotary(torch.autograd.Function):
    """The rotation with its backward written out: the inverse rotation of the gradient,
    rounded as autograd of the spelled-out formula rounds it, without its strided-slice scatter."""

    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        ctx.cos, ctx.sin = cos, sin  # constants, not inputs that need a version check
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        return _rotate(grad, ctx.cos, ctx.sin, inverse=True), None, None


def rotary(x: Tensor, base: float = 10000.0) -> Tensor:
    """Rotary position embedding over the sequence dim of ``x [B, H, S, D]``, interleaved pairs
    (0, 1), (2, 3), ...; the cos/sin tables are built once per (S, D, base, device, dtype)."""
    s, d = x.shape[-2], x.shape[-1]
    if torch.compiler.is_compiling():  # in a graph: traced inline (dynamo does not keep an lru_cache)
        cos, sin = rotary_table(s, d, base, x.device, x.dtype)
    else:
        cos, sin = _cached_rotary_table(s, d, base, x.device, x.dtype)
    return _Rotary.apply(x, cos, sin)


class Attention(nn.Module):
    """Pre-norm causal self-attention: ``[B, S, C] -> [B, S, C]``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = RMSNorm(width)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.out = nn.Linear(width, width, bias=False)

    def forward(self, u: Tensor) -> Tensor:
        b, s, c = u.shape
        q, k, v = self.qkv(self.norm(u)).view(b, s, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(rotary(q), rotary(k), v, is_causal=True)  # [B, H, S, D]
        return self.out(o.transpose(1, 2).reshape(b, s, c))


class Mlp(nn.Module):
    """Pre-norm MLP, GELU or SwiGLU: ``[B, S, C] -> [B, S, C]``."""

    def __init__(self, width: int, hidden: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.norm = RMSNorm(width)
        self.up = nn.Linear(width, hidden * (2 if kind == "swiglu" else 1), bias=False)
        self.down = nn.Linear(hidden, width, bias=False)

    def forward(self, u: Tensor) -> Tensor:
        h = self.up(self.norm(u))
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        return self.down(h)


class Block(nn.Module):
    """One transformer layer: two hyper-connected sublayers, ``[B, S, n, C] -> [B, S, n, C]``."""

    def __init__(self, cfg: ModelConfig, kernels: str = "auto") -> None:
        super().__init__()
        wrap = dict(
            width=cfg.width, streams=cfg.streams, kind=cfg.residual, sinkhorn_iters=cfg.sinkhorn_iters, kernels=kernels
        )
        self.attn = HyperConnection(Attention(cfg.width, cfg.heads), **wrap)
        self.mlp = HyperConnection(Mlp(cfg.width, cfg.hidden, cfg.mlp), **wrap)

    def forward(self, x: Tensor, then: Block | None = None) -> Tensor:
        """``then``: the layer the output feeds next in this stage, which the mHC ops may fuse across."""
        return self.mlp(self.attn(x, then=self.mlp), then=None if then is None else then.attn)


class Embed(nn.Module):
    """tokens ``[B, S]`` -> widened streams ``[B, S, n, C]`` (the embedding copied to every stream)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.streams = cfg.streams
        self.tok = nn.Embedding(cfg.vocab_size, cfg.width)

    def forward(self, tokens: Tensor) -> Tensor:
        e = self.tok(tokens)
        return e.unsqueeze(-2).expand(*e.shape[:-1], self.streams, e.shape[-1]).contiguous()


class Head(nn.Module):
    """streams ``[B, S, n, C]`` -> reduce -> RMSNorm -> logits ``[B, S, V]``.

    The reduction is the mean over streams, or for ``residual = "dsv4"`` DeepSeek-V4's learned
    :class:`~dualpipe_mhc.mhc.HyperHead` (``reduce``).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.reduce = HyperHead(cfg.width, cfg.streams) if cfg.residual == "dsv4" else None
        self.norm = RMSNorm(cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.vocab_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        reduced = x.mean(dim=-2) if self.reduce is None else self.reduce(x)
        return self.proj(self.norm(reduced))


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy over every position of the micro-batch."""
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten())


class StageChunk(nn.Module):
    """A contiguous slice of the model, the unit the pipeline places on a rank.

    ``forward(x, targets=None)``: ``x`` is tokens ``[B, S]`` if ``is_first`` else
    streams ``[B, S, n, C]``; returns the scalar loss if ``is_last`` (``targets``
    required) else streams ``[B, S, n, C]``.
    """

    def __init__(
        self,
        embed: Embed | None,
        blocks: list[Block],
        head: Head | None,
        layer_range: tuple[int, int],
        recompute_layers: int | None = None,
        recompute_replay_once: bool = False,
    ) -> None:
        super().__init__()
        self.embed = embed
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.layer_range = layer_range
        self.recompute_layers = check_block_layers(recompute_layers)
        self.recompute_replay_once = recompute_replay_once

    @property
    def is_first(self) -> bool:
        return self.embed is not None

    @property
    def is_last(self) -> bool:
        return self.head is not None

    def forward(self, x: Tensor, targets: Tensor | None = None) -> Tensor:
        if self.embed is not None:
            x = self.embed(x)
        x = run_blocks(self.blocks, x, self.layer_range[0], self.recompute_layers, self.recompute_replay_once)
        if self.head is None:
            return x
        if targets is None:
            raise ValueError("the last stage chunk needs targets to compute the loss")
        return lm_loss(self.head(x), targets)


def stage_layer_ranges(cfg: ModelConfig, stages: int) -> list[tuple[int, int]]:
    """Contiguous global ``[start, end)`` layer ranges of the ``stages`` chunks (``cfg.split``)."""
    return stage_ranges(model_stage_layers(cfg, stages))


class MhcLM(nn.Module):
    """The whole model: ``forward(tokens [B, S], targets [B, S]) -> loss``.

    Constructed with uninitialised values (build it on the meta device); :func:`build_model`
    draws the parameters. ``recompute_layers``: L_r for mHC recomputation, ``None`` for none; set it with
    :meth:`enable_recompute` (stage chunks built afterwards inherit it).
    """

    def __init__(self, cfg: ModelConfig, kernels: str = "auto") -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = Embed(cfg)
        self.blocks = nn.ModuleList(Block(cfg, kernels) for _ in range(cfg.layers))
        self.head = Head(cfg)
        self.recompute_layers: int | None = None
        self.recompute_replay_once = False

    def forward(self, tokens: Tensor, targets: Tensor) -> Tensor:
        x = run_blocks(self.blocks, self.embed(tokens), 0, self.recompute_layers, self.recompute_replay_once)
        return lm_loss(self.head(x), targets)

    def enable_recompute(self, block_layers: int | None, replay_once: bool = False) -> MhcLM:
        """Recompute the mHC intermediates in blocks of ``block_layers`` layers (``None``: off).

        ``replay_once``: one replay per block even under a split B/W backward (see
        :func:`dualpipe_mhc.recompute.run_blocks`); default: release as consumed, replay in W again.
        """
        self.recompute_layers = check_block_layers(block_layers)
        self.recompute_replay_once = bool(replay_once)
        return self

    def stage_chunks(self, stages: int) -> list[StageChunk]:
        """Split into ``stages`` contiguous chunks sharing this model's parameters (and recompute setting)."""
        ranges = stage_layer_ranges(self.cfg, stages)
        return [
            StageChunk(
                self.embed if s == 0 else None,
                list(self.blocks[a:b]),
                self.head if s == stages - 1 else None,
                (a, b),
                self.recompute_layers,
                self.recompute_replay_once,
            )
            for s, (a, b) in enumerate(ranges)
        ]

    def hyper_connections(self) -> list[HyperConnection]:
        """Every wrapped sublayer in depth order (attention, MLP, attention, ...)."""
        return [hc for block in self.blocks for hc in (block.attn, block.mlp)]


def build_model(
    cfg: ModelConfig,
    seed: int = 0,
    kernels: str = "auto",
    dtype: torch.dtype = torch.float32,
    *,
    recompute_layers: int | None = None,
    device: torch.device | str = "cpu",
) -> MhcLM:
    """The model for ``cfg`` with parameters drawn from ``seed``: the same seed gives the same weights everywhere.

    ``recompute_layers``: L_r for mHC recomputation (``None``: off); resolve a config's
    ``recompute.block_layers='auto'`` with the planner before passing it here.
    """
    with torch.device("meta"):
        model = MhcLM(cfg, kernels)
    _materialise(model, seed, dtype, device, first_layer=0)
    return model.enable_recompute(recompute_layers)


def build_stage(
    cfg: ModelConfig,
    stage: int,
    stages: int,
    seed: int = 0,
    kernels: str = "auto",
    dtype: torch.dtype = torch.float32,
    *,
    recompute_layers: int | None = None,
    recompute_replay_once: bool = False,
    device: torch.device | str = "cpu",
) -> StageChunk:
    """Stage ``stage`` of ``stages`` alone, on ``device``: equal to ``build_model(...).stage_chunks(stages)[stage]``
    without ever holding another stage's parameters (a 27B-class model's rank builds in its own share)."""
    if not 0 <= stage < stages:
        raise ValueError(f"stage {stage} is not in 0..{stages - 1}")
    a, b = stage_layer_ranges(cfg, stages)[stage]
    with torch.device("meta"):
        chunk = StageChunk(
            Embed(cfg) if stage == 0 else None,
            [Block(cfg, kernels) for _ in range(a, b)],
            Head(cfg) if stage == stages - 1 else None,
            (a, b),
            recompute_layers,
            recompute_replay_once,
        )
    _materialise(chunk, seed, dtype, device, first_layer=a)
    return chunk


# Random draws happen on the CPU, so a seed gives the same weights on every device (CUDA's
# generator depends on the launch grid, hence on the GPU model), in float32 blocks of at most
# this many elements (a 129k-vocabulary head in bf16 never has its float32 copy whole), several
# parameters at once: each has its own generator, so the order of the threads changes nothing.
DRAW_BLOCK = 1 << 24
DRAW_THREADS = 8


def parameter_seed(seed: int, name: str) -> int:
    """The generator seed of one parameter: a stable hash of (run seed, global parameter name)."""
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _materialise(module: nn.Module, seed: int, dtype: torch.dtype, device: torch.device | str, first_layer: int) -> None:
    """Allocate ``module``'s meta parameters on ``device`` in ``dtype`` and draw each one.

    Parameter names are made global (a chunk's ``blocks.j`` is layer ``first_layer + j``), so
    a parameter's value depends only on the seed and where it sits in the whole model.
    """
    module.to(dtype).to_empty(device=torch.device(device))
    draws: list[tuple[Tensor, float, int]] = []  # (parameter, std, seed)
    filled: list[Tensor] = []
    with torch.no_grad():
        for mod_name, mod in module.named_modules():
            prefix = _global_name(mod_name, first_layer)
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                draws.append((mod.weight, 0.02, parameter_seed(seed, f"{prefix}.weight")))
            elif isinstance(mod, RMSNorm):
                filled.append(mod.weight.fill_(1.0))
            elif isinstance(mod, HyperConnection) and mod.kind != "plain":
                n, c = mod.streams, mod.width
                draws.append((mod.phi, (n * c) ** -0.5, parameter_seed(seed, f"{prefix}.phi")))
                filled.append(mod.alpha.fill_(ALPHA_INIT))
                filled.append(mod.bias.copy_(HyperConnection.initial_bias(n, mod.kind, RES_INIT)))
            elif isinstance(mod, HyperHead):
                n, c = mod.streams, mod.width
                draws.append((mod.phi, (n * c) ** -0.5, parameter_seed(seed, f"{prefix}.phi")))
                filled.append(mod.scale.fill_(ALPHA_INIT))
                filled.append(mod.base.copy_(HyperHead.initial_base(n)))
    workers = max(1, min(DRAW_THREADS, os.cpu_count() or 1, len(draws)))
    with ThreadPoolExecutor(workers) as pool:  # torch's CPU generator releases the GIL
        list(pool.map(lambda d: _normal_(*d), draws))
    # to_empty leaves uninitialised memory: every parameter must have had a rule above
    done = {id(t) for t in filled} | {id(d[0]) for d in draws}
    leftovers = [name for name, p in module.named_parameters() if id(p) not in done]
    if leftovers:
        raise RuntimeError(f"no initialisation rule for {leftovers}")


def _global_name(local: str, first_layer: int) -> str:
    parts = local.split(".")
    if len(parts) > 1 and parts[0] == "blocks":
        parts[1] = str(first_layer + int(parts[1]))
    return ".".join(parts)


def _normal_(param: Tensor, std: float, seed: int) -> None:
    """Fill ``param`` with N(0, std²) drawn in float32 on the CPU from its own generator, block by block."""
    gen = torch.Generator().manual_seed(seed)
    flat = param.detach().view(-1)
    buf = torch.empty(min(DRAW_BLOCK, flat.numel()), dtype=torch.float32)
    with torch.no_grad():
        for start in range(0, flat.numel(), DRAW_BLOCK):
            block = flat[start : start + DRAW_BLOCK]
            draw = buf[: block.numel()]
            torch.randn(block.numel(), generator=gen, out=draw)
            block.copy_(draw.mul_(std))
