"""How to build OVDiff prototype banks: one validated config object (`BankBuildConfig`), YAML in configs/.

    cfg = load_bank_build_config("configs/prototypes/shapes.yaml", overrides=["k_parts=8"])
    spec = cfg.class_spec("circle")   # the JSON build spec of one class: what its cache key covers

Per-class settings (`ClassSettings`) may be given once for all classes and changed for some in
`class_overrides`; a setting left out takes the built-in default (`BUILT_IN`) or, for how support
images are generated (prompts, sampler, extractor, mask filter), the model's own recipe
(`support.support_defaults`: configs/shapes.yaml for the micro model, OVDiff's elsewhere).
`support` is "generate" (OVDiff: generate support images) or a dataset run folder (read them).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, field_validator, model_validator

from ..config import ConfigError, ExtractorConfig, FilterConfig
from .cache import safe_class_dirname

BUILT_IN = {"n_support": 32, "k_parts": 32, "seed": 0, "fg_min_fraction": 0.5, "bg_min_fraction": 0.5,
            "bg_soft_threshold": 0.2}
GENERATE = "generate"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SupportFilter(_Strict):
    """The generated support images' mask filter, as a run's `filter`; None = the model's default."""

    min_confidence: float | None = Field(None, ge=0, le=1)
    min_area: float | None = Field(None, ge=0, le=1)
    max_area: float | None = Field(None, gt=0, le=1)
    max_retries_factor: float | None = Field(None, ge=1)

    def over(self, base: FilterConfig) -> FilterConfig:
        return base.model_copy(update={k: v for k, v in self.model_dump().items() if v is not None})


class ClassSettings(_Strict):
    """How one class's bank is built. None: the config-wide value, else the default (module docstring)."""

    n_support: PositiveInt | None = None
    k_parts: NonNegativeInt | None = None
    seed: NonNegativeInt | None = None
    prompts: str | None = None
    steps: PositiveInt | None = None
    guidance: float | None = Field(None, ge=0)
    extractor: ExtractorConfig | None = None
    filter: SupportFilter | None = None
    bg_soft_threshold: float | None = Field(None, ge=0, le=1)
    fg_min_fraction: float | None = Field(None, gt=0, le=1)
    bg_min_fraction: float | None = Field(None, gt=0, le=1)


