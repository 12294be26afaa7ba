"""A run, described by one YAML file in `configs/` and validated before any work starts.

    cfg = load_config("configs/shapes.yaml", overrides=["steps=10", "classes=[circle,star]"])

Unknown keys, wrong types, negative counts, empty class lists, prompt templates without a
class slot and missing model paths are refused with a message naming the key.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

from .models import (EMBEDDED_CLIP_TEMPLATE, SCHEDULERS, ModelNotFoundError, check_class_template, load_tokenizer,
                     resolve_model)
from .prompts import PromptSetError, load_prompt_set
from .tokens import ClassNotInPromptError, check_seed_phrases

_SAFE_CLASS = r"^[A-Za-z0-9][A-Za-z0-9 _\-']*$"


class ConfigError(ValueError):
    pass


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, validate_assignment=True)


class ExtractorConfig(_Strict):
    name: str = "seediff"
    params: dict[str, Any] = Field(default_factory=dict)


class ClipCheckConfig(BaseModel):
    """`filter.clip` of a run: off unless a CLIP model is given."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="local CLIP weight file or folder, or an embedded name (shapes-clip)")
    min_margin: float = Field(0.0, ge=-2, le=2,
                              description="own-class cosine similarity minus the best other prompt's must be >= this")
    action: Literal["reject", "ignore"] = "reject"
    template: str = Field(EMBEDDED_CLIP_TEMPLATE, description="prompt of a class; {} is its name")
    background_prompt: str = "background"
    box_margin: float = Field(0.1, ge=0, le=1, description="extra context around the mask's box, as a fraction")
    batch_size: int = Field(64, ge=1)

    @field_validator("template")
    @classmethod
    def _one_slot(cls, v: str) -> str:
        return check_class_template(v)


class FilterConfig(_Strict):
    min_confidence: float = Field(0.3, ge=0, le=1)
    min_area: float = Field(0.002, ge=0, le=1, description="smallest fraction of the image a class must cover")
    max_area: float = Field(0.95, gt=0, le=1)
    max_retries_factor: float = Field(2.0, ge=1, description="plan at most this many indices per requested sample")
    clip: ClipCheckConfig | None = Field(None, description="CLIP check of each class's masked region; off if unset")


class RunConfig(_Strict):
    classes: list[str] = Field(min_length=1)
    stuff_classes: list[str] = Field(default_factory=list)
    prompts: str = "photo"
    classes_per_image: dict[int, float] = Field(default_factory=lambda: {1: 1.0})
    images_per_class: PositiveInt = 8
    model: str = "shapes-sd"
    scheduler: Literal[tuple(SCHEDULERS)] = "ddim"  # type: ignore[valid-type]
    steps: PositiveInt = 25
    guidance: float = Field(4.0, ge=0)
    height: PositiveInt = 32
    width: PositiveInt = 32
    batch_size: PositiveInt = 8
    seed: int = Field(0, ge=0)
    extractor: ExtractorConfig = Field(default_factory=ExtractorConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    shard_size: PositiveInt = 256
    image_format: Literal["png", "jpg"] = "png"
    # Generate the next batch on a thread of its own while this one is extracted and written
    # (same bytes either way). auto: on when the pipeline runs on a GPU; on a CPU both threads share
    # the cores (and Python's lock), and serial is faster (benchmarks/bench_overlap.py).
    overlap: Literal["auto", "on", "off"] = "auto"
    output: str = "outputs/run"
    # The images are the generating model's output, so its licence binds them: the dataset card's
    # `license` (a Hugging Face licence id, e.g. creativeml-openrail-m for SD 1.5; "other" if none fits).
    license: str = Field("other", min_length=1, description="licence id written into the dataset card")

    @field_validator("classes")
    @classmethod
    def _classes(cls, v: list[str]) -> list[str]:
        import re

        for name in v:
            if not re.match(_SAFE_CLASS, name):
                raise ValueError(f"class name {name!r} must be letters, digits, spaces, '-', '_' or \"'\"")
        if len(set(v)) != len(v):
            raise ValueError(f"class names repeat: {v}")
        return v

    @field_validator("classes_per_image")
    @classmethod
    def _cpi(cls, v: dict[int, float]) -> dict[int, float]:
        if not v or any(k < 1 for k in v) or any(w < 0 for w in v.values()) or sum(v.values()) <= 0:
            raise ValueError("needs keys >= 1 (classes in one image) with non-negative weights, not all zero")
        return v

    @field_validator("overlap", mode="before")
    @classmethod
    def _overlap_words(cls, v: Any) -> Any:
        """YAML reads a bare on/off as true/false: take them as the words they were."""
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v

    @field_validator("height", "width")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"must be a multiple of 8, got {v}")
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> "RunConfig":
        unknown = set(self.stuff_classes) - set(self.classes)
        if unknown:
            raise ValueError(f"stuff_classes {sorted(unknown)} are not in classes")
        if max(self.classes_per_image) > len(self.classes):
            raise ValueError(f"classes_per_image asks for {max(self.classes_per_image)} classes in one image "
                             f"but only {len(self.classes)} classes are given")
        return self

    @property
    def total_samples(self) -> int:
        return self.images_per_class * len(self.classes)

    def fingerprint(self) -> str:
        """Identity of what a run produces: everything but the output folder, the batch size, the licence
        and the overlap (none of them changes a byte of a shard)."""
        d = self.model_dump(exclude={"output", "batch_size", "license", "overlap"})
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def format_errors(e: ValidationError, source: str) -> str:
    lines = []
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{source}: key '{key}': {msg}")
    return "\n".join(lines)


