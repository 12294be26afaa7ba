"""Generation one batch ahead (produce.judged_samples with overlap, batch_feed.BatchFeed): the same
shard bytes as the serial loop, at most two batches of maps alive, errors and early stops handled,
and each shard's time split adding up to its wall time."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import maskmill.produce as produce
from maskmill.config import FilterConfig, load_config
from maskmill.extractors import get_extractor
from maskmill.generate import GenerationSettings
from maskmill.models import load_pipeline
from maskmill.prompts import Prompt, PromptClass
from maskmill.shards.timing import STAGES

from runs import save_tiny_pipeline, write_config

SETTINGS = GenerationSettings(steps=2, guidance=4.0, height=32, width=32)
KEEP_ALL = FilterConfig(min_confidence=0.0, min_area=0.0, max_area=1.0, max_retries_factor=1.0)


@dataclass(frozen=True)
class Shape:
    prompt: Prompt
    seed: int


def shapes(n: int) -> list[Shape]:
    names = ["circle", "square", "triangle", "star"]
    return [Shape(Prompt(f"a red {names[i % 4]}", (PromptClass(names[i % 4], names[i % 4]),)), i) for i in range(n)]


def generating_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "maskmill-generate"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """(config, pipeline): the runner tests' tiny model; 16 samples in shards of 8, batches of 2, and a
    confidence threshold that rejects some samples (so batches after a rejection depend on verdicts)."""
    tmp = tmp_path_factory.mktemp("overlap")
    model = save_tiny_pipeline(tmp / "model")
    path = write_config(tmp / "config.yaml", model, tmp / "out", images_per_class=4, shard_size=8, batch_size=2,
                        filter__min_confidence=0.062)
    cfg = load_config(path)
    return cfg, load_pipeline(cfg.model, cfg.scheduler, "cpu")


def test_overlapped_and_serial_runs_write_the_same_bytes(tiny_run, tmp_path, monkeypatch):
    cfg, pipe = tiny_run
    batches: dict[bool, list[int]] = {True: [], False: []}
    real = produce.generate_with_attention
    for overlap in (False, True):
        def counting(pipe, prompts, *args, overlap=overlap, **kwargs):
            batches[overlap].append(len(prompts))
            return real(pipe, prompts, *args, **kwargs)

        monkeypatch.setattr(produce, "generate_with_attention", counting)
        stats = produce.produce_shard(cfg, 0, pipe, tmp_path / f"overlap-{overlap}", overlap=overlap)
        assert stats.accepted == 8 and stats.rejected > 0  # retries happened: the budget logic was exercised
    assert batches[True] == batches[False]
    for member in ("shards/00000.tar", "manifests/00000.parquet"):
        assert (tmp_path / "overlap-True" / member).read_bytes() == (tmp_path / "overlap-False" / member).read_bytes()


def test_the_generator_runs_ahead_by_one_batch_and_no_further(sd1_pipe, monkeypatch):
    calls = []
    real = produce.generate_with_attention
    monkeypatch.setattr(produce, "generate_with_attention",
                        lambda pipe, prompts, *a, **k: (calls.append(len(prompts)), real(pipe, prompts, *a, **k))[1])
    loop = produce.judged_samples(sd1_pipe, get_extractor("seediff"), shapes(8), 8, SETTINGS, KEEP_ALL, batch_size=2,
                                  overlap=True)
    next(loop)  # holding batch 1: batch 2 is generated meanwhile
    deadline = time.monotonic() + 60
    while len(calls) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(calls) == 2, "the next batch was not generated while this one was being consumed"
    time.sleep(1.0)
    assert len(calls) == 2, "a third batch was started: more than two batches of maps in memory"
    assert len(list(loop)) == 7
    assert calls == [2, 2, 2, 2]
    assert not generating_threads()


def test_a_generation_error_reaches_the_consumer_and_stops_the_thread(sd1_pipe, monkeypatch):
    real = produce.generate_with_attention
    calls = []

    def failing(pipe, prompts, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(pipe, prompts, *a, **k)

    monkeypatch.setattr(produce, "generate_with_attention", failing)
    loop = produce.judged_samples(sd1_pipe, get_extractor("seediff"), shapes(8), 8, SETTINGS, KEEP_ALL, batch_size=2,
                                  overlap=True)
    with pytest.raises(RuntimeError, match="out of memory"):
        list(loop)
    assert not generating_threads()


def test_a_consumer_that_stops_early_stops_the_generator(sd1_pipe):
    loop = produce.judged_samples(sd1_pipe, get_extractor("seediff"), shapes(8), 8, SETTINGS, KEEP_ALL, batch_size=2,
                                  overlap=True)
    next(loop)
    loop.close()  # e.g. the shard writer raised on a bad record
    assert not generating_threads()


@pytest.mark.parametrize("overlap", [False, True])
def test_the_time_split_adds_up_to_the_shard_wall_time(tiny_run, tmp_path, overlap):
    cfg, pipe = tiny_run
    t0 = time.perf_counter()
    stats = produce.produce_shard(cfg, 1, pipe, tmp_path, overlap=overlap)
    wall = time.perf_counter() - t0
    split = stats.time_split
    assert set(split) == {*STAGES, "overlapped", "other"}
    assert all(split[s] > 0 for s in STAGES), split
    total = sum(split[s] for s in STAGES) - split["overlapped"] + split["other"]
    assert total == pytest.approx(stats.seconds, abs=1e-4)
    # the shard's whole time, from before the first generation, not from the first record written
    assert 0.9 * wall <= stats.seconds <= wall
    assert 0 <= split["other"] < 0.25 * stats.seconds, split  # the named stages account for the time
    assert (split["overlapped"] > 0) == overlap
    written = Path(tmp_path, "stats", "00001_stats.json").read_text()
    assert '"time_split"' in written


class _OnDevice:
    def __init__(self, kind: str):
        import torch

        self.device = torch.device(kind)


@pytest.mark.parametrize("setting, kind, ahead", [("auto", "cpu", False), ("auto", "cuda", True), ("auto", "mps", True),
                                                  ("on", "cpu", True), ("off", "cuda", False)])
def test_overlap_auto_runs_ahead_only_on_an_accelerator(setting, kind, ahead):
    assert produce.overlap_for(_OnDevice(kind), setting) is ahead


def test_a_run_on_the_cpu_is_serial_unless_its_config_says_on(tiny_run, tmp_path):
    """The config's `overlap` reaches the shard (auto on a CPU: serial), and it is not part of the
    run's identity: a run folder made with one setting resumes with another."""
    cfg, pipe = tiny_run
    auto = produce.produce_shard(cfg, 0, pipe, tmp_path / "auto")
    on = produce.produce_shard(cfg.model_copy(update={"overlap": "on"}), 0, pipe, tmp_path / "on")
    assert auto.time_split["overlapped"] == 0 and on.time_split["overlapped"] > 0
    assert cfg.model_copy(update={"overlap": "on"}).fingerprint() == cfg.fingerprint()
    with pytest.raises(ValueError, match="overlap"):
        cfg.model_validate({**cfg.model_dump(), "overlap": "sometimes"})


@pytest.mark.parametrize("written, read", [("on", "on"), ("off", "off"), ("auto", "auto"), ("'on'", "on")])
def test_overlap_on_and_off_read_as_words_from_yaml_and_overrides(tmp_path, written, read):
    """YAML 1.1 reads a bare on/off as a boolean: the config takes it as the word."""
    path = tmp_path / "run.yaml"
    path.write_text(f"classes: [circle]\nprompts: shapes\noverlap: {written}\n")
    assert load_config(path, check_files=False).overlap == read
    assert load_config(path, [f"overlap={written}"], check_files=False).overlap == read
