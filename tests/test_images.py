"""Every PIL mode that carries an image reads as the right 8-bit RGB; the rest are refused in one line."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from maskmill.images import ImageModeError, fit_max_side, labels_to_size, read_rgb, to_rgb

RAMP8 = np.arange(0, 256, 17, dtype=np.uint8).reshape(4, 4)  # 0, 17, ..., 255


def test_16_bit_png_is_scaled_not_saturated(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray((RAMP8.astype(np.uint16) * 257)).save(path)  # 16-bit PNG, full 0..65535 range
    rgb = read_rgb(path)
    assert rgb.dtype == np.uint8 and rgb.shape == (4, 4, 3)
    np.testing.assert_array_equal(rgb[..., 0], RAMP8)  # convert("RGB") would give 255 almost everywhere
    assert np.array_equal(rgb[..., 0], rgb[..., 2])


@pytest.mark.parametrize("make", [
    lambda: Image.fromarray(RAMP8.astype(np.int32), mode="I"),             # 32-bit ints holding 8-bit values
    lambda: Image.fromarray(RAMP8.astype(np.int32) * 257, mode="I"),       # ... holding 16-bit values
    lambda: Image.fromarray(RAMP8.astype(np.float32) / 255, mode="F"),     # floats in 0..1
    lambda: Image.fromarray(RAMP8.astype(np.float32), mode="F"),           # floats in 0..255
    lambda: Image.fromarray(RAMP8, mode="L").convert("P"),
    lambda: Image.fromarray(RAMP8, mode="L").convert("LA"),
    lambda: Image.fromarray(RAMP8, mode="L").convert("1", dither=Image.Dither.NONE),
], ids=["I8", "I16", "F01", "F255", "P", "LA", "1"])
def test_greyscale_modes_read_as_their_grey_levels(make):
    im = make()
    rgb = to_rgb(im)
    expect = RAMP8 if im.mode != "1" else np.where(RAMP8 >= 128, 255, 0)
    assert rgb.dtype == np.uint8 and rgb.shape == (4, 4, 3)
    np.testing.assert_allclose(rgb[..., 1].astype(int), expect.astype(int), atol=1)


def test_cmyk_reads_as_rgb():
    im = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # no cyan, full magenta and yellow: red
    np.testing.assert_array_equal(to_rgb(im)[0, 0], [255, 0, 0])


@pytest.mark.parametrize("im, words", [
    (Image.fromarray(np.array([[-1, 5]], dtype=np.int32), mode="I"), "negative"),
    (Image.fromarray(np.array([[np.nan, 0.5]], dtype=np.float32), mode="F"), "NaN"),
])
def test_unreadable_ranges_are_refused_in_one_line(im, words):
    with pytest.raises(ImageModeError, match=words) as e:
        to_rgb(im)
    assert "\n" not in str(e.value)


def test_fit_max_side_keeps_aspect_and_labels_go_back_to_input_size():
    big = np.zeros((300, 400, 3), np.uint8)
    small = fit_max_side(big, 100)
    assert small.shape == (75, 100, 3)
    assert fit_max_side(big, 400) is big
    labels = np.zeros((75, 100), np.uint8)
    labels[:, 50:] = 3
    back = labels_to_size(labels, 300, 400)
    assert back.shape == (300, 400) and set(np.unique(back)) == {0, 3}  # nearest: no blended label values
    assert back[0, 199] == 0 and back[0, 201] == 3
