"""Fused Triton mHC kernels against the float64 reference, forward and every gradient.

CPU tests run the kernels in Triton's interpreter at small shapes; GPU tests
(``-m gpu``, skipped without CUDA) compile them and run the full grid.

Triton reads ``TRITON_INTERPRET`` when a function is decorated and again inside
every ``tl`` call, so whatever another test module imported first, the
``fused_cpu`` fixture sets it and re-imports the kernels in interpreter mode
(see :class:`_KernelMode`); the original mode comes back when this file is done.

Error measure: ‖out − ref‖ / ‖ref‖ per output and per gradient, the reference
run in float64 on the same (dtype-rounded) inputs. Tolerances, per stream dtype:
    float32: 1e-4  (kernels accumulate in fp32; dots use 3-pass tf32 on the GPU)
    bfloat16: 1e-2 forward, 2e-2 backward  (outputs rounded to bf16, 2^-9 per element)
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

import pytest
import torch

from dualpipe_mhc.kernels import reference as ref
from dualpipe_mhc.kernels.settings import launch_settings

ROOT = Path(__file__).resolve().parents[1]


def _load_candidates():
    """benchmarks/kernel_candidates.py (plain dicts): what the sweep may pick, for the GPU tests' parameters."""
    spec = importlib.util.spec_from_file_location("kernel_candidates", ROOT / "benchmarks" / "kernel_candidates.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


KERNEL_CANDIDATES = _load_candidates()

TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (1e-2, 2e-2)}  # (forward, backward)
ITERS = 20


def _interpreted(fn) -> bool:
    return type(fn).__name__ == "InterpretedFunction"


class _KernelMode:
    """Switches the fused kernels (and Triton's own ``@jit`` library functions) between interpreter and compiler.

    Triton decides at decoration time: modules decorated while ``TRITON_INTERPRET`` was
    unset hold compiled-mode functions, which the interpreter cannot call. So switching
    re-imports our kernel modules and, when Triton itself was imported first in compiled
    mode, ``triton.language.standard`` (tl.sum, tl.max, tl.zeros, ...), whose originals
    are put back by :meth:`restore`.
    """

    def __init__(self) -> None:
        import triton.language as tl

        self.tl = tl
        self.env = os.environ.get("TRITON_INTERPRET")
        self.saved: list[tuple[object, dict]] | None = None  # (namespace, its original attributes)

    def set(self, interpret: bool):
        import dualpipe_mhc.kernels.fused as fused

        tl = self.tl
        if interpret:
            os.environ["TRITON_INTERPRET"] = "1"
            if not _interpreted(tl.standard.sum) and self.saved is None:
                self.saved = [(ns, dict(vars(ns))) for ns in (tl.standard, tl, tl.tensor)]
                old = self.saved[0][1]
                importlib.reload(tl.standard)  # re-registers the tensor member functions too
                for name, value in list(vars(tl).items()):
                    if name in old and value is old[name]:
                        setattr(tl, name, getattr(tl.standard, name))
        else:
            self._restore_library()
            os.environ.pop("TRITON_INTERPRET", None)
        if _interpreted(fused._pre_fwd_kernel) != interpret:
            from dualpipe_mhc.kernels import mhc_chain, mhc_post, mhc_pre, mhc_pre_bwd, mhc_pre_common, sinkhorn

            # dependencies first: each module binds the jit functions of those it imports
            for module in (sinkhorn, mhc_pre_common, mhc_pre_bwd, mhc_pre, mhc_post, mhc_chain, fused):
                importlib.reload(module)
        return fused

    def _restore_library(self) -> None:
        if self.saved is not None:
            for ns, attrs in self.saved:
                for name, value in attrs.items():
                    if not name.startswith("__"):
                        setattr(ns, name, value)
            self.saved = None

    def restore(self, interpret: bool) -> None:
        self.set(interpret)
        self._restore_library()
        if self.env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = self.env


@pytest.fixture(scope="module")
def _kernel_mode():
    import dualpipe_mhc.kernels.fused as fused

    was_interpreted = _interpreted(fused._pre_fwd_kernel)
    mode = _KernelMode()
    yield mode
    mode.restore(was_interpreted)


@pytest.fixture
def fused_cpu(_kernel_mode):
    return _kernel_mode.set(True)


@pytest.fixture
def fused_gpu(_kernel_mode):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return _kernel_mode.set(False)


