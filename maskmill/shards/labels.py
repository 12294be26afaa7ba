"""What a run's label ids mean and how they are drawn: names with background and ignore, and the palette.

    label_metadata(["circle", "square"])
    # {"classes": ["background", "circle", "square"], "id2label": {"0": "background", ..., "255": "ignore"},
    #  "palette": [[0, 0, 0], [230, 25, 75], ...], "ignore_index": 255}

One source for classes.json, the dataset card, exports and the contact sheet's overlay colours.
"""
from __future__ import annotations

import colorsys

from .records import IGNORE

# Bright, mutually distinct colours that stay legible as text on the contact sheet's dark background.
_PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (67, 99, 216), (245, 130, 49), (145, 30, 180),
    (66, 212, 244), (240, 50, 230), (191, 239, 69), (250, 190, 212), (70, 153, 144), (220, 190, 255),
    (154, 99, 36), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 216, 177),
]


def class_color(class_id: int) -> tuple[int, int, int]:
    """A fixed colour per class id: the palette first, then golden-ratio hues."""
    if class_id <= len(_PALETTE):
        return _PALETTE[class_id - 1]
    hue = (class_id * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def label_metadata(classes: list[str]) -> dict:
    """Class names with background first, id2label (with the ignore id) and the contact sheet's palette."""
    names = ["background", *classes]
    id2label = {str(i): n for i, n in enumerate(names)}
    id2label[str(IGNORE)] = "ignore"
    palette = [[0, 0, 0]] + [list(class_color(k)) for k in range(1, len(names))]
    return {"classes": names, "id2label": id2label, "palette": palette, "ignore_index": IGNORE}
