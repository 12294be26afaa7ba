"""Train a SegFormer on maskmill runs: cross-entropy (ignore 255) on upsampled logits, AdamW with a
poly or cosine schedule, joint flip + random-resized-crop, a tqdm bar with loss and ETA.

Writes OUT/model/ (model.safetensors + config.json), OUT/train_config.json and OUT/metrics.json.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..loader import merged_classes, run_dataset, RunSource
from ..shards.records import IGNORE
from .config import TrainConfig
from .model import build_model, logits_at, save_model
from .transforms import FlipAndResizedCrop


def batches(cfg: TrainConfig, classes: list[str]):
    """Endless training batches: a new shuffle seed every epoch."""
    from torch.utils.data import DataLoader

    augment = FlipAndResizedCrop(cfg.crop_size, cfg.crop_scale, cfg.flip)
    epoch = 0
    while True:
        ds = run_dataset(cfg.data, classes=classes, transform=augment, shuffle=cfg.shuffle, seed=cfg.seed + epoch)
        n = 0
        for images, masks in DataLoader(ds, batch_size=cfg.batch_size, num_workers=cfg.workers):
            n += len(images)
            yield images, masks
        if n == 0:
            raise RuntimeError(f"the runs {[str(r) for r in cfg.data]} hold no samples")
        epoch += 1


def scheduler_for(cfg: TrainConfig, optimizer):
    from transformers import get_cosine_schedule_with_warmup, get_polynomial_decay_schedule_with_warmup

    if cfg.schedule == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.steps)
    return get_polynomial_decay_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.steps, lr_end=0.0, power=0.9)


def train_segmenter(cfg: TrainConfig, log=print) -> dict:
    """Train, save, evaluate on `cfg.val` if given; returns the metrics written to OUT/metrics.json."""
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    classes = cfg.classes or merged_classes([RunSource(r) for r in cfg.data])
    model = build_model(classes, cfg.size, cfg.init).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = scheduler_for(cfg, optimizer)
    losses: list[float] = []
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.steps, desc="train-segmenter", disable=not cfg.progress, dynamic_ncols=True)
    for step, (images, masks) in zip(range(cfg.steps), batches(cfg, classes)):
        logits = logits_at(model, images, masks.shape[-2:])
        loss = F.cross_entropy(logits, masks, ignore_index=IGNORE)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{schedule.get_last_lr()[0]:.1e}")
    bar.close()
    seconds = time.perf_counter() - t0
    out = Path(cfg.out)
    save_model(model.eval(), out / "model")
    (out / "train_config.json").write_text(cfg.model_dump_json(indent=1) + "\n")
    tail = max(1, len(losses) // 10)
    metrics = {"classes": classes, "steps": len(losses), "seconds": round(seconds, 1),
               "loss_first": sum(losses[:tail]) / tail, "loss_last": sum(losses[-tail:]) / tail, "losses": losses}
    if cfg.val is not None:
        from .evaluate import evaluate_folder

        metrics["val"] = evaluate_folder(model, cfg.val)
        log(f"val mIoU {metrics['val']['miou']:.3f} on {metrics['val']['images']} images")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    return metrics
