"""Typed run configuration: pydantic models validated once, at load time.

A config is a TOML, YAML or JSON file (or a bundled preset name such as
``paper-27b``) plus ``a.b=value`` overrides. Every invalid value fails here
with a single line naming the field, the value and what would be valid; code
deeper in the project takes the validated object and never re-checks it.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

ResidualKind = Literal["plain", "hc", "mhc", "dsv4"]
RESIDUALS: tuple[str, ...] = get_args(ResidualKind)  # the one list of residual kinds; others import it
ScheduleName = Literal["1f1b", "zb1p", "dualpipe", "dualpipev"]
MlpKind = Literal["gelu", "swiglu"]
SplitMode = Literal["even", "balanced"]


class ConfigError(ValueError):
    """A config value is invalid; the message is one line and says what would be valid."""


class _Section(BaseModel):
    # allow_inf_nan=False: "nan" passes every "<= 0" check, so it must be refused by type.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_number(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic reads true as 1 for an int field: "layers: true" would build a one-layer model.
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool) and annotation is not bool and bool not in get_args(annotation):
            raise ValueError("true/false is not a number here; give the value itself")
        return value


def _positive(section: BaseModel, prefix: str, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if value <= 0:
            raise ConfigError(f"{prefix}.{name}={value} is invalid: it must be positive")


def _at_most(section: BaseModel, prefix: str, limits: dict[str, float]) -> None:
    """Refuse a size past ``limits[name]``: past it lies a typo, not a model, and the reports
    would print step times and memory that are cut off or meaningless."""
    for name, limit in limits.items():
        value = getattr(section, name)
        if value is not None and value > limit:
            most = int(limit) if float(limit).is_integer() else limit
            raise ConfigError(
                f"{prefix}.{name}={value} is past any real model or setup; use {prefix}.{name}<={most}"
            )


# Upper bounds, each well past the largest published model or shipping device (dense LMs reach
# C ~ 25k, ~130 layers, 256k vocabularies, 1M-token contexts; mHC uses n = 4, HC up to 8).
MODEL_LIMITS: dict[str, float] = {
    "vocab_size": 2**20, "width": 65536, "heads": 1024, "layers": 1024, "streams": 16,
    "mlp_ratio": 64, "mlp_hidden": 2**18, "seq_len": 2**20, "sinkhorn_iters": 1000,
}
LINK_LIMITS: dict[str, float] = {"bandwidth_gbps": 10_000.0, "latency_us": 1e6}  # 10 TB/s one way; 1 s
HARDWARE_LIMITS: dict[str, float] = {"matmul_tflops": 100_000.0, "hbm_tbps": 100.0, "memory_gib": 4096.0}
RUN_LIMITS: dict[str, float] = {"steps": 10_000_000, "timeout_s": 7 * 86400.0}


class ModelConfig(_Section):
    """Decoder-only LM shape. ``width`` is C, ``streams`` is n (docs/DESIGN.md §4).
    Sizes are bounded by :data:`MODEL_LIMITS` (far past any real model)."""

    vocab_size: int = Field(512, description="vocabulary size, 1 to 2^20")
    width: int = Field(64, description="model width C, 1 to 65536; heads must divide it")
    heads: int = Field(4, description="attention heads, 1 to 1024; width/heads must be even (rotary)")
    layers: int = Field(4, description="transformer layers, 1 to 1024; at least the pipeline's stages")
    streams: int = Field(4, description="residual streams n, 1 to 16 (the paper: 4; plain needs 1)")
    residual: ResidualKind = Field("mhc", description="residual kind: plain | hc | mhc | dsv4")
    mlp: MlpKind = Field("gelu", description="MLP kind: gelu | swiglu")
    mlp_ratio: float = Field(4.0, description="MLP hidden width / C, above 0 and at most 64")
    mlp_hidden: int | None = Field(None, description="MLP hidden width, 1 to 2^18; overrides mlp_ratio (e.g. 11008)")
    seq_len: int = Field(64, description="tokens per sequence, 1 to 2^20")
    sinkhorn_iters: int = Field(20, description="Sinkhorn-Knopp rounds for H_res, 1 to 1000 (the paper: 20)")
    tie_embeddings: bool = Field(False, description="kept so dumped configs load; only false is implemented")
    split: SplitMode = Field(
        "balanced", description="layers per pipeline stage: even (sizes differ by at most one) or balanced (fewer "
        "layers on the stages that also carry the embedding or the head; scheduler/split.py)")

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        _positive(self, "model", "vocab_size", "width", "heads", "layers", "seq_len")
        if self.streams < 1:
            raise ConfigError(f"model.streams={self.streams} is invalid: n must be >= 1 (the paper uses 4)")
        _at_most(self, "model", MODEL_LIMITS)
        # Suggest only head counts that pass both checks: dividing C, with an even head dim.
        valid_heads = [h for h in range(1, min(self.width, 128) + 1) if self.width % h == 0 and (self.width // h) % 2 == 0]
        if self.width % self.heads:
            raise ConfigError(
                f"model.heads={self.heads} does not divide model.width={self.width}; use one of {valid_heads[-6:]}"
            )
        if (self.width // self.heads) % 2:
            raise ConfigError(
                f"model.width/heads={self.width // self.heads} is odd; rotary embeddings need an even head dim; "
                f"use model.heads in {valid_heads[-6:]}"
            )
        if self.residual == "plain" and self.streams != 1:
            raise ConfigError(
                f"model.residual='plain' needs model.streams=1, got {self.streams}; "
                "set model.streams=1 or model.residual='mhc'"
            )
        if self.sinkhorn_iters < 1:
            raise ConfigError(f"model.sinkhorn_iters={self.sinkhorn_iters} is invalid: use >= 1 (the paper uses 20)")
        if self.mlp_ratio <= 0:
            raise ConfigError(f"model.mlp_ratio={self.mlp_ratio} is invalid: use a positive number such as 4")
        if self.mlp_hidden is not None and self.mlp_hidden < 1:
            raise ConfigError(f"model.mlp_hidden={self.mlp_hidden} is invalid: use a positive int or leave it unset")
        if self.tie_embeddings:
            # The embedding and the head sit on different pipeline stages (ranks, for 1F1B and DualPipe),
            # and nothing shares or all-reduces their weights; accepting it would silently train untied.
            raise ConfigError("model.tie_embeddings=true is not implemented (the model always unties them); set it to false")
        return self

    @property
    def hidden(self) -> int:
        """MLP hidden width."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        return int(round(self.mlp_ratio * self.width))

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


