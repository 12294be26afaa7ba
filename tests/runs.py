"""Run helpers shared by the tests: the tiny random micro SD saved to disk, a tiny shapes-world
run config, and the environment for runner subprocesses."""
from __future__ import annotations

import os
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def save_tiny_pipeline(path: Path, seed: int = 0) -> Path:
    """A random micro SD 1.x pipeline (maskmill.toyworld.build) saved with save_pretrained."""
    from maskmill.toyworld.build import build_pipeline

    build_pipeline(seed).save_pretrained(path)
    return path


def write_config(path: Path, model: Path, output: Path, **changes) -> Path:
    """A tiny shapes-world config: 4 classes, one per image, 32 px, 2 steps, a permissive filter."""
    data = {
        "classes": ["circle", "square", "triangle", "star"], "prompts": "shapes", "classes_per_image": {1: 1.0},
        "images_per_class": 2, "model": str(model), "scheduler": "ddim", "steps": 2, "guidance": 4.0,
        "height": 32, "width": 32, "batch_size": 2, "seed": 0, "extractor": {"name": "seediff", "params": {}},
        "filter": {"min_confidence": 0.0, "min_area": 0.0, "max_area": 1.0, "max_retries_factor": 2.0},
        "shard_size": 2, "image_format": "png", "output": str(output),
    }
    for key, value in changes.items():
        node = data
        *parents, last = key.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env
