"""Builders for the micro Stable Diffusion: configs and an offline CLIP tokenizer.

The architecture is the real SD 1.x one, only small: AutoencoderKL (32, 64) -> 16x16x4
latents, CLIPTextModel (hidden 64, 2 layers), UNet2DConditionModel (32, 64) with
cross- and self-attention transformer blocks at 16x16 and 8x8 (head dim 16).
"""
from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

from .render import IMAGE_SIZE

TEXT_HIDDEN = 64


def clip_bpe_path() -> Path:
    """The CLIP BPE vocabulary shipped inside clip-anytorch (no network)."""
    import importlib.util

    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("clip-anytorch is not installed: `pip install --no-deps clip-anytorch`")
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.exists():
        raise RuntimeError(f"CLIP BPE vocabulary not found at {path}")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    # Same table as CLIP's simple_tokenizer: printable stand-ins for every byte.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_clip_tokenizer_files(out_dir: Path) -> Path:
    """Write vocab.json / merges.txt equal to CLIP's 49,408-token BPE."""
    out_dir.mkdir(parents=True, exist_ok=True)
    merges = gzip.open(clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = merges[1 : 49152 - 256 - 2 + 1]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return out_dir


@lru_cache(maxsize=1)
def clip_tokenizer():
    """CLIP's tokenizer, built offline (a transformers CLIPTokenizer)."""
    import tempfile

    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="maskmill-tok-") as d:  # read into memory by __init__
        write_clip_tokenizer_files(Path(d))
        return CLIPTokenizer(str(Path(d) / "vocab.json"), str(Path(d) / "merges.txt"), model_max_length=77)


def vae_config() -> dict:
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=IMAGE_SIZE,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16,
    )


def text_config(layers: int = 2) -> dict:
    return dict(
        vocab_size=49408, hidden_size=TEXT_HIDDEN, intermediate_size=4 * TEXT_HIDDEN, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=TEXT_HIDDEN,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )


def unet_config() -> dict:
    return dict(
        sample_size=IMAGE_SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=(2, 4),  # diffusers' SD1 naming: number of heads -> head dim 16
        norm_num_groups=16,
    )


def build_models(text_layers: int = 2, unet_transformer_layers: int = 1):
    """Fresh (vae, text_encoder, unet) with the micro SD architecture.

    text_layers=0 leaves the CLIPTextModel its token + position embeddings and final norm only:
    no token can summarise the caption, so the UNet must find each word at its own token, which
    is what makes cross-attention localise on a model this small (model card).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    return (
        AutoencoderKL(**vae_config()),
        CLIPTextModel(CLIPTextConfig(**text_config(text_layers))),
        UNet2DConditionModel(**unet_config(), transformer_layers_per_block=unet_transformer_layers),
    )


def ddim_scheduler(**overrides):
    """SD's DDIM sampler (scaled-linear betas), the micro SD's default."""
    from diffusers import DDIMScheduler

    config = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return DDIMScheduler(**{**config, **overrides})


def build_pipeline(seed: int = 0, vae=None, text_encoder=None, unet=None, scheduler=None):
    """A StableDiffusionPipeline of the micro SD: random weights (seeded) unless modules are given."""
    import torch
    from diffusers import StableDiffusionPipeline

    if vae is None or text_encoder is None or unet is None:
        torch.manual_seed(seed)
        fresh = build_models()
        vae, text_encoder, unet = (given if given is not None else new
                                   for given, new in zip((vae, text_encoder, unet), fresh))
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet,
                                   scheduler=scheduler or ddim_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
