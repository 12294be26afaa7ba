"""How to train the micro SD: one validated config object (`TrainConfig`), YAML in configs/.

    cfg = load_train_config("configs/train/shapes-sd.yaml", overrides=["steps=10"], flags={"out": "/tmp/m"})

Every key is a `python -m maskmill.toyworld.train` option (underscores for dashes, except
`--grounding` -> grounding_weight, `--grounding-pixel` -> pixel_weight); options given on the
command line replace the file's values, `--set key=value` comes last. Bad values and missing
source folders are refused before any scene is rendered.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt

from ..config import ConfigError


class TrainConfig(BaseModel):
    """One training stage: where from (`init_from`, `vae_from`), what to learn, where to save (`out`)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    out: str = Field(description="pipeline folder written (save_pretrained, safetensors)")
    steps: PositiveInt = Field(4000, description="UNet + text encoder steps")
    vae_steps: NonNegativeInt = Field(500, description="VAE steps (stage 1; skipped with vae_from)")
    scenes: PositiveInt = Field(16000, description="rendered training scenes (plus their mirror images)")
    batch: PositiveInt = Field(32, gt=0, description="training batch size (UNet stages)")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate")
    seed: NonNegativeInt = Field(0, description="seed of the rendered scenes, the init and the batches")
    checkpoint_every: NonNegativeInt = Field(1000, description="save into `out` every this many steps (0: never)")
    vae_batch: PositiveInt = Field(32, gt=0, description="training batch size of the VAE stage")
    data_cache: str | None = Field(None, description="npz file: rendered scenes are loaded from it, or saved to it")
    workers: PositiveInt = Field(2, description="processes rendering scenes")
    threads: NonNegativeInt = Field(0, description="torch threads (0 = torch's default)")
    text_layers: NonNegativeInt | None = Field(
        None, description="CLIP text transformer layers (0: embeddings only; default 2, or init_from's own)")
    vae_from: str | None = Field(None, description="a trained VAE folder (or pipeline folder): skip VAE training")
    init_from: str | None = Field(None, description="a pipeline folder: start the UNet and text encoder from it")
    grounding_weight: float = Field(0.0, ge=0, description="cross-attention token grounding loss (0 = off)")
    pixel_weight: float = Field(0.0, ge=0, description="per-pixel grounding loss (0 = off)")
    colour_dropout: float = Field(0.0, ge=0, le=1, description="fraction of captions without their colour words")
    unet_transformer_layers: int | None = Field(
        None, description="transformer blocks per UNet attention (default 1, or init_from's own; more: grown)")

    def check_sources(self) -> None:
        """Refuse missing `init_from` / `vae_from` folders (ConfigError, one line) before any work."""
        if self.init_from is not None:
            missing = [sub for sub in ("unet", "text_encoder") if not (Path(self.init_from) / sub).is_dir()]
            if missing:
                raise ConfigError(f"key 'init_from': {self.init_from} is not a pipeline folder (no {missing[0]}/)")
        if self.vae_from is not None and not Path(self.vae_from).is_dir():
            raise ConfigError(f"key 'vae_from': no folder at {self.vae_from}")


def load_train_config(path: str | Path | None = None, overrides: Iterable[str] = (),
                      flags: Mapping[str, Any] | None = None) -> TrainConfig:
    """The config from a YAML file (optional), command-line flags (None = not given) and key=value overrides."""
    from ..job_config import load_job_config

    return load_job_config(TrainConfig, path, overrides, flags)
