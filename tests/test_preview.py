"""The contact sheet: tiles of image + mask overlay, class names beneath, tiny images enlarged."""
from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from maskmill.preview import HATCH, PAD, SHEET_BG, class_color, contact_sheet, overlay
from maskmill.shards import IGNORE, RunLayout, SampleRecord, build_meta, sample_key, write_shard

CLASSES = ["circle", "square"]
SIZE = 32
TILE = 128


def _records(n: int):
    """Grey images; class 1 on the left half-ish, class 2 in a corner, an ignore band between."""
    for i in range(n):
        image = np.full((SIZE, SIZE, 3), 90 + i, np.uint8)
        mask = np.zeros((SIZE, SIZE), np.uint8)
        mask[4:20, 4:14] = 1
        mask[22:30, 22:30] = 2
        mask[4:20, 14:16] = IGNORE
        meta = build_meta(prompt="a circle and a square", seed=i, classes=CLASSES, class_ids=[1, 2], model="toy",
                          extractor="seediff", extractor_params={})
        yield SampleRecord(i, sample_key(0, i, 3), "accepted", image=image, mask=mask, meta=meta)


@pytest.fixture
def run(tmp_path):
    layout = RunLayout(tmp_path / "run").create()
    layout.write_classes(CLASSES)
    write_shard(layout.root, 0, _records(5))
    return layout


def test_overlay_tints_classes_hatches_ignore_and_keeps_background():
    image = np.full((8, 8, 3), 100, np.uint8)
    mask = np.zeros((8, 8), np.uint8)
    mask[:4, :4] = 1
    mask[4:, 4:] = IGNORE
    out = overlay(image, mask)
    assert (out[6, 0] == 100).all()  # background untouched
    inner = out[1, 1].astype(int)
    expected = (np.array(class_color(1)) + 100) / 2
    assert np.abs(inner - expected).max() <= 1  # tinted half-way to the class colour
    assert tuple(out[3, 3]) == class_color(1)  # outline pixel: full class colour
    greys = {tuple(p) for p in out[4:, 4:].reshape(-1, 3)}
    assert greys == set(HATCH)  # ignore: both stripes of the hatch


def test_class_colours_are_distinct():
    colours = [class_color(k) for k in range(1, 60)]
    assert len(set(colours)) == len(colours)


def test_contact_sheet_tiles_upscaled_masks_and_names(run, tmp_path):
    out = contact_sheet(run.root, tmp_path / "sheet.png", max_samples=64, tile=TILE)
    sheet = np.asarray(Image.open(out).convert("RGB"))
    cols = math.ceil(math.sqrt(5))  # 3 columns, 2 rows
    cell_w = TILE + 2 * PAD
    assert sheet.shape[1] == cols * cell_w
    cell_h = sheet.shape[0] // 2
    assert cell_h > TILE + 2 * PAD  # room for the text lines

    # first tile: the 32 px sample enlarged 4x with nearest neighbour, overlay intact
    tile = sheet[PAD:PAD + TILE, PAD:PAD + TILE]
    assert not (tile == SHEET_BG).all(axis=-1).any()  # the whole tile is image
    f = TILE // SIZE
    assert tuple(tile[10 * f + 1, 4 * f]) == class_color(1)  # left outline of class 1, 4 px wide
    assert {tuple(p) for p in tile[10 * f, 14 * f:16 * f]} <= set(HATCH)  # ignore band hatched
    assert (tile[0:4 * f, 0:4 * f] == 90).all()  # background keeps the image's grey

    # text under the tile: the class names drawn in their own colours
    text = sheet[PAD + TILE:cell_h, 0:cell_w].reshape(-1, 3)
    drawn = {tuple(p) for p in text} - {SHEET_BG}
    assert len(drawn) > 10
    for cid in (1, 2):
        target = np.array(class_color(cid))
        assert (np.abs(text.astype(int) - target).sum(1) < 30).sum() > 5, f"no text in class {cid}'s colour"


def test_contact_sheet_respects_max_samples(run, tmp_path):
    out = contact_sheet(run.root, tmp_path / "two.png", max_samples=2, tile=64)
    with Image.open(out) as im:
        assert im.width == 2 * (64 + 2 * PAD)  # ceil(sqrt(2)) = 2 columns, one row


def test_contact_sheet_of_an_empty_run_raises(tmp_path):
    RunLayout(tmp_path).create()
    with pytest.raises(ValueError, match="no samples"):
        contact_sheet(tmp_path, tmp_path / "x.png")
