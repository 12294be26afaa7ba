"""Shared fixtures: tiny random Stable Diffusion pipelines in the three layouts maskmill supports.

Every pipeline is a real diffusers pipeline with seeded random weights, small enough that a
32 px, 2-5 step generation takes a fraction of a second on a CPU:

- SD 1.x: the micro SD of `maskmill.toyworld.build` (conv proj_in, DDIM, epsilon prediction);
- SD 2.x: linear projection, per-block head counts, upcast attention, gelu text encoder,
  v-prediction scheduler;
- SDXL: two text encoders (the second with projection), "text_time" added conditioning and
  two transformer layers in the inner block.

Session-scoped pipelines are shared: tests must not change them (use `copy.deepcopy` or a
function-scoped fixture to modify one). Nothing here touches the network.
"""
from __future__ import annotations

import os

import pytest
import torch

# Tests never download: make any accidental hub access fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# One thread: these models are tiny, and on a 2-core machine shared with a background job two
# OpenMP threads spin against it and run 10-100x slower (seen here: 12 s vs 0.15 s per generation).
# MASKMILL_TEST_THREADS=0 keeps torch's default.
if int(os.environ.get("MASKMILL_TEST_THREADS", "1")) > 0:
    torch.set_num_threads(int(os.environ.get("MASKMILL_TEST_THREADS", "1")))

# Prefect configures its console log handlers on first import, bound to the sys.stderr of that
# moment. A test with `capsys` that first imports Prefect would leave them writing to a closed
# capture file (a RecursionError in Prefect's logging in every later flow test): import it now,
# under pytest's session-long capture.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
from prefect.logging.configuration import setup_logging  # noqa: E402

setup_logging()

PROMPTS = ["a red circle", "a blue square and a green triangle"]
SEEDS = [3, 11]


def _ddim(prediction_type: str = "epsilon"):
    from maskmill.toyworld.build import ddim_scheduler

    return ddim_scheduler(prediction_type=prediction_type)


def _finish(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cpu")


def build_sd1_pipeline(seed: int = 0):
    """SD 1.x layout: the micro SD (32 px images, 16x16 latents, attention at 16 and 8)."""
    from maskmill.toyworld.build import build_pipeline

    return _finish(build_pipeline(seed))


def _tiny_vae():
    from diffusers import AutoencoderKL

    from maskmill.toyworld.build import vae_config

    return AutoencoderKL(**vae_config())


def build_sd2_pipeline(seed: int = 0):
    """SD 2.x layout: linear projection, per-block heads, upcast attention, gelu CLIP, v-prediction."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from maskmill.toyworld.build import clip_tokenizer

    torch.manual_seed(seed)
    hidden = 32
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=hidden, attention_head_dim=(2, 4), use_linear_projection=True,
        upcast_attention=True, norm_num_groups=16,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu", projection_dim=hidden,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    pipe = StableDiffusionPipeline(vae=_tiny_vae(), text_encoder=text_encoder, tokenizer=clip_tokenizer(),
                                   unet=unet, scheduler=_ddim("v_prediction"), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    return _finish(pipe)


def build_sdxl_pipeline(seed: int = 0):
    """SDXL layout: two text encoders, text_time added conditioning, (1, 2) transformer layers per block."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from maskmill.toyworld.build import clip_tokenizer

    torch.manual_seed(seed)
    hidden, time_dim = 32, 8

    def text_cfg():
        return CLIPTextConfig(
            vocab_size=49408, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu", projection_dim=hidden,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)

    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + hidden,  # 6 size/crop ids + pooled text
        cross_attention_dim=2 * hidden, norm_num_groups=16,
    )
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                       beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                       timestep_spacing="leading")
    tok = clip_tokenizer()
    pipe = StableDiffusionXLPipeline(
        vae=_tiny_vae(), text_encoder=CLIPTextModel(text_cfg()), text_encoder_2=CLIPTextModelWithProjection(text_cfg()),
        tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=scheduler, add_watermarker=False)
    return _finish(pipe)


BUILDERS = {"sd1": build_sd1_pipeline, "sd2": build_sd2_pipeline, "sdxl": build_sdxl_pipeline}


@pytest.fixture(scope="session")
def tokenizer():
    from maskmill.toyworld.build import clip_tokenizer

    return clip_tokenizer()


@pytest.fixture(scope="session")
def sd1_pipe():
    return build_sd1_pipeline()


@pytest.fixture(scope="session")
def sd2_pipe():
    return build_sd2_pipeline()


@pytest.fixture(scope="session")
def sdxl_pipe():
    return build_sdxl_pipeline()


@pytest.fixture(scope="session")
def pipes(sd1_pipe, sd2_pipe, sdxl_pipe):
    return {"sd1": sd1_pipe, "sd2": sd2_pipe, "sdxl": sdxl_pipe}


@pytest.fixture(scope="session")
def saved_pipeline(tmp_path_factory, pipes):
    """saved_pipeline(layout) -> folder holding that session pipeline, written once with save_pretrained."""
    folders: dict[str, object] = {}

    def save(layout: str):
        if layout not in folders:
            path = tmp_path_factory.mktemp(f"saved-{layout}")
            pipes[layout].save_pretrained(path, safe_serialization=True)
            folders[layout] = path
        return folders[layout]

    return save


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """The micro SD 1.x pipeline saved to disk: the `model` of run configs (tests/runs.py)."""
    from runs import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd") / "model")


@pytest.fixture(scope="session")
def prefect_api():
    """A Prefect API server for the whole session (telemetry off); yields its URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield PREFECT_API_URL.value()
