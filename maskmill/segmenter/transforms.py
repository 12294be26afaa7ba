"""Joint image/mask augmentation with torch ops only (torchvision does not import beside this torch).

Randomness comes from torch's global generator, which DataLoader seeds per worker.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class FlipAndResizedCrop:
    """Random horizontal flip, then a random crop of `scale` x the area and aspect in
    [3/4, 4/3], resized to `size` (image bilinear, mask nearest so labels and 255 stay exact)."""

    def __init__(self, size: int, scale: tuple[float, float] = (0.5, 1.0), flip: bool = True):
        self.size, self.scale, self.flip = size, scale, flip

    def crop_box(self, h: int, w: int) -> tuple[int, int, int, int]:
        area = h * w * float(torch.empty(1).uniform_(*self.scale))
        ratio = math.exp(float(torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3))))
        ch = min(h, max(1, round(math.sqrt(area / ratio))))
        cw = min(w, max(1, round(math.sqrt(area * ratio))))
        top = int(torch.randint(0, h - ch + 1, (1,)))
        left = int(torch.randint(0, w - cw + 1, (1,)))
        return top, left, ch, cw

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.flip and bool(torch.rand(1) < 0.5):
            image, mask = image.flip(-1), mask.flip(-1)
        top, left, ch, cw = self.crop_box(*mask.shape[-2:])
        image = image[:, top:top + ch, left:left + cw]
        mask = mask[top:top + ch, left:left + cw]
        image = F.interpolate(image[None], size=(self.size, self.size), mode="bilinear", align_corners=False)[0]
        mask = F.interpolate(mask[None, None].float(), size=(self.size, self.size), mode="nearest-exact")[0, 0].long()
        return image, mask
