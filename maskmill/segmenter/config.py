"""The one validated settings object of a segmenter training job."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class SegmenterSize(BaseModel):
    """SegFormer (MiT) encoder/decoder sizes. The default is small for the 32 px shapes world:
    stride 2 everywhere (not 4 first) so a 32 px image still gets 16 x 16 logits."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    hidden_sizes: tuple[int, int, int, int] = (16, 32, 64, 128)
    depths: tuple[int, int, int, int] = (1, 1, 1, 1)
    num_attention_heads: tuple[int, int, int, int] = (1, 2, 4, 8)
    sr_ratios: tuple[int, int, int, int] = (4, 2, 1, 1)
    strides: tuple[int, int, int, int] = (2, 2, 2, 2)
    patch_sizes: tuple[int, int, int, int] = (3, 3, 3, 3)
    mlp_ratios: tuple[int, int, int, int] = (2, 2, 2, 2)
    decoder_hidden_size: int = 64


class TrainConfig(BaseModel):
    """Everything `train-segmenter` needs; checked before any data is read."""

    model_config = ConfigDict(extra="forbid")
    data: list[Path] = Field(min_length=1)  # run folders
    out: Path
    val: Path | None = None  # labelled folder (images/, masks/, classes.json)
    classes: list[str] | None = None  # label space; default: union of the runs' class names
    init: str | None = None  # local checkpoint folder (from_pretrained, offline); None: config-initialised
    size: SegmenterSize = SegmenterSize()
    # steps, batch, lr and crop: chosen for the shapes world on its tune split (docs/downstream.md); 600
    # steps learnt the background but not the shapes (shape IoU near chance), 1500 steps learn them
    steps: int = Field(1500, gt=0)
    batch_size: int = Field(8, gt=0)
    lr: float = Field(4e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    schedule: Literal["poly", "cosine"] = "poly"
    warmup: float = Field(0.05, ge=0, lt=1)  # fraction of the steps with a linear warm-up
    crop_size: int = Field(32, gt=0)  # random-resized-crop output side = training resolution
    # area fraction of the crop; smaller crops cut shapes (a cut star is no star) and were worse on tune
    crop_scale: tuple[float, float] = (1.0, 1.0)
    flip: bool = True
    shuffle: int = Field(512, ge=0)  # sample shuffle buffer
    workers: int = Field(0, ge=0)  # DataLoader workers
    seed: int = 0
    progress: bool = True

    @field_validator("data")
    @classmethod
    def _runs_exist(cls, v: list[Path]) -> list[Path]:
        for run in v:
            if not (Path(run) / "classes.json").is_file():
                raise ValueError(f"{run}: not a maskmill run (no classes.json)")
        return v

    @field_validator("val")
    @classmethod
    def _val_layout(cls, v: Path | None) -> Path | None:
        if v is not None:
            missing = [p for p in ("images", "masks", "classes.json") if not (Path(v) / p).exists()]
            if missing:
                raise ValueError(f"{v}: not a labelled folder (missing {', '.join(missing)})")
        return v

    @field_validator("init")
    @classmethod
    def _init_local(cls, v: str | None) -> str | None:
        if v is not None and not (Path(v) / "config.json").is_file():
            raise ValueError(f"--init {v}: no config.json there (only local checkpoints load, offline)")
        return v

    @property
    def warmup_steps(self) -> int:
        return int(self.warmup * self.steps)

    @model_validator(mode="after")
    def _ranges(self) -> "TrainConfig":
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        return self