def apply_override(data: dict, assignment: str) -> None:
    """`key=value` or `a.b=value`; the value is parsed as YAML (numbers, lists, booleans)."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like key=value")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {assignment!r}: {p!r} is not a section")
    node[parts[-1]] = yaml.safe_load(raw)


def parse_config(data: dict, source: str = "config", check_files: bool = True) -> RunConfig:
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_errors(e, source)) from None
    if check_files:
        try:
            prompt_set = load_prompt_set(cfg.prompts)
        except PromptSetError as e:
            raise ConfigError(f"{source}: key 'prompts': {e}") from None
        counts = sorted(n for n, w in cfg.classes_per_image.items() if w > 0)
        missing = [n for n in counts if not prompt_set.templates_for(n)]
        if missing:
            raise ConfigError(f"{source}: key 'classes_per_image': prompt set {prompt_set.name!r} has no template "
                              f"for {missing[0]} classes in one image")
        try:
            resolve_model(cfg.model)
        except ModelNotFoundError as e:
            raise ConfigError(f"{source}: key 'model': {e}") from None
        from .extractors import get_extractor

        try:
            get_extractor(cfg.extractor.name, **cfg.extractor.params)
        except ValueError as e:
            raise ConfigError(f"{source}: key 'extractor': {e}") from None
        if cfg.filter.clip is not None:
            from .models import ClipNotFoundError, resolve_clip

            try:
                resolve_clip(cfg.filter.clip.model)
            except ClipNotFoundError as e:
                raise ConfigError(f"{source}: key 'filter.clip.model': {e}") from None
        try:
            tokenizer = load_tokenizer(cfg.model)
        except ModelNotFoundError as e:
            raise ConfigError(f"{source}: key 'model': {e}") from None
        try:  # a class the tokenizer would cut off fails every sample: refuse it now
            check_seed_phrases(tokenizer, prompt_set, cfg.classes, counts)
        except ClassNotInPromptError as e:
            raise ConfigError(f"{source}: key 'classes': {e}") from None
        except PromptSetError as e:  # e.g. a 'distinct' slot with fewer values than a template needs
            raise ConfigError(f"{source}: key 'prompts': {e}") from None
    return cfg


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML file (a path, or a URL: a URL run's frozen config.yaml, which
    fan-out slices on other hosts read); ConfigError if it is missing, invalid or not a mapping."""
    from .storage import is_url, read_location

    if is_url(path):
        try:
            text = read_location(path).decode()
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
    else:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        text = path.read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys")
    return data


def load_config(path: str | Path, overrides: list[str] | None = None, check_files: bool = True) -> RunConfig:
    data = read_yaml_mapping(path)
    for o in overrides or []:
        apply_override(data, o)
    return parse_config(data, str(path), check_files)