class PipelineConfig(_Section):
    """How the model is cut and scheduled. ``microbatch_size`` counts sequences.

    The schedule's own rules (``scheduler.builders.check_schedule_args``): DualPipe needs an
    even number of ranks and an even ``microbatches`` >= 2 x ranks, DualPipeV any count >=
    2 x ranks. ``simulate`` refuses a schedule of more than 1,000,000 compute actions
    (``scheduler.simulate.MAX_SIMULATED_HALVES``; 2 x stages x microbatches, 3 x for ZB1P;
    stages = ranks, 2 x ranks for DualPipeV), e.g. microbatches <= 31250 for DualPipeV on 8 ranks.
    """

    schedule: ScheduleName = "dualpipev"
    ranks: int = 2
    microbatches: int = 4
    microbatch_size: int = 1

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> PipelineConfig:
        _positive(self, "pipeline", "ranks", "microbatches", "microbatch_size")
        if _schedule_rules(info):
            from dualpipe_mhc.scheduler.builders import check_schedule_args
            from dualpipe_mhc.scheduler.ir import ScheduleError

            try:  # the builders own the rules; the config only points at its own field
                check_schedule_args(self.schedule, self.ranks, self.microbatches)
            except ScheduleError as exc:
                field = exc.field or "schedule"
                raise ConfigError(f"pipeline.{field}={getattr(self, field)}: {exc}") from None
        return self

    def stages(self) -> int:
        """Model stages a micro-batch passes through: 2 x ranks for DualPipeV's V; ranks otherwise
        (DualPipe holds two stages per rank, but one per direction's path)."""
        from dualpipe_mhc.scheduler.builders import stage_count

        return stage_count(self.schedule, self.ranks)


