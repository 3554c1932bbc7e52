"""residual = "dsv4" through the model and the commands: stage split, simulate, plan, run.

Traffic: a dsv4 sublayer moves the same bytes per token as an mhc one (the same x, phi, u, y and
x_next tensors; only the mapping arithmetic differs), so the cost model prices it as mhc. The one
difference is the head: the learned HyperHead reads the n streams once for its weights (the
RMS-normed projection) and again for the weighted sum, where mhc's mean reads them once; n*n*C
parameters more on the last stage. Both are noise next to a layer and are not modelled.
"""

from __future__ import annotations

import json

import pytest
import torch

from dualpipe_mhc.config import ModelConfig
from dualpipe_mhc.model import build_model


def _cfg(**kw):
    return ModelConfig(residual="dsv4", width=32, heads=2, layers=4, streams=4, vocab_size=64, seq_len=16, **kw)


def test_stage_chunks_compute_the_whole_model_loss_and_every_gradient():
    model = build_model(_cfg(), seed=0, kernels="reference")
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    loss = model(tokens, tokens)
    loss.backward()
    whole = {name: p.grad.clone() for name, p in model.named_parameters()}
    assert whole["head.reduce.phi"].abs().max() > 0 and whole["blocks.0.attn.phi"].abs().max() > 0
    model.zero_grad()
    x = tokens
    for chunk in model.stage_chunks(2):
        x = chunk(x, tokens) if chunk.is_last else chunk(x)
    torch.testing.assert_close(x, loss, rtol=0, atol=0)
    x.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, whole[name], rtol=0, atol=0, msg=name)


def test_recompute_changes_no_number():
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    grads = []
    for block_layers in (None, 2):
        model = build_model(_cfg(), seed=0, kernels="reference", recompute_layers=block_layers)
        model(tokens, tokens).backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("command", ["simulate", "plan"])
def test_simulate_and_plan_accept_dsv4_and_price_it_as_mhc(command, tmp_path, capsys):
    from dualpipe_mhc import cli

    reports = {}
    for kind in ("mhc", "dsv4"):
        out = tmp_path / f"{kind}.json"
        args = [command, "--config", "tiny", "--set", f"model.residual={kind}", "--json", str(out)]
        assert cli.main(args) == 0
        reports[kind] = json.loads(out.read_text())
    capsys.readouterr()
    mhc, dsv4 = reports["mhc"], reports["dsv4"]
    mhc.pop("files", None), dsv4.pop("files", None)  # output paths differ
    assert mhc == dsv4


@pytest.mark.ray
def test_run_command_trains_dsv4(ray_cluster, tmp_path):
    from dualpipe_mhc import cli

    report_file = tmp_path / "run.json"
    rc = cli.main(["run", "--steps", "2", "--set", "model.residual=dsv4", "--json", str(report_file),
                   "--out", str(tmp_path / "out")])  # fmt: skip
    assert rc == 0
    report = json.loads(report_file.read_text())
    assert report["config"]["model"]["residual"] == "dsv4"
    assert [s["step"] for s in report["steps"]] == [0, 1]
    assert all(s["loss"] > 0 for s in report["steps"])
