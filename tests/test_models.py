"""Loading pipelines offline: saved folders, the Hugging Face cache layout, SDXL, errors, schedulers."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from maskmill import models
from maskmill.generate import GenerationSettings, generate_plain
from maskmill.models import ModelNotFoundError, load_pipeline

from conftest import PROMPTS, SEEDS

SETTINGS = GenerationSettings(steps=3, guidance=4.0, height=32, width=32)


def fake_hf_cache(root, repo_id: str, folder) -> str:
    """Lay `folder` out as the hub client caches it: models--org--name/{snapshots/<sha>/..., refs/main}."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    return sha


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty, private HF_HUB_CACHE (both the variable and the hub client's constant)."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.mark.parametrize("layout", ["sd1", "sd2"])
def test_a_saved_folder_loads_offline_and_generates_the_same_images(pipes, saved_pipeline, layout):
    from diffusers import StableDiffusionPipeline

    folder = saved_pipeline(layout)
    loaded = load_pipeline(str(folder), device="cpu")
    assert type(loaded) is StableDiffusionPipeline
    assert loaded.unet.dtype.is_floating_point and str(loaded.device) == "cpu"
    assert type(loaded.scheduler) is type(pipes[layout].scheduler)
    assert loaded.scheduler.config.prediction_type == pipes[layout].scheduler.config.prediction_type
    expected = generate_plain(pipes[layout], PROMPTS, SEEDS, SETTINGS)
    got = generate_plain(loaded, PROMPTS, SEEDS, SETTINGS)
    assert all(np.array_equal(a, b) for a, b in zip(expected, got))


def test_a_repo_id_loads_from_the_hugging_face_cache(pipes, saved_pipeline, hf_cache):
    fake_hf_cache(hf_cache, "org/name", saved_pipeline("sd1"))
    assert models.resolve_model("org/name") == "org/name"
    assert models.pipeline_class_name("org/name") == "StableDiffusionPipeline"
    loaded = load_pipeline("org/name", device="cpu")
    expected = generate_plain(pipes["sd1"], PROMPTS[:1], SEEDS[:1], SETTINGS)
    assert np.array_equal(generate_plain(loaded, PROMPTS[:1], SEEDS[:1], SETTINGS)[0], expected[0])
    ident = models.model_identity("org/name")
    assert ident.startswith("files:") and len(ident) == len("files:") + 16
    # the cached snapshot is identified by its content, like the folder it was copied from
    assert ident == models.model_identity(str(saved_pipeline("sd1")))


def test_the_fingerprint_sees_retrained_weights_of_the_same_size(saved_pipeline, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(saved_pipeline("sd1"), folder)
    before = models.model_identity(str(folder))
    assert models.model_identity(str(folder)) == before
    weights = next((folder / "unet").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 8] = bytes(255 - b for b in data[middle:middle + 8])  # same size, same header
    weights.write_bytes(bytes(data))
    assert models.model_identity(str(folder)) != before


def test_the_cache_set_by_the_variable_alone_is_used_for_loading_too(saved_pipeline, tmp_path, monkeypatch):
    """HF_HUB_CACHE set after the hub client was imported: resolving and loading must agree on the folder."""
    cache = tmp_path / "late-cache"
    cache.mkdir()
    fake_hf_cache(cache, "org/late", saved_pipeline("sd1"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    loaded = load_pipeline("org/late", device="cpu")
    assert tuple(loaded.unet.config.block_out_channels) == (32, 64)


def test_sdxl_layout_loads_as_an_sdxl_pipeline(pipes, saved_pipeline):
    from diffusers import StableDiffusionXLPipeline

    loaded = load_pipeline(str(saved_pipeline("sdxl")), device="cpu")
    assert isinstance(loaded, StableDiffusionXLPipeline)
    expected = generate_plain(pipes["sdxl"], PROMPTS[:1], SEEDS[:1], SETTINGS)
    assert np.array_equal(generate_plain(loaded, PROMPTS[:1], SEEDS[:1], SETTINGS)[0], expected[0])


def test_missing_models_say_where_they_were_looked_for_and_how_to_provide_them(tmp_path, hf_cache, monkeypatch):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError) as e:
        load_pipeline(str(missing))
    msg = str(e.value)
    assert str(missing) in msg and "model_index.json" in msg

    with pytest.raises(ModelNotFoundError) as e:
        load_pipeline("org/absent")
    msg = str(e.value)
    assert "org/absent" in msg and str(hf_cache / "models--org--absent") in msg
    assert "huggingface-cli download org/absent" in msg and "save_pretrained" in msg

    monkeypatch.setitem(models.EMBEDDED, "shapes-sd", tmp_path / "assets" / "shapes-sd")
    with pytest.raises(ModelNotFoundError) as e:
        load_pipeline("shapes-sd")
    msg = str(e.value)
    assert str(tmp_path / "assets" / "shapes-sd") in msg and "maskmill.toyworld.train" in msg
    assert isinstance(e.value, FileNotFoundError)  # callers catching the builtin still work


def test_a_folder_without_model_index_is_a_clear_error(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelNotFoundError, match="has no model_index.json") as e:
        load_pipeline(str(tmp_path))
    assert str(tmp_path) in str(e.value) and "save_pretrained" in str(e.value)


def test_unknown_scheduler_is_refused_before_loading(tmp_path):
    with pytest.raises(ValueError, match="unknown scheduler 'karras-magic'") as e:
        load_pipeline(str(tmp_path / "never-read"), scheduler="karras-magic")
    assert "euler" in str(e.value) and "ddim" in str(e.value)


def test_scheduler_name_swaps_the_scheduler_class_and_keeps_its_config(saved_pipeline):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    loaded = load_pipeline(str(saved_pipeline("sd2")), scheduler="euler", device="cpu")
    assert type(loaded.scheduler) is EulerDiscreteScheduler
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    assert loaded.scheduler.config.beta_schedule == "scaled_linear"
    images = generate_plain(loaded, PROMPTS[:1], SEEDS[:1], SETTINGS)
    assert images[0].shape == (32, 32, 3)
    assert type(load_pipeline(str(saved_pipeline("sd2")), scheduler="ddim", device="cpu").scheduler) is DDIMScheduler


def test_a_pipeline_in_memory_is_identified_by_its_weights(pipes):
    import copy

    import torch

    pipe = pipes["sd1"]
    ident = models.model_identity(pipe)
    assert ident.startswith("weights:") and models.model_identity(pipe) == ident
    changed = copy.deepcopy(pipe)
    with torch.no_grad():
        for p in changed.unet.parameters():
            p.add_(0.01)
    assert models.model_identity(changed) != ident