LINK_PRESETS: dict[str, tuple[float, float]] = {
    # name: (one-way bandwidth GB/s, latency us). docs/DESIGN.md §6.
    "h800-nvlink": (200.0, 3.0),   # 400 GB/s bidirectional
    "h100-nvlink": (450.0, 3.0),   # 900 GB/s bidirectional
    "h200-nvlink": (450.0, 3.0),
    "ib-400g": (50.0, 5.0),        # 400 Gb/s InfiniBand per GPU
    "pcie-gen5": (64.0, 5.0),      # x16, one way
    "gloo-cpu": (3.0, 50.0),       # two CPU Ray actors over gloo on the 2-core box
}


class LinkConfig(_Section):
    """A point-to-point link between neighbouring ranks: a preset, or explicit figures."""

    preset: str | None = Field("h800-nvlink", description="a LINK_PRESETS name, or none with bandwidth_gbps")
    bandwidth_gbps: float | None = Field(
        None, description="one-way GB/s (1e9 bytes/s), above 0 and at most 10000; overrides the preset")
    latency_us: float | None = Field(None, description="one-way latency in us, 0 to 1e6; overrides the preset")
    shape: bool = Field(False, description="runtime: pace sends to this link's rate (emulate a slower link)")

    @field_validator("preset", mode="before")
    @classmethod
    def _none_string(cls, value: Any) -> Any:
        # TOML has no null, so a file can only say preset = "none" for a custom link.
        return None if isinstance(value, str) and value.strip().lower() in ("none", "null", "") else value

    @model_validator(mode="after")
    def _check(self) -> LinkConfig:
        if self.preset is not None and self.preset not in LINK_PRESETS:
            raise ConfigError(
                f"link.preset={self.preset!r} is unknown; use one of {sorted(LINK_PRESETS)} "
                "or set link.preset=none with link.bandwidth_gbps and link.latency_us"
            )
        if self.preset is None and self.bandwidth_gbps is None:
            raise ConfigError("link.preset is none but link.bandwidth_gbps is unset; set it (one-way GB/s) or pick a preset")
        if self.bandwidth_gbps is not None and self.bandwidth_gbps <= 0:
            raise ConfigError(f"link.bandwidth_gbps={self.bandwidth_gbps} is invalid: use a positive one-way GB/s")
        if self.latency_us is not None and self.latency_us < 0:
            raise ConfigError(f"link.latency_us={self.latency_us} is invalid: use >= 0")
        _at_most(self, "link", LINK_LIMITS)
        return self

    @property
    def bandwidth(self) -> float:
        """One-way bandwidth in bytes per second."""
        gbps = self.bandwidth_gbps if self.bandwidth_gbps is not None else LINK_PRESETS[self.preset][0]
        return gbps * 1e9

    @property
    def latency(self) -> float:
        """One-way latency in seconds."""
        us = self.latency_us if self.latency_us is not None else LINK_PRESETS[self.preset][1]
        return us * 1e-6


HARDWARE_PRESETS: dict[str, tuple[float, float]] = {
    # name: (achieved dense bf16 matmul TFLOP/s, achieved HBM copy TB/s).
    # h200: copy measured here (docs/DESIGN.md §6), matmul from the device notes (~790).
    # h100/h800 share a die; their HBM3 runs at ~3.35 TB/s peak, ~2.9 achieved.
    "h200": (790.0, 4.27),
    "h100": (700.0, 2.9),
    "h800": (700.0, 2.9),
    "cpu": (0.2, 0.02),
}


