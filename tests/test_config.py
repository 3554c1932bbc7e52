"""Config loading: every invalid value fails at load time with one line naming field, value and remedy."""

from __future__ import annotations

import json

import pytest
import yaml

from dualpipe_mhc.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    bundled_presets,
    config_from_dict,
    dump_config,
    load_config,
)

INVALID = [
    # (overrides, fragments the one-line message must contain)
    (["model.heads=5"], ["model.heads=5", "does not divide model.width=64", "use one of [1, 2, 4, 8, 16, 32]"]),
    (["model.heads=64"], ["model.width/heads=1 is odd", "even head dim", "model.heads in"]),
    (["model.streams=0"], ["model.streams=0", "n must be >= 1"]),
    (["model.streams=-2"], ["model.streams=-2", "n must be >= 1"]),
    (["model.residual=plain"], ["model.residual='plain' needs model.streams=1, got 4"]),
    (["model.residual=dense"], ["model.residual='dense' is invalid", "'plain', 'hc', 'mhc' or 'dsv4'"]),
    (["model.width=0"], ["model.width=0 is invalid", "positive"]),
    (["model.width=abc"], ["model.width='abc' is invalid", "valid integer"]),
    (["model.sinkhorn_iters=0"], ["model.sinkhorn_iters=0", "use >= 1"]),
    (["model.mlp_ratio=-1"], ["model.mlp_ratio=-1.0", "positive"]),
    (["model.tie_embeddings=true"], ["model.tie_embeddings=true is not implemented", "set it to false"]),
    (["model.layers=2"], ["model.layers=2 is fewer than the 4 pipeline stages of dualpipev on 2 ranks"]),
    (["model.unknown=1"], ["model.unknown is not a config field", "'width'"]),
    (["pipeline.schedule=gpipe"], ["pipeline.schedule='gpipe' is invalid", "'dualpipev'"]),
    (["pipeline.schedule=dualpipe", "pipeline.ranks=3", "model.layers=8"],
     ["pipeline.ranks=3", "even number of ranks", "or 4 ranks"]),
    (["pipeline.microbatches=3"], ["pipeline.microbatches=3", "count >= 2*ranks=4", "microbatches=4"]),
    (["pipeline.schedule=dualpipe", "pipeline.microbatches=5"],
     ["pipeline.microbatches=5", "even number of micro-batches >= 2*ranks=4", "microbatches=6"]),
    (["pipeline.ranks=0"], ["pipeline.ranks=0 is invalid"]),
    (["link.preset=h900-nvlink"], ["link.preset='h900-nvlink' is unknown", "h800-nvlink", "ib-400g", "pcie-gen5"]),
    (["link.preset=none"], ["link.preset is none but link.bandwidth_gbps is unset"]),
    (["link.bandwidth_gbps=-5"], ["link.bandwidth_gbps=-5.0 is invalid", "positive"]),
    (["link.bandwidth_gbps=inf"], ["link.bandwidth_gbps='inf' is invalid", "finite"]),
    (["link.latency_us=-1"], ["link.latency_us=-1.0 is invalid", ">= 0"]),
    (["hardware.preset=tpu"], ["hardware.preset='tpu' is unknown", "'h100'", "'h800'"]),
    (["hardware.memory_gib=0"], ["hardware.memory_gib=0.0 is invalid"]),
    (["recompute.block_layers=0"], ["recompute.block_layers=0 is invalid", "'auto'"]),
    (["run.lr=0"], ["run.lr=0.0 is invalid", "positive"]),
    (["run.lr=nan"], ["run.lr='nan' is invalid", "finite"]),
    (["run.checkpoint_every=-1"], ["run.checkpoint_every=-1 is invalid"]),
    (["model.layers=true"], ["model.layers=True is invalid: true/false is not a number here"]),
    (["recompute.block_layers=false"], ["recompute.block_layers=False is invalid"]),
    (["modle.width=8"], ["override key 'modle.width' is invalid", "'model'"]),
    (["model.width"], ["override 'model.width' is not of the form section.field=value"]),
    (["width=8"], ["override key 'width' is invalid"]),
]


@pytest.mark.parametrize("overrides, fragments", INVALID, ids=[" ".join(o) for o, _ in INVALID])
def test_invalid_value_is_rejected_with_one_line(overrides, fragments):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_defaults_and_bundled_presets_load():
    assert load_config().model.residual == "mhc"
    assert {"tiny", "paper-27b"} <= set(bundled_presets())
    paper = load_config("paper-27b")
    assert (paper.model.streams, paper.model.layers, paper.pipeline.schedule) == (4, 56, "dualpipev")
    assert load_config("tiny").link.preset == "gloo-cpu"


