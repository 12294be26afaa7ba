"""The deterministic plan of a run: which sample every global index is.

A sample's classes, prompt and seed follow from the config and its global index only, never
from the worker or GPU that makes it. Shard s owns a fixed range of candidate indices
[s * stride, (s + 1) * stride): it takes them in order until it has its quota of accepted
samples, so rejected samples are made up from further indices, deterministically, and shards
stay independent (any worker can make any shard, resume redoes only unfinished ones).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .config import RunConfig
from .prompts import Prompt, PromptSet, load_prompt_set, sample_prompt
from .shards.records import key_digits, sample_key


@dataclass(frozen=True)
class PlannedSample:
    index: int          # global candidate index
    shard_id: int
    key: str
    prompt: Prompt
    seed: int

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.prompt.classes]


class RunPlan:
    def __init__(self, cfg: RunConfig, prompt_set: PromptSet | None = None):
        self.cfg = cfg
        self.prompt_set = prompt_set or load_prompt_set(cfg.prompts)
        if self.prompt_set.max_classes < max(cfg.classes_per_image):
            raise ValueError(f"prompt set {self.prompt_set.name!r} has templates for at most "
                             f"{self.prompt_set.max_classes} classes; classes_per_image asks for "
                             f"{max(cfg.classes_per_image)}")

    @property
    def total(self) -> int:
        return self.cfg.total_samples

    @property
    def num_shards(self) -> int:
        return math.ceil(self.total / self.cfg.shard_size)

    @cached_property
    def stride(self) -> int:
        """Candidate indices reserved per shard."""
        return math.ceil(self.cfg.shard_size * self.cfg.filter.max_retries_factor)

    def quota(self, shard_id: int) -> int:
        """Accepted samples shard `shard_id` must hold (the last shard holds the remainder)."""
        if not 0 <= shard_id < self.num_shards:
            raise ValueError(f"shard {shard_id} is outside this run's {self.num_shards} shards")
        return min(self.cfg.shard_size, self.total - shard_id * self.cfg.shard_size)

    def class_ids(self) -> dict[str, int]:
        """Run class ids: 1-based positions in `classes` (0 is background, 255 ignore)."""
        return {name: i + 1 for i, name in enumerate(self.cfg.classes)}

    def sample(self, index: int) -> PlannedSample:
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, index])
        counts = sorted(cfg.classes_per_image)
        weights = np.array([cfg.classes_per_image[c] for c in counts], dtype=float)
        n = counts[int(rng.choice(len(counts), p=weights / weights.sum()))]
        # The first class cycles through the list so classes stay balanced; the others are random.
        first = cfg.classes[index % len(cfg.classes)]
        others = [c for c in cfg.classes if c != first]
        picked = [first] + [others[i] for i in rng.choice(len(others), size=n - 1, replace=False)] if n > 1 else [first]
        prompt = sample_prompt(self.prompt_set, picked, rng)
        shard_id, j = divmod(index, self.stride)
        return PlannedSample(index=index, shard_id=shard_id, key=sample_key(shard_id, j, key_digits(self.stride)),
                             prompt=prompt, seed=int(rng.integers(0, 2**31 - 1)))

    def candidates(self, shard_id: int, start: int = 0):
        """Candidate samples of one shard, in order, from its `start`-th on."""
        base = shard_id * self.stride
        for j in range(start, self.stride):
            yield self.sample(base + j)