def rel_err(out: torch.Tensor, want: torch.Tensor) -> float:
    out, want = out.double(), want.double()
    assert torch.isfinite(out).all(), "non-finite values in the kernel's output"
    return ((out - want).norm() / want.norm().clamp_min(1e-30)).item()


def make_inputs(t: int, n: int, c: int, dtype: torch.dtype, device: str, lead: tuple[int, ...] = ()):
    """Random x, phi, alpha, bias: alpha large enough that every mapping depends on x."""
    m = 2 * n + n * n
    shape = (*lead, t, n, c) if lead else (t, n, c)
    x = torch.randn(shape, device=device).to(dtype)
    phi = torch.randn(n * c, m, device=device) / (n * c) ** 0.5
    alpha = torch.tensor([0.8, 0.6, 1.5], device=device)
    bias = torch.randn(m, device=device)
    bias[2 * n :] += 3.0 * torch.eye(n, device=device).flatten()  # H_res near identity, as initialised
    return x, phi, alpha, bias


def leaves(*tensors, double: bool = False):
    return [(t.detach().double() if double else t.detach().clone()).requires_grad_() for t in tensors]


def sublayer(u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A stand-in F, elementwise, computed in at least fp32 and returned in u's dtype."""
    return (torch.tanh(u.to(torch.promote_types(u.dtype, torch.float32)) * w) * 1.5).to(u.dtype)


def _poison_cuda_cache(device: str) -> None:
    # Freed NaN blocks are what the caching allocator hands out next: an output element
    # the kernels never write then shows up as NaN.
    if device == "cuda":
        torch.empty(64 << 20, device=device).fill_(float("nan"))


def check_layer(
    fused, t: int, n: int, c: int, dtype: torch.dtype, device: str, lead=(), kind: str = "mhc"
) -> dict[str, float]:
    """One hyper-connected sublayer, pre -> F -> post_res, fused vs reference: outputs and all gradients."""
    x, phi, alpha, bias = make_inputs(t, n, c, dtype, device, lead)
    w = torch.randn(c, device=device)
    cot = torch.randn((*x.shape,), device=device)
    xs, ps, als, bs = leaves(x, phi, alpha, bias)
    _poison_cuda_cache(device)
    u, h_post, h_res = fused.mhc_pre(xs, ps, als, bs, ITERS, kind)
    out = fused.post_res(xs, sublayer(u, w), h_post, h_res)
    (out.float() * cot).sum().backward()

    # The reference rounds to the stream dtype where the fused path stores a stream tensor
    # (u, y, x_next; their gradients round too), so the comparison measures the kernels,
    # not bf16 storage of the stand-in sublayer's activations.
    stored = lambda t: t.to(dtype).double()  # noqa: E731
    xd, pd, ad, bd = leaves(x, phi, alpha, bias, double=True)
    u_r, h_post_r, h_res_r = ref.mhc_pre(xd, pd, ad, bd, ITERS, kind)
    out_r = stored(ref.post_res(xd, stored(sublayer(stored(u_r), w.double())), h_post_r, h_res_r))
    (out_r * cot.double()).sum().backward()
    return {
        "u": rel_err(u, u_r), "h_post": rel_err(h_post, h_post_r), "h_res": rel_err(h_res, h_res_r),
        "x_next": rel_err(out, out_r),
        "dx": rel_err(xs.grad, xd.grad), "dphi": rel_err(ps.grad, pd.grad),
        "dalpha": rel_err(als.grad, ad.grad), "dbias": rel_err(bs.grad, bd.grad),
    }  # fmt: skip


def assert_close(errs: dict[str, float], dtype: torch.dtype) -> None:
    fwd, bwd = TOL[dtype]
    bad = {k: v for k, v in errs.items() if not v <= (bwd if k.startswith("d") else fwd)}
    assert not bad, f"{dtype} errors over tolerance (fwd {fwd}, bwd {bwd}): {bad}; all: {errs}"


def check_pre_alone(fused, t, n, c, dtype, device, iters=ITERS, kind="mhc", res_scale=1.0) -> dict[str, float]:
    """mhc_pre with independent random cotangents on u, h_post and h_res (no post/res link).
    ``res_scale`` multiplies alpha_res: wide H_res logits."""
    x, phi, alpha, bias = make_inputs(t, n, c, dtype, device)
    alpha[2] *= res_scale
    cu = torch.randn(t, c, device=device)
    cp, cr = torch.randn(t, n, device=device), torch.randn(t, n, n, device=device)
    xs, ps, als, bs = leaves(x, phi, alpha, bias)
    u, h_post, h_res = fused.mhc_pre(xs, ps, als, bs, iters, kind)
    ((u.float() * cu).sum() + (h_post * cp).sum() + (h_res * cr).sum()).backward()
    xd, pd, ad, bd = leaves(x, phi, alpha, bias, double=True)
    u_r, h_post_r, h_res_r = ref.mhc_pre(xd, pd, ad, bd, iters, kind)
    # the fused path's du is cu rounded to u's dtype (autograd casts the cotangent): the reference
    # takes the same du, so the comparison measures the kernels, not bf16 storage of the cotangent
    du = cu.to(dtype).double()
    ((u_r * du).sum() + (h_post_r * cp.double()).sum() + (h_res_r * cr.double()).sum()).backward()
    return {
        "u": rel_err(u, u_r), "h_post": rel_err(h_post, h_post_r), "h_res": rel_err(h_res, h_res_r),
        "dx": rel_err(xs.grad, xd.grad), "dphi": rel_err(ps.grad, pd.grad),
        "dalpha": rel_err(als.grad, ad.grad), "dbias": rel_err(bs.grad, bd.grad),
    }  # fmt: skip


def check_post_alone(fused, t, n, c, dtype, device) -> dict[str, float]:
    """post_res on its own, with arbitrary (not doubly stochastic) mappings."""
    x = torch.randn(t, n, c, device=device).to(dtype)
    y = torch.randn(t, c, device=device).to(dtype)
    h_post, h_res = torch.rand(t, n, device=device) * 2, torch.randn(t, n, n, device=device)
    cot = torch.randn(t, n, c, device=device)
    args = leaves(x, y, h_post, h_res)
    _poison_cuda_cache(device)
    out = fused.post_res(*args)
    (out.float() * cot).sum().backward()
    args_r = leaves(x, y, h_post, h_res, double=True)
    out_r = ref.post_res(*args_r)
    (out_r * cot.double()).sum().backward()
    errs = {"x_next": rel_err(out, out_r)}
    for name, a, b in zip(("dx", "dy", "dh_post", "dh_res"), args, args_r):
        errs[name] = rel_err(a.grad, b.grad)
    return errs


# --- CPU, Triton interpreter: small shapes, every n, both dtypes, awkward T and C ---

CPU_SHAPES = [(1, 64), (19, 200), (37, 96)]  # (T, C): T = 1, T past one block, C not a power of two


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
@pytest.mark.parametrize("t,c", CPU_SHAPES)
def test_layer_matches_reference_cpu(fused_cpu, t, c, n, dtype):
    torch.manual_seed(1000 * n + t + c)
    assert_close(check_layer(fused_cpu, t, n, c, dtype, "cpu"), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n", [1, 4])
def test_pre_alone_cpu(fused_cpu, n, dtype):
    torch.manual_seed(7 + n)
    assert_close(check_pre_alone(fused_cpu, 21, n, 160, dtype, "cpu"), dtype)


def test_fused_aggregate_variant_cpu(fused_cpu):
    """The single-kernel forward (u computed in the mapping kernel) equals the two-kernel one."""
    from dualpipe_mhc.kernels import mhc_pre

    torch.manual_seed(4)
    x, phi, alpha, bias = make_inputs(19, 4, 200, torch.bfloat16, "cpu")
    one = mhc_pre.pre_forward(x, phi, alpha, bias, ITERS, ref.RMS_EPS, fuse_aggregate=True)
    two = mhc_pre.pre_forward(x, phi, alpha, bias, ITERS, ref.RMS_EPS, fuse_aggregate=False, split=False)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_fused_dphi_variant_cpu(fused_cpu):
    """dphi accumulated in the dx kernel equals the separate dphi GEMM kernel."""
    from dualpipe_mhc.kernels import mhc_pre

    torch.manual_seed(8)
    t, n, c = 45, 4, 200
    x, phi, alpha, bias = make_inputs(t, n, c, torch.bfloat16, "cpu")
    _, h_pre, _, _, proj, rstd = mhc_pre.pre_forward(x, phi, alpha, bias, ITERS, ref.RMS_EPS)
    du = torch.randn(t, c).to(torch.bfloat16)
    _, _, draw, coef = mhc_pre.pre_backward_reduce(
        x, alpha, bias, proj, rstd, du, torch.randn(t, n), torch.randn(t, n, n), ITERS
    )
    want = x.reshape(t, -1).double().T @ draw.double()
    dxs = []
    # fp32 dots (the interpreter's tf32) to ~1e-7; the bf16 hi + lo pair of draw to ~2^-17 per product
    lo = launch_settings(x.device, x.dtype, n, c, {"apply_dphi_lo": True})
    for bf16, tol in ((False, 1e-5), (True, 1e-4)):
        for fuse in (True, False):
            dx, dphi = mhc_pre.pre_backward_apply(
                x, phi, h_pre, du, draw, coef, fuse_dphi=fuse, dphi_bf16=bf16, settings=lo
            )
            assert rel_err(dphi, want) < tol, (bf16, fuse)
            dxs.append(dx)
    assert all(torch.equal(dx, dxs[0]) for dx in dxs)
    # draw rounded to bf16 (one dot, apply_dphi_lo=False, the default): bf16 rounding, ~2^-9 an element
    hi_only = launch_settings(x.device, x.dtype, n, c, {"apply_dphi_lo": False})
    for fuse in (True, False):
        dx, dphi = mhc_pre.pre_backward_apply(
            x, phi, h_pre, du, draw, coef, fuse_dphi=fuse, dphi_bf16=True, settings=hi_only
        )
        assert 1e-5 < rel_err(dphi, want) < 5e-3, fuse
        assert torch.equal(dx, dxs[0])


@pytest.mark.parametrize("n, dtype", [(4, torch.bfloat16), (3, torch.float32)])
def test_apply_forms_post_res_dx_cpu(fused_cpu, n, dtype):
    """res_grad = (g, H_res): the apply kernel adds H_res^T g itself, as dx_accum would have added it."""
    from dualpipe_mhc.kernels import mhc_pre
    from dualpipe_mhc.kernels.mhc_post import post_res_backward

    torch.manual_seed(9)
    t, c = 37, 96
    x, phi, alpha, bias = make_inputs(t, n, c, dtype, "cpu")
    _, h_pre, h_post, h_res, proj, rstd = mhc_pre.pre_forward(x, phi, alpha, bias, ITERS, ref.RMS_EPS)
    du, g, y = torch.randn(t, c).to(dtype), torch.randn(t, n, c).to(dtype), torch.randn(t, c).to(dtype)
    _, _, draw, coef = mhc_pre.pre_backward_reduce(
        x, alpha, bias, proj, rstd, du, torch.randn(t, n), torch.randn(t, n, n), ITERS
    )
    dense = post_res_backward(g, x, y, h_post, h_res)
    lazy = post_res_backward(g, x, y, h_post, h_res, write_dx=False)
    assert lazy[0] is None and all(torch.equal(a, b) for a, b in zip(dense[1:], lazy[1:]))
    want, dphi_want = mhc_pre.pre_backward_apply(x, phi, h_pre, du, draw, coef, dx_accum=dense[0].clone())
    got, dphi = mhc_pre.pre_backward_apply(x, phi, h_pre, du, draw, coef, res_grad=(g, h_res))
    # dense rounds H_res^T g to the stream dtype before the sum; res_grad sums it in fp32
    assert rel_err(got, want) < (1e-2 if dtype == torch.bfloat16 else 1e-6)
    assert torch.equal(dphi, dphi_want)


def test_sublayer_backward_writes_one_dx_cpu(fused_cpu, monkeypatch):
    """pre -> F -> post_res: the post/res backward leaves dx to the pre backward (no [T, n, C] round trip)."""
    calls = []
    real = fused_cpu.post_res_backward

    def spy(*args, **kwargs):
        calls.append(kwargs.get("write_dx", True))
        return real(*args, **kwargs)

    monkeypatch.setattr(fused_cpu, "post_res_backward", spy)
    torch.manual_seed(10)
    assert_close(check_layer(fused_cpu, 9, 4, 64, torch.float32, "cpu"), torch.float32)
    assert calls == [False]


def test_apply_defaults_fit_shared_memory():
    """The tuned apply sizes (bf16, n <= 4) are not used where they ran out of shared memory on H100;
    only the apply fields change, and a device missing from the table takes the default entry."""
    from dualpipe_mhc.kernels.settings import APPLY_FIELDS, DEFAULT, FIELDS, TABLE

    entry = TABLE[DEFAULT]
    cpu = torch.device("cpu")
    assert launch_settings(cpu, torch.bfloat16, 4, 2048) == entry.narrow
    assert launch_settings("NVIDIA H100 80GB HBM3", torch.bfloat16, 4, 2048) == TABLE["NVIDIA H100 80GB HBM3"].narrow
    assert launch_settings("a GPU nobody swept", torch.bfloat16, 4, 2048) == entry.narrow
    for dtype, n in ((torch.float32, 4), (torch.float32, 1), (torch.bfloat16, 8), (torch.float16, 2)):
        got = launch_settings(cpu, dtype, n, 1000)
        assert all(getattr(got, f) == getattr(entry.wide_apply, f) for f in APPLY_FIELDS), (dtype, n)
        assert all(getattr(got, f) == getattr(entry.narrow, f) for f in FIELDS if f not in APPLY_FIELDS)
        assert got.apply_block_t == 16 != entry.narrow.apply_block_t


def test_h200_entry_is_its_sweep():
    """The H200 table entry is what its sweeps picked, field for field: the whole sweep
    (benchmarks/results/kernels_sweep_h200/), then the reduce retuned (kernels_retune_h200/). The retune's
    forward winner, a fixed 4 K splits, is not taken: the launcher's rule (evenly loaded resident programs)
    picks 6 at T = 8192, within 0.5 % of it in the same sweep, and adapts to other token counts."""
    import json

    from dualpipe_mhc.kernels.settings import TABLE

    results = ROOT / "benchmarks/results"
    best = json.loads((results / "kernels_sweep_h200/best_tuning.json").read_text())
    retune = json.loads((results / "kernels_retune_h200/best_tuning.json").read_text())
    reduce = {k: v for k, v in retune.items() if k.startswith("reduce_")}
    assert best and reduce and retune["fwd_k_splits"] == 4 and best["fwd_k_splits"] is None
    assert TABLE["NVIDIA H200"].narrow == TABLE["default"].narrow.replace(best).replace(reduce)


def test_launch_settings_override_is_explicit_and_per_thread():
    """An explicit override wins over an :func:`overriding` block, which wins over the table; the block
    reaches only its own thread (a worker's status thread sees the table), and unknown names fail at once."""
    import threading

    from dualpipe_mhc.kernels.settings import overriding

    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    table = launch_settings(cpu, bf16, 4, 64)
    assert launch_settings(cpu, bf16, 4, 64, {"apply_block_t": 32}).apply_block_t == 32
    assert launch_settings(cpu, bf16, 4, 64, table) is table
    seen = {}
    with overriding({"apply_block_t": 16, "fwd_split": False}):
        inside = launch_settings(cpu, bf16, 4, 64, {"apply_block_t": 32})
        worker = threading.Thread(target=lambda: seen.update(other=launch_settings(cpu, bf16, 4, 64)))
        worker.start()
        worker.join()
    assert (inside.apply_block_t, inside.fwd_split) == (32, False)
    assert seen["other"] == table and launch_settings(cpu, bf16, 4, 64) == table
    with pytest.raises(KeyError, match="unknown launch settings"):
        launch_settings(cpu, bf16, 4, 64, {"apply_blok_t": 32})
    with pytest.raises(KeyError, match="unknown launch settings"), overriding({"nope": 1}):
        pass


def test_forward_settings_reach_the_backward_cpu(fused_cpu, monkeypatch):
    """The op resolves its settings in the forward and the backward uses those, wherever it runs."""
    from dualpipe_mhc.kernels.settings import overriding

    seen = []
    real = fused_cpu.pre_backward

    def spy(*args, settings=None, **kwargs):
        seen.append(settings)
        return real(*args, settings=settings, **kwargs)

    monkeypatch.setattr(fused_cpu, "pre_backward", spy)
    x, phi, alpha, bias = make_inputs(9, 4, 64, torch.float32, "cpu")
    x.requires_grad_()
    with overriding({"apply_block_t": 8}):
        u, h_post, h_res = fused_cpu.mhc_pre(x, phi, alpha, bias, ITERS)
    (u.sum() + h_post.sum() + h_res.sum()).backward()  # outside the block
    assert len(seen) == 1 and seen[0].apply_block_t == 8


def test_fit_loop_stages_lowers_until_the_kernel_fits():
    """A table entry's loop stages are lowered where the compiled kernel would not fit the device's shared
    memory (the H200 apply at n = 1: 239 KB at 3 stages against 227 KB), and kept where it fits."""
    from types import SimpleNamespace

    from dualpipe_mhc.kernels import mhc_pre_common as mpc

    class Kernel:
        fn = SimpleNamespace(__name__="stand_in")

        def warmup(self, *args, grid, **kw):
            return SimpleNamespace(metadata=SimpleNamespace(shared=80_000 * kw["LOOP_STAGES"] + kw["BT"]))

    limit = 232_448
    mpc._fitted.clear()
    orig = mpc._shared_limit
    mpc._shared_limit = lambda device: limit
    try:
        cuda = torch.device("cuda", 0)
        assert mpc.fit_loop_stages(Kernel(), tuple, (), {"LOOP_STAGES": 3, "BT": 64}, cuda) == {"LOOP_STAGES": 2, "BT": 64}
        assert mpc.fit_loop_stages(Kernel(), tuple, (), {"LOOP_STAGES": 2, "BT": 32}, cuda)["LOOP_STAGES"] == 2
        assert mpc.fit_loop_stages(Kernel(), tuple, (), {"LOOP_STAGES": 3}, torch.device("cpu")) == {"LOOP_STAGES": 3}
    finally:
        mpc._shared_limit = orig
        mpc._fitted.clear()


def test_launch_fitted_retries_a_launch_refused_for_shared_memory():
    """A launch Triton refuses for shared memory (raised when the binary loads, before it runs) goes again at
    one pipeline stage fewer: the loop's where set, else the kernel's (Triton's default 3). The next fit of
    the same launch starts there; a launch that fits at no stage count raises."""
    from types import SimpleNamespace

    import triton

    from dualpipe_mhc.kernels import mhc_pre_common as mpc

    launched = []

    class Kernel:
        fn = SimpleNamespace(__name__="stand_in")

        def __init__(self, fits_at: int):
            self.fits_at = fits_at

        def __getitem__(self, grid):
            def launch(*args, **kw):
                if (kw["LOOP_STAGES"] or kw.get("num_stages", 3)) > self.fits_at:
                    raise triton.runtime.errors.OutOfResources(239_104, 232_448, "shared memory")
                launched.append((grid, args, kw))

            return launch

    mpc._fitted.clear()
    cuda = torch.device("cuda", 0)
    try:
        mpc.launch_fitted(Kernel(2), (4, 2), (1, 2), ("bf16",), {"LOOP_STAGES": 3, "BT": 64}, cuda)
        assert launched == [((4, 2), (1, 2), {"LOOP_STAGES": 2, "BT": 64})]
        remembered = mpc._fitted[mpc._fit_key(Kernel(2), {"LOOP_STAGES": 3, "BT": 64}, ("bf16",), cuda)]
        assert remembered == {"LOOP_STAGES": 2, "BT": 64}
        mpc.launch_fitted(Kernel(2), (1,), (), (), {"LOOP_STAGES": None, "BT": 64}, cuda)
        assert launched[-1][2] == {"LOOP_STAGES": None, "BT": 64, "num_stages": 2}
        # the next launch of the same kind asks the compile-time fit first, which now knows
        assert mpc.fit_loop_stages(Kernel(2), tuple, (), {"LOOP_STAGES": None, "BT": 64}, cuda)["num_stages"] == 2
        with pytest.raises(triton.runtime.errors.OutOfResources):
            mpc.launch_fitted(Kernel(0), (1,), (), (), {"LOOP_STAGES": 2, "BT": 64}, cuda)
    finally:
        mpc._fitted.clear()


def test_wave_splits():
    """The apply grid fills whole waves: 32 channel blocks on 132 one-program SMs take 4 splits
    (128 programs), 112 take 7 (784 = 6 waves less 8), and twice the slots twice the splits."""
    from dualpipe_mhc.kernels.mhc_pre_common import wave_splits

    assert [wave_splits(cb, 16, 132) for cb in (32, 64, 112)] == [4, 2, 7]
    assert wave_splits(32, 16, 264) == 8
    assert wave_splits(64, 1, 132) == 1  # capped by the token blocks there are


def test_split_forward_variant_cpu(fused_cpu):
    """The K-split bf16 hi/lo forward equals the single-kernel forward (proj to ~2^-17, the rest to rounding)."""
    from dualpipe_mhc.kernels import mhc_pre
    from dualpipe_mhc.kernels.settings import overriding

    torch.manual_seed(9)
    x, phi, alpha, bias = make_inputs(150, 4, 200, torch.bfloat16, "cpu")
    one = mhc_pre.pre_forward(x, phi, alpha, bias, ITERS, ref.RMS_EPS, split=False)
    for k_splits in (None, 1, 3):
        two = mhc_pre.pre_forward(x, phi, alpha, bias, ITERS, ref.RMS_EPS, split=True, block_t=64, k_splits=k_splits)
        for name, a, b in zip(("u", "h_pre", "h_post", "h_res", "proj", "rstd"), one, two):
            assert rel_err(b, a) < (1e-2 if name == "u" else 1e-4), (name, k_splits)
    with overriding({"fwd_split": True}):  # and the whole layer, every gradient, through it
        assert_close(check_layer(fused_cpu, 37, 4, 96, torch.bfloat16, "cpu"), torch.bfloat16)


@pytest.mark.parametrize("iters", [0, 1, 3])
def test_sinkhorn_iteration_counts_cpu(fused_cpu, iters):
    torch.manual_seed(iters)
    assert_close(check_pre_alone(fused_cpu, 5, 4, 64, torch.float32, "cpu", iters=iters), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n", [2, 8])
def test_post_res_alone_cpu(fused_cpu, n, dtype):
    torch.manual_seed(11 + n)
    assert_close(check_post_alone(fused_cpu, 13, n, 136, dtype, "cpu"), dtype)


# DeepSeek-V4's variant: the same kernels under the DSV4 flags, against the dsv4 reference. The bf16
# cases run the K-split forward, the fp32 ones the single mapping kernel; n = 3 pads the n x n tile,
# n = 8 takes the wide tiles.
@pytest.mark.parametrize("t, n, c, dtype", [(1, 4, 64, torch.float32), (19, 4, 200, torch.bfloat16),
                                            (37, 3, 96, torch.float32), (5, 8, 64, torch.bfloat16)])  # fmt: skip
def test_dsv4_layer_matches_reference_cpu(fused_cpu, t, n, c, dtype):
    torch.manual_seed(500 + t + n)
    assert_close(check_layer(fused_cpu, t, n, c, dtype, "cpu", kind="dsv4"), dtype)


@pytest.mark.parametrize("iters, res_scale", [(1, 1.0), (3, 1.0), (20, 200.0)])
def test_dsv4_pre_alone_cpu(fused_cpu, iters, res_scale):
    """Independent cotangents on h_res exercise the eps-guarded Sinkhorn backward alone; iters = 1 is
    the softmax + eps + one T_r only; res_scale 200 spreads the logits over several hundred, where only a
    column-wise max shift keeps every column of the softmax finite."""
    torch.manual_seed(iters)
    assert_close(check_pre_alone(fused_cpu, 5, 4, 64, torch.float32, "cpu", iters, "dsv4", res_scale), torch.float32)


def test_dsv4_differs_from_mhc_cpu(fused_cpu):
    """The flags reach the kernels: dsv4 and mhc give different H_pre sums and H_res on the same inputs."""
    torch.manual_seed(4)
    x, phi, alpha, bias = make_inputs(3, 4, 64, torch.float32, "cpu")
    u_m, _, h_res_m = fused_cpu.mhc_pre(x, phi, alpha, bias, ITERS, "mhc")
    u_d, _, h_res_d = fused_cpu.mhc_pre(x, phi, alpha, bias, ITERS, "dsv4")
    assert (h_res_m - h_res_d).abs().max() > 1e-3
    with pytest.raises(ValueError, match="dsv4 Sinkhorn needs sinkhorn_iters >= 1"):
        fused_cpu.mhc_pre(x, phi, alpha, bias, 0, "dsv4")


def test_leading_batch_dims_cpu(fused_cpu):
    torch.manual_seed(3)
    assert_close(check_layer(fused_cpu, 3, 4, 64, torch.float32, "cpu", lead=(2,)), torch.float32)


def test_grad_link_only_for_the_same_x_cpu(fused_cpu):
    """post_res on another x must not hand its gradient to the pre op of the first one."""
    torch.manual_seed(5)
    x, phi, alpha, bias = make_inputs(6, 4, 64, torch.float32, "cpu")
    x2 = torch.randn_like(x)
    grads = []
    for impl in (fused_cpu, ref):
        xs, x2s, ps = leaves(x, x2, phi)
        u, h_post, h_res = impl.mhc_pre(xs, ps, alpha, bias, ITERS)
        out = impl.post_res(x2s, u, h_post, h_res) + impl.post_res(xs, u, h_post, h_res)  # only the second links
        out.square().sum().backward()
        grads.append((xs.grad, x2s.grad, ps.grad))
    for got, want in zip(*grads):
        assert rel_err(got, want) < 1e-4


def test_grad_link_twice_accumulates_cpu(fused_cpu):
    torch.manual_seed(6)
    x, phi, alpha, bias = make_inputs(6, 2, 64, torch.float32, "cpu")
    grads = []
    for impl in (fused_cpu, ref):
        (xs,) = leaves(x)
        u, h_post, h_res = impl.mhc_pre(xs, phi, alpha, bias, ITERS)
        (impl.post_res(xs, u, h_post, h_res).sum() + impl.post_res(xs, 2 * u, h_post, h_res).square().sum()).backward()
        grads.append(xs.grad)
    assert rel_err(grads[0], grads[1]) < 1e-4


def test_unsupported_inputs_raise(fused_cpu):
    x, phi, alpha, bias = make_inputs(2, 2, 64, torch.float32, "cpu")
    with pytest.raises(ValueError, match="reference"):
        fused_cpu.mhc_pre(x, phi, alpha, bias, ITERS, kind="hc")
    with pytest.raises(TypeError, match="float64"):
        fused_cpu.mhc_pre(x.double(), phi, alpha, bias, ITERS)
    with pytest.raises(ValueError, match="phi"):
        fused_cpu.mhc_pre(x, phi[:, :-1], alpha, bias, ITERS)


def test_dispatch_exposes_fused_ops(fused_cpu):
    from dualpipe_mhc.kernels import get_ops, resolve_backend

    ops = get_ops("triton")
    assert ops.name == "triton" and ops.pre.__module__.endswith("fused")
    assert resolve_backend("auto", "cpu", "mhc") == "reference"


# --- GPU: compiled kernels, the full grid ---

GPU_C = [64, 1000, 2048, 7168]
GPU_T = [1, 77, 1537]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
@pytest.mark.parametrize("c", GPU_C)
@pytest.mark.parametrize("t", GPU_T)
def test_layer_matches_reference_gpu(fused_gpu, t, c, n, dtype):
    torch.manual_seed(1000 * n + t + c)
    assert_close(check_layer(fused_gpu, t, n, c, dtype, "cuda"), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_ops_alone_gpu(fused_gpu, n, dtype):
    torch.manual_seed(n)
    assert_close(check_pre_alone(fused_gpu, 333, n, 1000, dtype, "cuda"), dtype)
    assert_close(check_post_alone(fused_gpu, 333, n, 1000, dtype, "cuda"), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("which", range(len(KERNEL_CANDIDATES.ALL)))
def test_tuning_candidates_gpu(fused_gpu, which):
    """Every configuration the sweep may pick computes the same function (bf16, n = 4 and 8)."""
    from dualpipe_mhc.kernels.settings import overriding

    with overriding(KERNEL_CANDIDATES.ALL[which]):
        for t, n, c in ((1537, 4, 2048), (77, 8, 1000)):
            torch.manual_seed(which + n)
            assert_close(check_layer(fused_gpu, t, n, c, torch.bfloat16, "cuda"), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("c", [1000, 7168])
@pytest.mark.parametrize("t", GPU_T)
def test_dsv4_layer_matches_reference_gpu(fused_gpu, t, c, dtype):
    torch.manual_seed(2000 + t + c)
    assert_close(check_layer(fused_gpu, t, 4, c, dtype, "cuda", kind="dsv4"), dtype)
    assert_close(check_pre_alone(fused_gpu, t, 4, c, dtype, "cuda", kind="dsv4"), dtype)


@pytest.mark.gpu
def test_hyper_connection_layer_uses_fused_gpu(fused_gpu):
    from dualpipe_mhc.mhc import HyperConnection

    torch.manual_seed(0)
    layer = HyperConnection(torch.nn.Linear(256, 256), width=256, streams=4).cuda()
    x = torch.randn(2, 64, 4, 256, device="cuda")
    outs = []
    for backend in ("triton", "reference"):
        layer.kernels = backend
        layer.zero_grad()
        xs = x.clone().requires_grad_()
        out = layer(xs)
        out.square().mean().backward()
        outs.append((out, xs.grad, layer.phi.grad.clone()))
    for a, b in zip(*outs):
        assert rel_err(a, b) < 1e-3