def test_config_is_frozen():
    cfg = load_config()
    with pytest.raises(Exception):
        cfg.model.width = 8


def test_link_presets_and_custom_link():
    assert load_config(None, ["link.preset=h800-nvlink"]).link.bandwidth == pytest.approx(200e9)
    custom = load_config(None, ["link.preset=none", "link.bandwidth_gbps=12.5", "link.latency_us=7"]).link
    assert custom.bandwidth == pytest.approx(12.5e9) and custom.latency == pytest.approx(7e-6)


def _write_toml(data: dict) -> str:
    """Flat sections of scalars -> TOML. TOML has no null: a None field is left out when None is its
    default, and written as the string "none" otherwise (only link.preset accepts that)."""
    lines = []
    for section, fields in data.items():
        lines.append(f"[{section}]")
        defaults = RunConfig.model_fields[section].annotation.model_fields
        for key, value in fields.items():
            if value is None and defaults[key].default is not None:
                value = "none"
            if value is not None:
                lines.append(f"{key} = {json.dumps(value)}")  # JSON scalars are valid TOML scalars
    return "\n".join(lines) + "\n"


WRITERS = {".toml": _write_toml, ".yaml": yaml.safe_dump, ".json": json.dumps}


@pytest.mark.parametrize("suffix", sorted(WRITERS))
def test_file_and_overrides_round_trip(tmp_path, suffix):
    base = load_config(
        None, ["model.width=96", "model.heads=6", "model.layers=6", "pipeline.schedule=1f1b", "link.preset=ib-400g"]
    )
    path = tmp_path / f"cfg{suffix}"
    path.write_text(WRITERS[suffix](dump_config(base)))
    assert load_config(path) == base

    overrides = ["model.streams=2", "run.lr=1e-4", "link.preset=none", "link.bandwidth_gbps=3", "recompute.block_layers=auto"]
    loaded = load_config(path, overrides)
    assert (loaded.model.streams, loaded.run.lr, loaded.link.preset) == (2, 1e-4, None)
    assert loaded.link.bandwidth_gbps == 3.0 and loaded.recompute.block_layers == "auto"
    assert loaded.model.width == 96 and loaded.pipeline.schedule == "1f1b"  # untouched fields survive
    assert loaded == config_from_dict(apply_overrides(dump_config(base), overrides))
    # the dumped form of the overridden config loads back to the same object
    again = tmp_path / f"again{suffix}"
    again.write_text(WRITERS[suffix](dump_config(loaded)))
    assert load_config(again) == loaded


def test_file_errors_are_one_line(tmp_path):
    cases = {
        "missing.toml": (None, "is neither a file nor a bundled preset"),
        "cfg.ini": ("[model]\n", "unknown format '.ini'; use .toml, .yaml or .json"),
        "bad.toml": ("[model\nwidth = 3", "does not parse"),
        "bad.json": ("{", "does not parse"),
        "list.yaml": ("- 1\n- 2\n", "must hold a table of sections, got list"),
        "unknown.toml": ("[modle]\nwidth = 8\n", "modle is not a config field"),
        "latin1.toml": (b"[model]\n# caf\xe9\n", "is not UTF-8 text"),
        "a_directory": ("dir", "cannot be read"),
    }
    for name, (text, fragment) in cases.items():
        path = tmp_path / name
        if text == "dir":
            path.mkdir()
        elif isinstance(text, bytes):
            path.write_bytes(text)
        elif text is not None:
            path.write_text(text)
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert fragment in str(info.value) and "\n" not in str(info.value), (name, str(info.value))


def test_override_into_non_table_section_is_an_error(tmp_path):
    path = tmp_path / "odd.json"
    path.write_text(json.dumps({"model": 3}))
    with pytest.raises(ConfigError, match="section 'model' must be a table of fields"):
        load_config(path, ["model.width=8"])


def test_override_values_parse_as_scalars():
    cfg = load_config(None, ["recompute.enabled=true", "model.mlp_hidden=none", "run.dtype=bfloat16"])
    assert cfg.recompute.enabled is True and cfg.model.mlp_hidden is None and cfg.run.dtype == "bfloat16"
    assert load_config(None, ["link.preset=None", "link.bandwidth_gbps=1"]).link.preset is None