class HardwareConfig(_Section):
    """One GPU's achieved ceilings: a preset, or explicit figures."""

    preset: str = Field("h800", description="a HARDWARE_PRESETS name")
    matmul_tflops: float | None = Field(
        None, description="achieved dense bf16 matmul TFLOP/s, above 0 and at most 1e5; overrides the preset")
    hbm_tbps: float | None = Field(None, description="achieved HBM TB/s, above 0 and at most 100; overrides the preset")
    memory_gib: float = Field(80.0, description="memory per GPU in GiB, above 0 and at most 4096")
    calibration: str | None = Field(
        None, description="a fitted hardware file, or a bundled fit's name (scheduler/calibrate.py, profile-stages "
        "--fit-hardware): the simulator then prices stages with its measured per-part efficiencies and rates")

    @model_validator(mode="after")
    def _check(self) -> HardwareConfig:
        if self.preset not in HARDWARE_PRESETS:
            raise ConfigError(f"hardware.preset={self.preset!r} is unknown; use one of {sorted(HARDWARE_PRESETS)}")
        if self.calibration is not None:
            from .scheduler.calibrate import read_calibration

            try:
                read_calibration(self.calibration)
            except ValueError as exc:
                raise ConfigError(f"hardware.calibration: {exc}") from None
        for name in ("matmul_tflops", "hbm_tbps", "memory_gib"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ConfigError(f"hardware.{name}={v} is invalid: use a positive number")
        _at_most(self, "hardware", HARDWARE_LIMITS)
        return self

    @property
    def flops(self) -> float:
        """Achieved matmul rate, FLOP/s."""
        t = self.matmul_tflops if self.matmul_tflops is not None else HARDWARE_PRESETS[self.preset][0]
        return t * 1e12

    @property
    def bandwidth(self) -> float:
        """Achieved memory bandwidth, bytes/s."""
        t = self.hbm_tbps if self.hbm_tbps is not None else HARDWARE_PRESETS[self.preset][1]
        return t * 1e12


class RecomputeConfig(_Section):
    """mHC recomputation in blocks of ``block_layers`` consecutive sublayer-pairs (docs/DESIGN.md §4)."""

    enabled: bool = False
    block_layers: int | Literal["auto"] = "auto"
    memory_budget_gib: float | None = None

    @model_validator(mode="after")
    def _check(self) -> RecomputeConfig:
        if isinstance(self.block_layers, int) and self.block_layers < 1:
            raise ConfigError(f"recompute.block_layers={self.block_layers} is invalid: use >= 1 or 'auto'")
        if self.memory_budget_gib is not None and self.memory_budget_gib <= 0:
            raise ConfigError(f"recompute.memory_budget_gib={self.memory_budget_gib} is invalid: use a positive GiB")
        return self


class RunSettings(_Section):
    """Training-loop settings for ``run`` / ``profile``."""

    steps: int = Field(3, description="training steps, 1 to 1e7")
    seed: int = 0
    lr: float = 1e-3
    dtype: Literal["float32", "bfloat16"] = "float32"
    kernels: Literal["auto", "triton", "reference"] = "auto"
    checkpoint_every: int = Field(0, description="save a checkpoint every K steps; 0: never")
    checkpoint_dir: str = "checkpoints"
    timeout_s: float = Field(
        60.0, description="a stuck rank, transfer or cluster.address ends the run after this long; at most 7 days")

    @model_validator(mode="after")
    def _check(self) -> RunSettings:
        _positive(self, "run", "steps", "lr", "timeout_s")
        _at_most(self, "run", RUN_LIMITS)
        if self.checkpoint_every < 0:
            raise ConfigError(f"run.checkpoint_every={self.checkpoint_every} is invalid: use 0 (never) or a step count")
        return self


class ClusterConfig(_Section):
    """Where the Ray workers run."""

    address: str | None = Field(None, description="host:port, ray://host:port or auto; unset: start a local Ray")
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    use_gpus: Literal["auto", "yes", "no"] = "auto"
    # Several ranks on one GPU (fractional Ray GPUs); their messages go through host memory, since
    # NCCL refuses two ranks on one device. auto: only when a one-host cluster has fewer GPUs than ranks.
    share_gpus: Literal["auto", "yes", "no"] = "auto"


class RunConfig(_Section):
    """The whole configuration, one section per concern."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    link: LinkConfig = Field(default_factory=LinkConfig)
    hardware: HardwareConfig = Field(default_factory=HardwareConfig)
    recompute: RecomputeConfig = Field(default_factory=RecomputeConfig)
    run: RunSettings = Field(default_factory=RunSettings)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> RunConfig:
        stages = self.pipeline.stages()
        if _schedule_rules(info) and self.model.layers < stages:
            raise ConfigError(
                f"model.layers={self.model.layers} is fewer than the {stages} pipeline stages of "
                f"{self.pipeline.schedule} on {self.pipeline.ranks} ranks; use model.layers>={stages} or fewer ranks"
            )
        return self

    def tokens_per_microbatch(self) -> int:
        return self.pipeline.microbatch_size * self.model.seq_len


def bundled_presets() -> list[str]:
    """Names of the config files that ship with the package."""
    files = resources.files("dualpipe_mhc.configs").iterdir()
    return sorted(f.name[: -len(".toml")] for f in files if f.name.endswith(".toml"))


def _read_file(source: str | Path) -> dict[str, Any]:
    path = Path(source)
    if not path.exists():
        name = str(source)
        if name in bundled_presets():
            return _parse(resources.files("dualpipe_mhc.configs").joinpath(f"{name}.toml").read_text(), ".toml", name)
        raise ConfigError(f"config {name!r} is neither a file nor a bundled preset; presets: {bundled_presets()}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:  # a directory, no permission
        raise ConfigError(f"config {path} cannot be read: {exc.strerror}; name a .toml, .yaml or .json file") from None
    return _parse(text, path.suffix.lower(), str(path))


def _parse(text: str, suffix: str, origin: str) -> dict[str, Any]:
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"config {origin}: unknown format {suffix!r}; use .toml, .yaml or .json")
    except ConfigError:
        raise
    except Exception as exc:  # parser errors differ per format; all mean the same to the user
        raise ConfigError(f"config {origin} does not parse: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {origin} must hold a table of sections, got {type(data).__name__}")
    return data


def _parse_value(raw: str) -> Any:
    """An override's value: JSON-ish scalars (1, 2.5, true, none, "x") or a bare string."""
    low = raw.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``section.field=value`` applied."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.field=value, e.g. model.streams=4")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2 or parts[0] not in RunConfig.model_fields:
            raise ConfigError(
                f"override key {key!r} is invalid; use section.field with section one of {list(RunConfig.model_fields)}"
            )
        section, field = parts
        current = out.setdefault(section, {})
        if not isinstance(current, dict):
            raise ConfigError(f"config section {section!r} must be a table of fields, got {current!r}")
        out[section] = dict(current)
        out[section][field] = _parse_value(raw)
    return out


