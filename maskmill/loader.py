"""A torch `IterableDataset` over one or several runs' shards, for training segmenters.

    ds = run_dataset(["outputs/run-a", "outputs/run-b"], shuffle=256, transform=my_joint_transform)
    loader = torch.utils.data.DataLoader(ds, batch_size=16, num_workers=2)
    for image, mask in loader: ...        # image float (B, 3, H, W) in [0, 1], mask long (B, H, W)

Built from webdataset's own stages: the runs' tars form one shard list, which is split by rank
(`split_by_node`: torch.distributed, or the RANK / WORLD_SIZE environment of torchrun and
accelerate) and then by DataLoader worker (`split_by_worker`), so with R ranks x W workers every
sample is read exactly once per epoch as long as there are at least R x W shards (fewer shards
leave some readers idle, never duplicate a sample). Shards and samples are then shuffled.

Runs combine by class *name*: each run's classes.json maps its mask ids (k -> names[k - 1]) to one
label space, by default the union of names in run order. Background 0 and ignore 255 are kept.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
import webdataset as wds

from .shards.reader import decode_image, decode_mask
from .shards.records import IGNORE
from .shards.writer import MASK_FIELD

JointTransform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class RunSource:
    """One run folder: its complete shards' tars and its class names (classes.json)."""

    def __init__(self, root: str | os.PathLike):
        from .shards.layout import RunLayout

        layout = RunLayout(root)  # a folder or a URL (s3://..., see maskmill.storage)
        if not layout.has_classes():
            raise FileNotFoundError(f"{root}: not a maskmill run (no classes.json)")
        self.root = layout.location
        self.classes = layout.read_classes()
        self.tars = [str(layout.tar_location(sid)) for sid in layout.completed_shards()]
        if not self.tars:
            raise FileNotFoundError(f"{root}: the run has no complete shards")


def merged_classes(sources: Sequence[RunSource]) -> list[str]:
    """Union of the runs' class names, in order of first appearance."""
    names: list[str] = []
    for s in sources:
        names += [n for n in s.classes if n not in names]
    return names


def id_lookup(run_classes: list[str], classes: list[str]) -> np.ndarray:
    """uint8 table: run mask id -> merged id (0 -> 0, 255 -> 255, unused ids -> 255)."""
    missing = [n for n in run_classes if n not in classes]
    if missing:
        raise ValueError(f"run classes {missing} are not in the label space {classes}")
    table = np.full(256, IGNORE, dtype=np.uint8)
    table[0] = 0
    for k, name in enumerate(run_classes):
        table[k + 1] = classes.index(name) + 1
    return table


def run_dataset(runs: Sequence[str | os.PathLike], *, classes: list[str] | None = None,
                transform: JointTransform | None = None, with_meta: bool = False, shuffle: int = 0,
                seed: int = 0) -> wds.WebDataset:
    """Samples of `runs` as (image float CxHxW in [0, 1], mask long HxW[, meta dict]).

    classes: the label space (merged id k = classes[k - 1]); default: union of the runs' names.
    transform: applied jointly to (image, mask) after decoding and relabelling.
    shuffle: sample shuffle buffer (0 = tar order, and shards in order too); seed fixes both shuffles.
    """
    if not runs:
        raise ValueError("no runs given")
    sources = [RunSource(r) for r in runs]
    classes = list(classes) if classes is not None else merged_classes(sources)
    tables = {tar: id_lookup(s.classes, classes) for s in sources for tar in s.tars}
    urls = [tar for s in sources for tar in s.tars]

    def to_tensors(sample: dict):
        table = tables[sample["__url__"]]
        image = sample.get("png", sample.get("jpg"))
        image = torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0)
        mask = torch.from_numpy(table[sample[MASK_FIELD]].astype(np.int64))
        if transform is not None:
            image, mask = transform(image, mask)
        return (image, mask, sample["json"]) if with_meta else (image, mask)

    ds = wds.WebDataset(urls, shardshuffle=len(urls) if shuffle else False, seed=seed, empty_check=False,
                        nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker)
    if shuffle:
        ds = ds.shuffle(shuffle, seed=seed)
    ds = ds.decode(wds.handle_extension(MASK_FIELD, decode_mask),  # first: "png" would match it too
                   wds.handle_extension("png jpg jpeg", decode_image),
                   wds.handle_extension("json", lambda b: json.loads(b)))
    ds = ds.map(to_tensors)
    ds.classes = classes  # the label space, for the model's head and the metrics
    return ds
