"""The one generate -> extract -> filter loop (`produce.judged_samples`): shards and support sets judge
samples with the same rules, reasons and retry budget (`filter.max_retries_factor`)."""
from __future__ import annotations

import numpy as np
import pytest

from maskmill.config import FilterConfig
from maskmill.extractors import MaskResult
from maskmill.produce import rejection_reason

RULES = FilterConfig(min_confidence=0.2, min_area=0.0, max_area=0.9, max_retries_factor=1.0)
IMAGE = np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)


def result(labels: np.ndarray, confidence: float) -> MaskResult:
    return MaskResult(labels.astype(np.uint8), np.zeros((1, *labels.shape), np.float32),
                      np.array([confidence], np.float32))


def test_rejection_reasons_name_the_rule_and_the_class():
    half = np.zeros((8, 8))
    half[:4] = 1
    assert rejection_reason(IMAGE, result(half, 0.5), ["circle"], RULES) == ""
    assert rejection_reason(IMAGE, result(half, 0.1), ["circle"], RULES) == "low confidence: circle"
    assert rejection_reason(IMAGE, result(np.ones((8, 8)), 0.5), ["circle"], RULES) == "mask covers the image: circle"
    empty = np.zeros((8, 8))
    assert rejection_reason(IMAGE, result(empty, 0.5), ["circle"], RULES) == ""  # min_area 0 lets it through
    assert rejection_reason(IMAGE, result(empty, 0.5), ["circle"], RULES, require_mask=True) == "empty mask: circle"
    assert rejection_reason(np.full((8, 8, 3), 7, np.uint8), result(half, 0.5), ["circle"], RULES) == "blank image"


def test_support_sets_use_the_shard_loop_and_its_retry_budget(sd1_pipe, monkeypatch):
    import maskmill.produce as produce
    from maskmill.prototypes.support import generate_support

    batches = []
    real = produce.generate_with_attention

    def counting(pipe, prompts, seeds, *args, **kwargs):
        batches.append(len(prompts))
        return real(pipe, prompts, seeds, *args, **kwargs)

    monkeypatch.setattr(produce, "generate_with_attention", counting)
    impossible = FilterConfig(min_confidence=0.0, min_area=1.0, max_area=1.0, max_retries_factor=3.0)
    with pytest.raises(ValueError, match=r"none of 3 generated support images .*'small mask: circle': 3"):
        generate_support(sd1_pipe, "circle", 1, prompts="shapes", steps=2, guidance=4.0, rules=impossible)
    assert batches == [1, 1, 1]  # one image still missing each time, n * max_retries_factor tries in all