class BankBuildConfig(ClassSettings):
    """Banks of `classes` on `model`, cached per class under `cache_root`, merged into `out`."""

    classes: list[str] = Field(min_length=1)
    cache_root: str = "outputs/banks"
    out: str | None = None  # default: <cache_root>/.merged/<hash of the class banks>/bank.safetensors
    model: str = "shapes-sd"
    support: str = GENERATE
    # Classes with no background prototypes ("sky"). None: a support run's own `stuff_classes`
    # (its config.yaml) among `classes`, else none.
    stuff_classes: list[str] | None = None
    timestep: int = Field(200, ge=0, le=999)
    layers: list[str] | None = None  # None: every decoder cross-attention
    feature_size: PositiveInt | None = None  # None: the images' own size
    max_kmeans_points: PositiveInt = 20000
    class_overrides: dict[str, ClassSettings] = Field(default_factory=dict)

    @field_validator("classes")
    @classmethod
    def _distinct_safe_names(cls, v: list[str]) -> list[str]:
        for name in v:
            safe_class_dirname(name)  # refuses separators, '..', empty names
        if len(set(v)) != len(v):
            raise ValueError(f"class names repeat: {v}")
        return v

    @model_validator(mode="after")
    def _known_classes(self) -> "BankBuildConfig":
        for key in ("stuff_classes", "class_overrides"):
            unknown = [c for c in getattr(self, key) or () if c not in self.classes]
            if unknown:
                raise ValueError(f"{key} names {unknown}, which are not in classes {self.classes}")
        return self

    def check_sources(self) -> None:
        """Refuse a missing model or support run (ConfigError, one line) before any work."""
        from ..models import ModelNotFoundError, resolve_model

        try:
            resolve_model(self.model)
        except ModelNotFoundError as e:
            raise ConfigError(f"key 'model': {e}") from None
        if self.support == GENERATE:
            return
        from ..shards import RunLayout

        layout = RunLayout(self.support)  # a folder or a URL
        if not layout.has_classes():
            raise ConfigError(f"key 'support': must be {GENERATE!r} or a dataset run folder; "
                              f"{self.support} has no classes.json")
        missing = [c for c in self.classes if c not in layout.read_classes()]
        if missing:
            raise ConfigError(f"key 'support': classes {missing} are not in run {self.support} "
                              f"(its classes: {layout.read_classes()})")

    def stuff(self) -> list[str]:
        """The stuff classes: given, else those of the support run that are among `classes`."""
        if self.stuff_classes is not None:
            return list(self.stuff_classes)
        if self.support == GENERATE:
            return []
        from ..config import load_config
        from ..run.folder import CONFIG_COPY

        from ..shards import RunLayout

        layout = RunLayout(self.support)
        copy = layout.root / CONFIG_COPY
        run_stuff = (load_config(layout.location_of(copy), check_files=False).stuff_classes
                     if layout.store.isfile(copy) else [])
        return [c for c in self.classes if c in run_stuff]

    def settings_for(self, class_name: str) -> dict[str, Any]:
        """This class's ClassSettings values: its override, else the config's, else BUILT_IN (None: model's)."""
        over = self.class_overrides.get(class_name, ClassSettings())
        out = {}
        for key in ClassSettings.model_fields:
            value = getattr(over, key)
            out[key] = value if value is not None else getattr(self, key)
            if out[key] is None:
                out[key] = BUILT_IN.get(key)
        return out

    def class_spec(self, class_name: str) -> dict:
        """The JSON build spec of one class: everything that changes its bank, and nothing else."""
        from .support import support_defaults

        s = self.settings_for(class_name)
        if self.support == GENERATE:
            d = support_defaults(self.model)
            extractor = s["extractor"] or d.extractor
            rules = (s["filter"] or SupportFilter()).over(d.filter)
            support = {"kind": GENERATE, "prompts": s["prompts"] or d.prompts, "steps": int(s["steps"] or d.steps),
                       "guidance": float(s["guidance"] if s["guidance"] is not None else d.guidance),
                       "seed": int(s["seed"]), "extractor": extractor.model_dump(),
                       "bg_soft_threshold": float(s["bg_soft_threshold"]), "filter": rules.model_dump()}
        else:
            support = {"kind": "run", "run_dir": _run_location(self.support)}
        return {
            "class": class_name,
            "model": self.model,
            "support": support,
            "n_support": int(s["n_support"]),
            "bank": {"k_parts": int(s["k_parts"]), "seed": int(s["seed"]), "stuff": class_name in self.stuff(),
                     "fg_min_fraction": float(s["fg_min_fraction"]), "bg_min_fraction": float(s["bg_min_fraction"]),
                     "max_kmeans_points": int(self.max_kmeans_points)},
            "features": {"name": "sd_query", "layers": list(self.layers) if self.layers else None,
                         "timestep": int(self.timestep), "size": self.feature_size, "noise_seed": 0},
        }


def load_bank_build_config(path: str | Path | None = None, overrides: Iterable[str] = (),
                           flags: Mapping[str, Any] | None = None) -> BankBuildConfig:
    """The config from a YAML file (optional), command-line flags (None = not given) and key=value overrides."""
    from ..job_config import load_job_config

    return load_job_config(BankBuildConfig, path, overrides, flags)


def _names(text: str | None) -> list[str] | None:
    return None if text is None else [c.strip() for c in text.split(",") if c.strip()]


def config_from_namespace(a) -> BankBuildConfig:
    """The bank build config from parsed `add_bank_build_arguments` options (ConfigError if invalid)."""
    flags = {"classes": _names(a.classes), "cache_root": a.cache_root, "model": a.model, "support": a.support,
             "n_support": a.n_support, "k_parts": a.k_parts, "stuff_classes": _names(a.stuff), "out": a.out}
    return load_bank_build_config(a.config, a.set, flags)


def config_from_args(argv: list[str] | None = None, prog: str | None = None) -> BankBuildConfig:
    """The bank build config from `--config` (optional) with the command's options and `--set` applied."""
    import argparse

    from ..prototypes_cli import add_bank_build_arguments

    p = argparse.ArgumentParser(prog=prog, description="Build OVDiff prototype banks (cached per class).")
    add_bank_build_arguments(p)
    return config_from_namespace(p.parse_args(argv))


def _run_location(support: str) -> str:
    """A support run as the cache keys name it: an absolute folder, or its URL as given."""
    from ..storage import is_url, protocol_of

    if is_url(support) and protocol_of(support) != "file":
        return support.rstrip("/")
    return str(Path(support).resolve())
