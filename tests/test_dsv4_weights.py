"""DeepSeek-V4 mHC weights in and out (dualpipe_mhc.dsv4_weights): round trips, errors, and the names
checked against transformers' own model and checkpoint-conversion mapping."""

from __future__ import annotations

import re

import pytest
import torch

from dualpipe_mhc.config import ModelConfig
from dualpipe_mhc.dsv4_weights import Dsv4WeightsError, export_dsv4_state_dict, load_dsv4_state_dict
from dualpipe_mhc.model import build_model

N, D, LAYERS = 4, 16, 2


def _model(seed: int, residual: str = "dsv4", layers: int = LAYERS):
    cfg = ModelConfig(residual=residual, width=D, heads=2, layers=layers, streams=N, vocab_size=64, seq_len=8)
    return build_model(cfg, seed=seed, kernels="reference")


def _hc_params(model):
    return {name: p for name, p in model.named_parameters() if name.endswith((".phi", ".alpha", ".bias", ".base", ".scale"))
            and ("blocks" in name or "reduce" in name)}  # fmt: skip


@pytest.mark.parametrize("naming", ["release", "transformers"])
def test_round_trip_carries_every_mhc_tensor_and_the_function(naming):
    src, dst = _model(seed=0), _model(seed=1)
    with torch.no_grad():  # non-default values everywhere, so a dropped or swapped tensor shows
        for p in _hc_params(src).values():
            p.add_(torch.randn_like(p) * 0.3)
    state = export_dsv4_state_dict(src, naming)
    assert len(state) == 3 * (2 * LAYERS + 1)
    assert all(t.dtype == torch.float32 for t in state.values())
    assert load_dsv4_state_dict(dst, state) == naming
    for name, p in _hc_params(src).items():
        assert torch.equal(_hc_params(dst)[name], p), name
    again = export_dsv4_state_dict(dst, naming)
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)
    with torch.no_grad():  # the rest of the model (not in a V4 mHC state dict) copied by hand
        for (name, p), q in zip(src.named_parameters(), dst.parameters()):
            q.copy_(p)
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(dst(tokens, tokens), src(tokens, tokens), rtol=0, atol=0)


def test_layout_fn_is_phi_transposed_and_names_are_as_documented():
    model = _model(seed=0)
    release = export_dsv4_state_dict(model, "release")
    hf = export_dsv4_state_dict(model, "transformers")
    m = (2 + N) * N
    assert release["layers.1.hc_ffn_fn"].shape == (m, N * D)
    assert torch.equal(release["layers.1.hc_ffn_fn"], model.blocks[1].mlp.phi.detach().t())
    assert torch.equal(release["layers.0.hc_attn_scale"], model.blocks[0].attn.alpha.detach())
    assert torch.equal(hf["model.layers.0.attn_hc.base"], model.blocks[0].attn.bias.detach())
    assert hf["model.hc_head.hc_fn"].shape == (N, N * D) and release["hc_head_scale"].shape == (1,)
    assert "hc_head.hc_fn" in export_dsv4_state_dict(model, "transformers", prefix="")


def test_extra_tensors_of_a_full_checkpoint_are_ignored():
    state = export_dsv4_state_dict(_model(seed=0), "release")
    state["layers.0.attn.wq_a.weight"] = torch.zeros(3, 3)
    state["embed.weight"] = torch.zeros(3, 3)
    assert load_dsv4_state_dict(_model(seed=1), state) == "release"


def test_missing_and_misshaped_tensors_are_one_line_errors_and_change_nothing():
    dst = _model(seed=1)
    before = {k: v.clone() for k, v in _hc_params(dst).items()}
    state = export_dsv4_state_dict(_model(seed=0), "transformers")
    del state["model.layers.1.ffn_hc.scale"]
    with pytest.raises(Dsv4WeightsError, match=r"^model\.layers\.1\.ffn_hc\.scale is missing from the state dict "
                                               r"\(expected shape \[3\]\)$"):  # fmt: skip
        load_dsv4_state_dict(dst, state)
    state = export_dsv4_state_dict(_model(seed=0), "release")
    state["layers.0.hc_attn_fn"] = state["layers.0.hc_attn_fn"].t()
    msg = rf"^layers\.0\.hc_attn_fn has shape \[{N * D}, 24\], expected \[24, {N * D}\]$"
    with pytest.raises(Dsv4WeightsError, match=msg):
        load_dsv4_state_dict(dst, state)
    assert all(torch.equal(before[k], v) for k, v in _hc_params(dst).items())


def test_wrong_model_or_checkpoint_is_a_one_line_error():
    state = export_dsv4_state_dict(_model(seed=0, layers=3), "release")
    with pytest.raises(Dsv4WeightsError, match=r"more layers than the model .*set model\.layers"):
        load_dsv4_state_dict(_model(seed=1), state)
    with pytest.raises(Dsv4WeightsError, match=r"need model\.residual='dsv4', this model is 'mhc'"):
        load_dsv4_state_dict(_model(seed=1, residual="mhc"), state)
    with pytest.raises(Dsv4WeightsError, match="no DeepSeek-V4 head tensor"):
        load_dsv4_state_dict(_model(seed=1), {"layers.0.hc_attn_fn": torch.zeros(1)})
    with pytest.raises(Dsv4WeightsError, match="naming 'hf' is unknown"):
        export_dsv4_state_dict(_model(seed=1), "hf")


def test_names_and_shapes_match_transformers_model_and_its_release_renaming():
    modeling = pytest.importorskip(
        "transformers.models.deepseek_v4.modeling_deepseek_v4",
        reason="transformers with DeepSeek-V4 (>= 5.23) is not installed: pip install -e '.[hf]'",
    )
    from transformers.conversion_mapping import _build_checkpoint_conversion_mapping
    from transformers.models.deepseek_v4.configuration_deepseek_v4 import DeepseekV4Config

    cfg = DeepseekV4Config(hidden_size=D, hc_mult=N, num_hidden_layers=LAYERS, vocab_size=64)
    with torch.device("meta"):
        theirs = modeling.DeepseekV4ForCausalLM(cfg)
    their_hc = {k: tuple(v.shape) for k, v in theirs.state_dict().items() if "hc" in k}
    model = _model(seed=0)
    ours = {k: tuple(v.shape) for k, v in export_dsv4_state_dict(model, "transformers").items()}
    assert ours == their_hc
    # transformers' own renaming of DeepSeek's release names (applied by from_pretrained, then "model.")
    renames = [
        (src, dst)
        for rule in _build_checkpoint_conversion_mapping()["deepseek_v4"]
        for src, dst in zip(rule.source_patterns, rule.target_patterns)
    ]
    renamed = {}
    for key, tensor in export_dsv4_state_dict(model, "release").items():
        for src, dst in renames:
            key = re.sub(src, dst, key)
        renamed["model." + key] = tuple(tensor.shape)
    assert renamed == their_hc
