"""A run's dataset card: `RUN/README.md`, a YAML header the Hugging Face hub and `datasets` read,
then a page a person reads.

The header's `configs` points `datasets.load_dataset(RUN)` at the tars (so the folder, not a
glob, loads images and masks), and `dataset_info.features` types every field, with the sample
json's `classes` as a ClassLabel whose ids are the mask values (0 background). Everything else
comes from files the run already has: classes.json, the shards' stats, the frozen config.yaml
and run.json.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from .export import label_metadata
from .shards.layout import RunLayout
from .shards.reader import raw_samples

CARD = "README.md"
DEFAULT_LICENSE = "other"


def _feature(value: Any) -> dict[str, Any]:
    """The `datasets` YAML feature of one JSON value (the first sample's: all samples share keys)."""
    if isinstance(value, bool):
        return {"dtype": "bool"}
    if isinstance(value, int):
        return {"dtype": "int64"}
    if isinstance(value, float):
        return {"dtype": "float64"}
    if isinstance(value, str) or value is None:
        return {"dtype": "string"}
    if isinstance(value, list):
        return {"list": _feature(value[0]) if value else {"dtype": "float64"}}
    if isinstance(value, dict) and value:
        return {"struct": [{"name": k, **_feature(v)} for k, v in value.items()]}
    return {"dtype": "string"}  # an empty mapping: no fields to type; read as its JSON text


def features(layout: RunLayout, names: list[str]) -> list[dict[str, Any]]:
    """Features of the first sample's fields; `json.classes` as a ClassLabel of the mask ids."""
    first = next((s for sid in layout.completed_shards() for s in raw_samples(layout.tar_location(sid))), None)
    if first is None:  # every sample rejected: nothing to type
        return []
    meta = json.loads(first["json"])
    meta_feats = []
    for k, v in meta.items():
        if k == "classes":
            meta_feats.append({"name": k, "list": {"class_label": {"names": {str(i): n for i, n in enumerate(names)}}}})
        else:
            meta_feats.append({"name": k, **_feature(v)})
    image_field = "png" if "png" in first else "jpg"
    return [{"name": "__key__", "dtype": "string"}, {"name": image_field, "dtype": "image"},
            {"name": "mask.png", "dtype": "image"}, {"name": "json", "struct": meta_feats}]


def _totals(layout: RunLayout, n_classes: int) -> dict[str, Any]:
    per_shard, reasons, samples, pixels = [], {}, [0] * (n_classes + 1), [0.0] * (n_classes + 1)
    for sid in layout.completed_shards():
        st = layout.read_stats(sid)
        per_shard.append((st.shard, st.accepted, st.rejected))
        for r, n in st.reasons.items():
            reasons[r] = reasons.get(r, 0) + n
        for cid, cov in st.coverage.items():
            k = int(cid)
            if 0 < k <= n_classes:
                samples[k] += int(cov.get("samples", 0))
                pixels[k] += float(cov.get("mean", 0.0)) * int(cov.get("samples", 0))
    accepted = sum(a for _, a, _ in per_shard)
    share = [p / accepted if accepted else 0.0 for p in pixels]
    return {"per_shard": per_shard, "reasons": reasons, "samples": samples, "share": share, "accepted": accepted,
            "rejected": sum(r for _, _, r in per_shard)}


def _read_yaml(data: bytes | None) -> dict[str, Any]:
    return (yaml.safe_load(data) or {}) if data is not None else {}


def dataset_card(run_dir: str | os.PathLike) -> str:
    """The card's text for the run at `run_dir` (completed shards only)."""
    layout = RunLayout(run_dir)
    classes = layout.read_classes()
    meta = label_metadata(classes)
    cfg = _read_yaml(layout.read_file("config.yaml"))
    run_json = layout.read_file("run.json")
    info = json.loads(run_json) if run_json is not None else {}
    t = _totals(layout, len(classes))
    extractor = cfg.get("extractor") or {}
    header = {
        "license": cfg.get("license") or DEFAULT_LICENSE,
        "task_categories": ["image-segmentation"],
        "tags": ["synthetic", "maskmill", "webdataset", "semantic-segmentation"],
        "pretty_name": f"maskmill run {layout.root.name}",
        "size_categories": ["n<1K" if t["accepted"] < 1000 else "1K<n<10K" if t["accepted"] < 10_000 else "10K<n<100K"
                            if t["accepted"] < 100_000 else "100K<n<1M" if t["accepted"] < 1_000_000 else "n>1M"],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "shards/*.tar"}]}],
        "dataset_info": {"features": features(layout, meta["classes"]) if layout.completed_shards() else []},
    }
    lines = ["---", yaml.safe_dump(header, sort_keys=False).rstrip(), "---", "",
             f"# {layout.root.name}: synthetic segmentation data made by maskmill", "",
             f"{t['accepted']} image + mask pairs in {len(t['per_shard'])} WebDataset shards (`shards/*.tar`), "
             f"generated by `{cfg.get('model', '?')}` from the prompt set `{cfg.get('prompts', '?')}` and labelled "
             f"by the `{extractor.get('name', '?')}` extractor from the UNet's own attention.", "",
             "## Classes", "", "| id | name | colour | samples | pixel share |", "|---|---|---|---|---|"]
    for i, name in enumerate(meta["classes"]):
        colour = "#%02x%02x%02x" % tuple(meta["palette"][i])
        count = "-" if i == 0 else str(t["samples"][i])
        share = "-" if i == 0 else f"{t['share'][i]:.3f}"
        lines.append(f"| {i} | {name} | `{colour}` | {count} | {share} |")
    lines += ["| 255 | ignore | - | - | - |", "",
              "Masks are single-channel PNGs (`mask.png`): 0 background, k the k-th class, 255 uncertain (ignore in "
              "the loss). Samples per class counts the samples whose prompt named it.", "",
              "## How it was made", "",
              f"- model: `{cfg.get('model', '?')}`, weights `{info.get('model_identity', '?')}`; scheduler "
              f"{cfg.get('scheduler', '?')}, {cfg.get('steps', '?')} steps, guidance {cfg.get('guidance', '?')}, "
              f"{cfg.get('width', '?')}x{cfg.get('height', '?')} px",
              f"- extractor: `{extractor.get('name', '?')}` with `{json.dumps(extractor.get('params') or {})}`",
              f"- quality filter: `{json.dumps(cfg.get('filter') or {})}`",
              f"- config fingerprint `{info.get('fingerprint', '?')}` (the full config is `config.yaml`)",
              f"- licence: `{header['license']}`; the generating model's licence binds the images", "",
              f"Rejected while generating: {t['rejected']}"
              + (" (" + ", ".join(f"{r}: {n}" for r, n in sorted(t["reasons"].items(), key=lambda kv: -kv[1])) + ")"
                 if t["reasons"] else "") + "; every planned sample is listed with its status in the manifests.", "",
              "| shard | accepted | rejected |", "|---|---|---|"]
    lines += [f"| {s} | {a} | {r} |" for s, a, r in t["per_shard"]]
    lines += ["", "## Loading it", "", "```python",
              "# maskmill's torch loader: (image float CxHxW, mask long HxW), classes merged by name across runs",
              "from maskmill.loader import run_dataset",
              f"ds = run_dataset([\"{layout.location}\"])", "",
              "# webdataset (decode the mask yourself: .decode('pil') would make it RGB)",
              "import webdataset as wds",
              f"ds = wds.WebDataset(\"{layout.location}/shards/{{{t['per_shard'][0][0] if t['per_shard'] else '00000'}.."
              f"{t['per_shard'][-1][0] if t['per_shard'] else '00000'}}}.tar\")", "",
              "# Hugging Face datasets: this card's header types every field",
              "import datasets",
              f"ds = datasets.load_dataset(\"{layout.location}\", split=\"train\")",
              "```", ""]
    return "\n".join(lines)


def write_dataset_card(run_dir: str | os.PathLike) -> Path | str:
    """Write the card into the run (folder or URL), whole; returns where it went."""
    return RunLayout(run_dir).write_file(CARD, dataset_card(run_dir).encode())
