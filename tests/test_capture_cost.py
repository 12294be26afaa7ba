"""Capture that costs less: per-side step windows (SeeDiff's `refine_steps`), the store handing out
views of its accumulators (not copies), and the capture time the store measures."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from maskmill.capture import CaptureConfig
from maskmill.extractors.seediff import SeeDiffExtractor

from test_capture import run_capture


def test_a_side_window_records_that_side_only_in_its_steps(sd1_pipe):
    steps = 4
    images_all, everything = run_capture(sd1_pipe, CaptureConfig(), steps=steps)
    images_late, late_16 = run_capture(sd1_pipe, CaptureConfig(side_steps={16: (0.5, 1.0)}), steps=steps)
    _, late_all = run_capture(sd1_pipe, CaptureConfig(steps=(0.5, 1.0)), steps=steps)
    assert all(np.array_equal(a, b) for a, b in zip(images_all, images_late))  # capture never changes images
    assert late_16.self_count[16] * 2 == everything.self_count[16]
    assert late_16.self_count[8] == everything.self_count[8]  # other sides keep the whole window
    a, b, c = late_16.results(), late_all.results(), everything.results()
    for s_late, s_window, s_all in zip(a, b, c):
        assert torch.equal(s_late.self_attn[16], s_window.self_attn[16])
        assert torch.equal(s_late.self_attn[8], s_all.self_attn[8])
        assert not torch.equal(s_late.self_attn[16], s_all.self_attn[16])


def test_seediff_refine_steps_narrow_only_the_refinement_sides(sd1_pipe):
    latent = (16, 16)
    config = SeeDiffExtractor(seed_side=8, refine_steps=(0.7, 1.0)).capture_config(sd1_pipe.unet, latent)
    assert config.side_steps == {16: (0.7, 1.0)} and config.steps == (0.0, 1.0)
    assert SeeDiffExtractor(seed_side=8).capture_config(sd1_pipe.unet, latent).side_steps is None
    with pytest.raises(ValueError, match=r"refine_steps must be \[start, end\) fractions"):
        SeeDiffExtractor(refine_steps=(0.8, 0.2))


def test_results_are_views_of_the_store_and_can_be_taken_once(sd1_pipe):
    _, store = run_capture(sd1_pipe, CaptureConfig(), steps=2)
    samples = store.results()
    for b, sample in enumerate(samples):
        assert sample.self_attn[16].data_ptr() == store.self_attn[16][b].data_ptr()  # no copy of the store
        assert torch.allclose(sample.self_attn[16].sum(-1), torch.ones(256), atol=1e-4)  # averaged rows
    assert store.seconds > 0
    with pytest.raises(RuntimeError, match="already called"):
        store.results()
