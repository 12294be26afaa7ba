"""PAMR: it pulls a coarse mask onto the image's edges, and streaming over the ring equals stacking it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from maskmill.extractors.pamr import pamr


def stacked_pamr(image, masks, iterations=10, dilations=(1, 2, 4), sigma_scale=0.1):
    """PAMR written the direct way: the whole ring stacked as one (1, C, P, H, W) tensor."""
    def stack(x):
        h, w = x.shape[-2:]
        out = []
        for d in dilations:
            xp = F.pad(x, (d, d, d, d), mode="replicate")
            out += [xp[..., d + dy * d: d + dy * d + h, d + dx * d: d + dx * d + w]
                    for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
        return torch.stack(out, dim=2)

    img = image[None].float()
    nb = stack(img)
    affinity = -(nb - img[:, :, None]).abs() / (nb.std(dim=2, keepdim=True) + 1e-8) / sigma_scale
    weights = affinity.mean(1).softmax(dim=1)
    m = masks[None].float()
    for _ in range(iterations):
        m = (stack(m) * weights[:, None]).sum(2)
    return m[0]


@pytest.mark.parametrize("size", [32, 96])
def test_streaming_the_ring_gives_the_stacked_result(size):
    g = torch.Generator().manual_seed(size)
    image = (torch.rand(3, size, size, generator=g) * 255).round() / 255  # uint8 levels, as generated images
    image[:, : size // 3] = 0.5  # a flat region: spreads of zero must not blow up
    image[0, size // 3: size // 2, :4] += 1 / 255  # and a region of one-level differences
    masks = torch.rand(3, size, size, generator=g).softmax(0)
    ours, ref = pamr(image, masks), stacked_pamr(image, masks)
    assert torch.isfinite(ours).all()
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0)
    assert torch.equal(ours.argmax(0), ref.argmax(0))


def test_a_coarse_mask_snaps_to_the_image_edge():
    """The object fills columns >= 20 of a 40 px image; the coarse mask starts 5 px too early and
    blurs over 6 px: after PAMR it ends at the colour edge."""
    h = w = 40
    image = torch.zeros(3, h, w)
    image[0, :, 20:] = 1.0  # a red object on black
    cols = torch.arange(w, dtype=torch.float32)
    fg = torch.sigmoid((cols - 14) / 2).expand(h, w)
    masks = torch.stack([1 - fg, fg])
    truth = torch.zeros(h, w, dtype=torch.bool)
    truth[:, 20:] = True

    def iou(a, b):
        return float((a & b).sum() / (a | b).sum())

    before = iou(masks.argmax(0) == 1, truth)
    after = iou(pamr(image, masks, iterations=20).argmax(0) == 1, truth)
    assert before < 0.85
    assert after > 0.95
