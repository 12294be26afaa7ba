"""mIoU of a segmenter on a labelled folder in the mmsegmentation custom-dataset layout.

    DIR/images/NAME.png   RGB image
    DIR/masks/NAME.png    single-channel PNG: 0 background, k class k, 255 ignore
    DIR/classes.json      names of ids 1..K (as a maskmill run's), or of ids 0..K when it starts
                          with "background" (a converted VOC val)

The folder's classes are matched to the model's by name.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..shards.records import IGNORE
from .model import BACKGROUND, model_classes, predict


def read_folder_classes(root: Path) -> list[str]:
    names = json.loads((Path(root) / "classes.json").read_text())
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{root}/classes.json: expected a JSON list of class names")
    return names[1:] if names and names[0] == BACKGROUND else names


def read_labelled_folder(root: str | Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images uint8 (N, H, W, 3), masks uint8 (N, H, W), class names of ids 1..K)."""
    root = Path(root)
    missing = [p for p in ("images", "masks", "classes.json") if not (root / p).exists()]
    if missing:
        raise FileNotFoundError(f"{root}: not a labelled folder (missing {', '.join(missing)})")
    classes = read_folder_classes(root)
    names = sorted(p.stem for p in (root / "masks").glob("*.png"))
    if not names:
        raise FileNotFoundError(f"{root}/masks: no PNG masks")
    images, masks = [], []
    for name in names:
        img = root / "images" / f"{name}.png"
        if not img.is_file():
            raise FileNotFoundError(f"{img}: image missing for mask {name}.png")
        with Image.open(root / "masks" / f"{name}.png") as m:
            if m.mode not in ("L", "P"):
                raise ValueError(f"{root}/masks/{name}.png: mask must be single-channel, got mode {m.mode}")
            masks.append(np.asarray(m).copy())
        with Image.open(img) as im:
            images.append(np.asarray(im.convert("RGB")).copy())
    return np.stack(images), np.stack(masks), classes


def relabel(masks: np.ndarray, classes: list[str], target: list[str]) -> np.ndarray:
    """Masks in `classes` ids -> `target` ids by name (0 and 255 kept)."""
    missing = [n for n in classes if n not in target]
    if missing:
        raise ValueError(f"classes {missing} of the data are not in the model's label space {target}")
    table = np.full(256, IGNORE, np.uint8)
    table[0] = 0
    for k, n in enumerate(classes):
        table[k + 1] = target.index(n) + 1
    return table[masks]


def confusion_matrix(pred: torch.Tensor, truth: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(truth, prediction) pixel counts, pixels whose truth is 255 left out (torchmetrics)."""
    from torchmetrics.functional.classification import multiclass_confusion_matrix

    return multiclass_confusion_matrix(pred.flatten(), truth.flatten(), num_classes, ignore_index=IGNORE)


def iou_from_confusion(cm: torch.Tensor, names: list[str]) -> dict:
    """Per-class IoU (None when a class is in neither truth nor prediction) and their mean."""
    cm = cm.double()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    per_class = {n: (float(tp[i] / union[i]) if union[i] > 0 else None) for i, n in enumerate(names)}
    present = [v for v in per_class.values() if v is not None]
    return {"miou": float(np.mean(present)) if present else float("nan"), "per_class_iou": per_class,
            "pixel_accuracy": float(tp.sum() / cm.sum()) if cm.sum() > 0 else float("nan")}


def evaluate_arrays(model, images: np.ndarray, masks: np.ndarray, classes: list[str]) -> dict:
    """mIoU etc. of `model` on uint8 images (N, H, W, 3) with masks in `classes` ids."""
    target = model_classes(model)
    truth = torch.from_numpy(relabel(masks, classes, target).astype(np.int64))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    pred = predict(model, x)
    names = [BACKGROUND, *target]
    out = iou_from_confusion(confusion_matrix(pred, truth, len(names)), names)
    out["images"] = len(images)
    return out


def evaluate_folder(model, root: str | Path) -> dict:
    images, masks, classes = read_labelled_folder(root)
    return evaluate_arrays(model, images, masks, classes)
