"""bench-downstream's pieces that need no diffusion model: the grid, runs written from arrays, the tables."""
from __future__ import annotations

import numpy as np
import pytest

from maskmill.loader import run_dataset
from maskmill.toyworld.bench_downstream import DownstreamConfig, oracle_data, write_run
from maskmill.toyworld.downstream_report import markdown, summary
from maskmill.toyworld.render import SHAPES


def test_grid_runs_small_sizes_for_everyone_first():
    cfg = DownstreamConfig(methods=["oracle", "ceiling", "seediff", "cross"], sizes=[32, 128], big_sizes=[512],
                           clean_sizes=[128])
    cells = cfg.cells()
    assert cells[:4] == [("oracle", 32), ("ceiling", 32), ("seediff", 32), ("cross", 32)]
    assert cells.index(("ceiling_clean", 128)) < cells.index(("oracle", 512))
    assert ("cross", 512) not in cells and len(cells) == len(set(cells))


def test_written_run_reads_back_through_the_loader(tmp_path):
    objects = [[("red", "circle")], [("blue", "star"), ("green", "square")], [("yellow", "triangle")]]
    images, masks = oracle_data(objects)
    assert [sorted(set(np.unique(m)) - {0}) for m in masks] == [[1], [2, 4], [3]]
    write_run(tmp_path / "run", images, masks, list(SHAPES), shard_size=2)
    rows = list(run_dataset([tmp_path / "run"]))
    assert len(rows) == 3
    for (image, mask), im, m in zip(rows, images, masks):
        assert np.array_equal(mask.numpy(), m) and np.array_equal((image * 255).round().byte().permute(1, 2, 0).numpy(), im)


def _run(method, n, seed, plain, hard):
    score = lambda v: {"miou": v, "per_class_iou": {"background": 1.0, "circle": v}}
    return {"method": method, "n": n, "seed": seed, "plain": score(plain), "hard": score(hard)}


def test_summary_gives_mean_std_and_ratios_to_oracle_and_ceiling():
    runs = [_run("oracle", 32, s, 0.8, v) for s, v in enumerate([0.4, 0.5, 0.6])]
    runs += [_run("ceiling", 32, s, 0.8, 0.4) for s in range(3)]
    runs += [_run("seediff", 32, s, 0.4, v) for s, v in enumerate([0.3, 0.5, 0.4])]
    t = summary({"runs": runs})
    assert t["hard"]["oracle"][32]["mean"] == pytest.approx(0.5) and t["hard"]["oracle"][32]["std"] == pytest.approx(0.1)
    assert t["hard"]["seediff"][32]["vs_oracle"] == pytest.approx(0.8)
    assert t["hard"]["seediff"][32]["vs_ceiling"] == pytest.approx(1.0)
    assert t["plain"]["seediff"][32]["vs_oracle"] == pytest.approx(0.5)
    md = markdown({"runs": runs, "settings": {}}, ["oracle", "ceiling", "seediff", "cross"])
    assert "| seediff | 0.400 ± 0.000 (3) |" in md and "| cross |" not in md
