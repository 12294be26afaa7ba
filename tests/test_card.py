"""The dataset card: its YAML header types the fields, and `datasets.load_dataset(RUN)` on the folder
gives images and masks (not the manifests) with class names."""
from __future__ import annotations

import json

import numpy as np
import yaml

from maskmill.card import dataset_card, write_dataset_card
from test_shards import CLASSES, make_run


def _header(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_card_header_and_body(tmp_path):
    run = make_run(tmp_path / "run", shards=2, n=8).root
    (run / "config.yaml").write_text(yaml.safe_dump({"model": "toy-sd", "prompts": "shapes", "license": "openrail",
                                                     "extractor": {"name": "seediff", "params": {"seed_side": 8}}}))
    text = dataset_card(run)
    head = _header(text)
    assert head["license"] == "openrail" and head["task_categories"] == ["image-segmentation"]
    assert head["configs"][0]["data_files"][0]["path"] == "shards/*.tar"
    feats = {f["name"]: f for f in head["dataset_info"]["features"]}
    assert feats["png"]["dtype"] == "image" and feats["mask.png"]["dtype"] == "image"
    classes = next(f for f in feats["json"]["struct"] if f["name"] == "classes")
    assert classes["list"]["class_label"]["names"] == {"0": "background", **{str(i + 1): c for i, c in enumerate(CLASSES)}}
    # body: a row per class with its id and palette colour, rejected counts by reason, per shard counts
    # make_records alternates circle/square and rejects every 4th (a square): 8 circles, 4 squares; 12 x 12 px of 32 x 32
    assert "| 1 | circle | `#e6194b` | 8 | 0.094 |" in text and "| 2 | square | `#3cb44b` | 4 | 0.047 |" in text
    assert "| 255 | ignore |" in text
    assert "Rejected while generating: 4 (low confidence: 4)" in text
    assert "| 00000 | 6 | 2 |" in text and "| 00001 | 6 | 2 |" in text
    assert "datasets.load_dataset(" in text and "run_dataset(" in text and "wds.WebDataset(" in text


def test_load_dataset_on_the_run_folder_gives_images_masks_and_class_names(tmp_path):
    import datasets

    run = make_run(tmp_path / "run", shards=2, n=8).root
    write_dataset_card(run)
    ds = datasets.load_dataset(str(run), split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert len(ds) == 12
    row = ds[0]
    mask = np.asarray(row["mask.png"])
    assert mask.ndim == 2 and set(np.unique(mask)) <= {0, 1, 2, 255}
    names = ds.features["json"]["classes"].feature.names
    assert names == ["background", *CLASSES]
    assert names[row["json"]["classes"][0]] == json.loads(json.dumps(row["json"]["prompt"])).split()[-1]
    assert row["json"]["seed"] >= 0 and isinstance(row["json"]["extractor_params"], dict)
