"""Loading a job's config object (training, bank building) from YAML, with overrides, before any work.

    cfg = load_job_config(TrainConfig, "configs/train/shapes-sd.yaml", overrides=["steps=10"], flags={"out": "x"})

Each job has one pydantic model (`toyworld.train_config.TrainConfig`,
`prototypes.build_config.BankBuildConfig`); a run has `config.RunConfig`. The YAML file gives the
values, `flags` (command-line options; None = not given) replace top-level keys, and `key=value`
overrides (parsed as YAML, dotted keys reach into sections) come last. Unknown keys, wrong types
and out-of-range values are refused as `ConfigError`, one line per problem naming the key.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from .config import ConfigError, apply_override, format_errors, read_yaml_mapping

M = TypeVar("M", bound=BaseModel)


def load_job_config(model: type[M], path: str | Path | None = None, overrides: Iterable[str] = (),
                    flags: Mapping[str, Any] | None = None) -> M:
    """`model` validated from the YAML file at `path` (optional), then `flags`, then `overrides`."""
    data = read_yaml_mapping(path) if path is not None else {}
    data.update({k: v for k, v in (flags or {}).items() if v is not None})
    for assignment in overrides:
        apply_override(data, assignment)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_errors(e, str(path) if path is not None else "options")) from None