def _schedule_rules(info: ValidationInfo) -> bool:
    """Whether ``pipeline.schedule``'s own rules apply: not for a command that sweeps the
    schedules it is asked for and checks each of those itself (``simulate``)."""
    return (info.context or {}).get("schedule_rules", True)


def config_from_dict(data: dict[str, Any], schedule_rules: bool = True) -> RunConfig:
    """Validate a plain dict into a RunConfig, turning pydantic's report into one line.

    ``schedule_rules=False`` leaves out the rules of ``pipeline.schedule`` (micro-batch count
    and ranks it can take, layers per stage) for a caller that checks the schedules it runs.
    """
    try:
        return RunConfig.model_validate(data, context={"schedule_rules": schedule_rules})
    except ValidationError as exc:
        raise ConfigError(_one_line(exc)) from None


def _one_line(exc: ValidationError) -> str:
    err = exc.errors()[0]
    ctx_error = (err.get("ctx") or {}).get("error")
    if isinstance(ctx_error, ConfigError):
        return str(ctx_error)
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        section = err["loc"][0] if len(err["loc"]) > 1 else None
        fields = (
            list(RunConfig.model_fields[section].annotation.model_fields)
            if section in RunConfig.model_fields
            else list(RunConfig.model_fields)
        )
        return f"{loc} is not a config field; valid here: {fields}"
    return f"{loc}={err.get('input')!r} is invalid: {err['msg'].removeprefix('Value error, ')}"


def load_config(
    source: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), schedule_rules: bool = True
) -> RunConfig:
    """File (or bundled preset name) + ``section.field=value`` overrides -> validated RunConfig.

    With ``source=None`` the defaults apply: a tiny mHC model that trains on a CPU.
    ``schedule_rules``: see :func:`config_from_dict`.
    """
    data = _read_file(source) if source is not None else {}
    return config_from_dict(apply_overrides(data, overrides), schedule_rules)


def dump_config(cfg: RunConfig) -> dict[str, Any]:
    """Plain-dict form, suitable for JSON reports and re-loading."""
    return cfg.model_dump(mode="json")
