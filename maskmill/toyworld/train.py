"""Train the micro Stable Diffusion on the shapes world.

    # the committed model, on 2 idle CPU cores (the npz caches the rendered scenes; model card):
    # 1. a VAE (1,500 steps, 8 min; this run's 2-layer UNet was stopped at step 4,000 and not kept)
    python -m maskmill.toyworld.train --out /tmp/v2 --steps 4000 --vae-steps 1500 --vae-batch 32 \
        --batch 40 --threads 2 --workers 2 --data-cache /tmp/shapes_train.npz
    # 2. the base: UNet + embeddings-only text encoder on that VAE (7,000 steps, 44 min)
    python -m maskmill.toyworld.train --out /tmp/base --steps 7000 --batch 40 \
        --text-layers 0 --vae-from /tmp/v2 --threads 2 --workers 2 --data-cache /tmp/shapes_train.npz
    # 3. grounded fine-tune: one more text layer, grounding losses, colourless captions (3,000 steps, 25 min)
    python -m maskmill.toyworld.train --out /tmp/grounded --steps 3000 --batch 40 --lr 5e-4 \
        --init-from /tmp/base --vae-from /tmp/base --text-layers 1 --grounding 0.1 --grounding-pixel 0.05 \
        --colour-dropout 0.3 --threads 2 --workers 1 --data-cache /tmp/shapes_train.npz
    # 4. continued at a lower rate with more colourless captions (2,000 steps, 27 min on 1 thread):
    #    configs/train/shapes-sd.yaml holds this stage's options
    python -m maskmill.toyworld.train --config configs/train/shapes-sd.yaml --out maskmill/assets/shapes-sd
    python -m maskmill.toyworld.train --out /tmp/m --steps 5 --vae-steps 5 --scenes 64   # smoke test

Every option is a key of `TrainConfig` (train_config.py); `--config FILE` reads them from YAML,
options given on the command line win, `--set key=value` comes last.

Stage 1 trains the VAE on textured scenes: a VAE that never saw stripes erases them, and the
UNet can only draw what the VAE keeps. Later stages cache latents, then train UNet + text encoder jointly with
epsilon prediction and 10 % caption dropout (for classifier-free guidance); the grounding
losses (`grounding.py`) use the rendered label maps. An npz cache written before label maps
were stored is re-rendered (same scenes) on first use.
The result is saved with `save_pretrained` as safetensors and loads through the same
`from_pretrained` path as any SD checkpoint. Held-out captions never enter training.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..atomic import atomic_save_npz
from . import grounding
from .build import build_models, build_pipeline, clip_tokenizer
from .render import is_held_out, join_phrases, render, sample_scene
from .train_config import TrainConfig, load_train_config


CHUNK = 1000


def _render_chunk(args: tuple[int, int, int]) -> dict:
    seed, chunk, n = args
    rng = np.random.default_rng([seed, chunk])
    images, labels, captions, phrases = [], [], [], []
    while len(images) < n:
        scene = sample_scene(rng)
        if is_held_out(scene.objects):
            continue
        image, label = render(scene)
        images.append(image)
        labels.append(label.astype(np.uint8))
        captions.append(scene.caption)
        phrases.append("|".join(o.phrase for o in scene.objects))  # object k has label k + 1
    return {"images": np.stack(images), "labels": np.stack(labels), "captions": captions, "phrases": phrases}


def render_training_set(n: int, seed: int, workers: int = 2) -> dict[str, np.ndarray]:
    """n scenes skipping held-out captions: images (uint8 N x 32 x 32 x 3), label maps (N x 32 x 32),
    captions, and each scene's object phrases joined by "|" in label order.

    Rendered in chunks seeded by (seed, chunk index), so the set does not depend on `workers`.
    """
    from multiprocessing import Pool

    jobs = [(seed, c, min(CHUNK, n - c * CHUNK)) for c in range((n + CHUNK - 1) // CHUNK)]
    with Pool(workers) as pool:
        parts = pool.map(_render_chunk, jobs)
    data = {k: np.concatenate([p[k] for p in parts]) for k in ("images", "labels")}
    data.update({k: np.array([x for p in parts for x in p[k]]) for k in ("captions", "phrases")})
    return data


DATA_KEYS = ("images", "labels", "captions", "phrases")


def load_training_set(scenes: int, seed: int, workers: int, cache: Path | None) -> dict[str, np.ndarray]:
    """The rendered set, from the npz cache when it holds every key (older caches lack labels) and
    exactly `scenes` scenes; otherwise rendered (same seed: the first scenes are the same) and cached."""
    if cache is not None and cache.exists():
        with np.load(cache) as d:
            if all(k in d for k in DATA_KEYS) and len(d["captions"]) == scenes:
                return {k: d[k] for k in DATA_KEYS}
    # minutes for 16,000+ scenes: say why, or a stale cache looks like a hang
    why = "no cache" if cache is None else f"{cache} missing or stale (no labels, or another scene count)"
    print(f"rendering {scenes} scenes with {workers} workers: {why}", flush=True)
    data = render_training_set(scenes, seed, workers)
    if cache is not None:
        atomic_save_npz(cache, data, compressed=False)
    return data


def grow_text_layers(text_encoder, layers: int | None):
    """Append transformer layers whose residual branches output zero, so the encoder computes
    exactly what it did and training grows the new layers from there."""
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer

    have = text_encoder.config.num_hidden_layers
    layers = have if layers is None else layers
    if layers < have:
        raise ValueError(f"--text-layers {layers} is fewer than the {have} layers of the --init-from text encoder")
    for _ in range(layers - have):
        layer = CLIPEncoderLayer(text_encoder.config)
        for proj in (layer.self_attn.out_proj, layer.mlp.fc2):
            torch.nn.init.zeros_(proj.weight)
            torch.nn.init.zeros_(proj.bias)
        getattr(text_encoder, "text_model", text_encoder).encoder.layers.append(layer)  # transformers 4 vs 5
    text_encoder.config.num_hidden_layers = layers
    return text_encoder


def check_unet_growth(have, layers: int | None) -> None:
    """Refuse a transformer-block count the --init-from UNet (with `have` per attention) cannot grow to."""
    if layers is None or layers == have:
        return
    if layers < 1:
        raise ValueError(f"--unet-transformer-layers {layers}: must be at least 1")
    if not isinstance(have, int) or layers < have:
        raise ValueError(f"--unet-transformer-layers {layers}: the --init-from UNet has {have} per attention "
                         "and can only grow to a larger single count")


def grow_transformer_layers(unet, layers: int | None):
    """A UNet with `layers` transformer blocks per attention, computing exactly what `unet` does.

    Each new block starts as a copy of the attention's first block (its attention maps already
    grounded) with its three residual outputs zeroed; training grows it from there.
    """
    from diffusers import UNet2DConditionModel

    have = unet.config.transformer_layers_per_block
    check_unet_growth(have, layers)
    if layers is None or layers == have:
        return unet
    grown = UNet2DConditionModel.from_config({**unet.config, "transformer_layers_per_block": layers})
    missing, unexpected = grown.load_state_dict(unet.state_dict(), strict=False)
    if unexpected:
        raise ValueError(f"cannot grow this UNet: unexpected weights {unexpected[:3]}")
    for name, blocks in grown.named_modules():
        if not name.endswith("transformer_blocks"):
            continue
        for k in range(have, layers):
            blocks[k].load_state_dict(blocks[0].state_dict())
            for proj in (blocks[k].attn1.to_out[0], blocks[k].attn2.to_out[0], blocks[k].ff.net[2]):
                torch.nn.init.zeros_(proj.weight)
                torch.nn.init.zeros_(proj.bias)
            missing = [m for m in missing if not m.startswith(f"{name}.{k}.")]
    if missing:
        raise ValueError(f"cannot grow this UNet: weights without a source {missing[:3]}")
    return grown


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_vae(vae, images: torch.Tensor, steps: int, batch: int, lr: float, log) -> None:
    opt = torch.optim.AdamW(vae.parameters(), lr=lr)
    g = torch.Generator().manual_seed(1)
    vae.train()
    for step in range(steps):
        idx = torch.randint(0, len(images), (batch,), generator=g)
        x = images[idx]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        kl = post.kl().mean()
        loss = F.mse_loss(rec, x) + 1e-6 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log({"stage": "vae", "step": step, "mse": float(F.mse_loss(rec.detach(), x))})
    vae.eval()


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, len(images), batch):
        d = vae.encode(images[i : i + batch]).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


def train(cfg: TrainConfig) -> dict:
    """Train one stage as `cfg` says; returns the summary also written to `out/training_summary.json`."""
    from diffusers import DDIMScheduler, DDPMScheduler

    cfg.check_sources()  # all refused before rendering or encoding anything
    # short names for the keys the stage below reads most
    steps, batch, seed, text_layers = cfg.steps, cfg.batch, cfg.seed, cfg.text_layers
    init_from, vae_from, unet_layers = cfg.init_from, cfg.vae_from, cfg.unet_transformer_layers
    grounding_weight, pixel_weight, colour_dropout = cfg.grounding_weight, cfg.pixel_weight, cfg.colour_dropout
    if unet_layers is not None:
        check_unet_growth(json.loads((Path(init_from) / "unet" / "config.json").read_text())
                          ["transformer_layers_per_block"] if init_from else 1, unet_layers)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(seed)
    torch.set_flush_denormal(True)  # tiny weights/activations as denormals slowed CPU training several-fold
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    history: list[dict] = []
    t0 = time.time()

    def log(rec: dict) -> None:
        rec["elapsed_s"] = round(time.time() - t0, 1)
        history.append(rec)
        print(json.dumps(rec), flush=True)

    data = load_training_set(cfg.scenes, seed, cfg.workers, Path(cfg.data_cache) if cfg.data_cache else None)
    images = _to_tensor(data["images"])
    images = torch.cat([images, images.flip(-1)])  # all four shapes are mirror-symmetric
    labels = torch.from_numpy(data["labels"]).long()
    labels = torch.cat([labels, labels.flip(-1)])
    captions = [str(c) for c in data["captions"]] * 2
    phrases = [str(p).split("|") for p in data["phrases"]] * 2
    log({"stage": "data", "scenes": len(data["images"])})

    vae, text_encoder, unet = build_models(2 if text_layers is None else text_layers, unet_layers or 1)
    tokenizer = clip_tokenizer()
    if init_from:  # continue from a saved pipeline's UNet and text encoder (e.g. at a lower rate)
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        unet = grow_transformer_layers(
            UNet2DConditionModel.from_pretrained(Path(init_from) / "unet", dtype=torch.float32), unet_layers)
        text_encoder = grow_text_layers(
            CLIPTextModel.from_pretrained(Path(init_from) / "text_encoder", dtype=torch.float32), text_layers)
        log({"stage": "init", "loaded_from": str(init_from), "text_layers": text_encoder.config.num_hidden_layers,
             "unet_transformer_layers": unet.config.transformer_layers_per_block})
    if vae_from:  # reuse a trained VAE (its own folder or a pipeline's vae/ subfolder): stage 1 skipped
        from diffusers import AutoencoderKL

        src = Path(vae_from)
        vae = AutoencoderKL.from_pretrained(src / "vae" if (src / "vae").is_dir() else src, dtype=torch.float32)
        log({"stage": "vae", "loaded_from": str(src)})
    else:
        train_vae(vae, images, cfg.vae_steps, cfg.vae_batch, 1e-3, log)
    mean, std = encode_latents(vae, images)
    scaling = float(1.0 / mean.std())
    vae.register_to_config(scaling_factor=scaling)
    log({"stage": "latents", "scaling_factor": scaling})

    grounded = bool(grounding_weight or pixel_weight)
    # Colourless twins ("a circle and a square"): colours are distinct within a scene, so without
    # them a pixel could find its phrase by colour alone and shape would never need to be seen.
    def token_ids(texts: list[str]) -> torch.Tensor:
        return tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids

    positions = bare_ids = bare_positions = None
    if grounded:
        positions = grounding.object_token_positions(tokenizer, captions, phrases)
    if colour_dropout:
        shapes_only = [[p.split()[-1] for p in objs] for objs in phrases]
        bare = [join_phrases(objs) for objs in shapes_only]
        bare_ids = token_ids(bare)
        if grounded:
            bare_positions = grounding.object_token_positions(tokenizer, bare, shapes_only)
    ids = token_ids(captions)
    empty_ids = token_ids([""])
    noise_sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                beta_start=0.00085, beta_end=0.012)
    alphas = noise_sched.alphas_cumprod
    trainable = torch.nn.ModuleDict({"unet": unet, "text_encoder": text_encoder})
    ema = copy.deepcopy(trainable).requires_grad_(False)
    opt = torch.optim.AdamW(trainable.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 200) * 0.5 * (1 + np.cos(np.pi * min(s, steps) / max(steps, 1))))
    g = torch.Generator().manual_seed(seed + 1)
    probs: list[torch.Tensor] = []
    if grounded:  # after the EMA copy, which keeps diffusers' default processors
        grounding.install(unet, probs)

    def save(tag: str) -> None:
        ema_unet, ema_text = ema["unet"], ema["text_encoder"]
        pipe = build_pipeline(vae=copy.deepcopy(vae), text_encoder=copy.deepcopy(ema_text),
                              unet=copy.deepcopy(ema_unet),
                              scheduler=DDIMScheduler.from_config(noise_sched.config, clip_sample=False,
                                                                  set_alpha_to_one=False, steps_offset=1))
        pipe.to(torch.float16)  # half the bytes on disk; loaders upcast to fp32 on CPU
        pipe.save_pretrained(out, safe_serialization=True)
        (out / "training_log.json").write_text(json.dumps({"tag": tag, "history": history}, indent=1))

    trainable.train()
    for step in range(steps):
        idx = torch.randint(0, len(mean), (batch,), generator=g)
        latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * scaling
        cap = ids[idx].clone()
        pos = positions[idx].clone() if grounded else None
        if colour_dropout:
            plain = torch.rand(batch, generator=g) < colour_dropout
            cap[plain] = bare_ids[idx][plain]
            if grounded:
                pos[plain] = bare_positions[idx][plain]
        drop = torch.rand(batch, generator=g) < 0.1
        cap[drop] = empty_ids
        t = torch.randint(0, 1000, (batch,), generator=g)
        noise = torch.randn(latents.shape, generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        cond = text_encoder(cap)[0]
        probs.clear()
        pred = unet(noisy, t, cond).sample
        mse = F.mse_loss(pred, noise)
        token = pixel = torch.zeros(())
        if grounding_weight:
            token = grounding.token_loss(probs, labels[idx], pos, ~drop)
        if pixel_weight:
            pixel = grounding.pixel_loss(probs, labels[idx], pos, ~drop)
        loss = mse + grounding_weight * token + pixel_weight * pixel
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), trainable.parameters()):
                pe.lerp_(p, 1 - decay)
        if step % 100 == 0 or step == steps - 1:
            log({"stage": "unet", "step": step, "loss": mse.item(), "token_loss": token.item(),
                 "pixel_loss": pixel.item(),
                 "lr": sched.get_last_lr()[0]})
        if cfg.checkpoint_every and step and step % cfg.checkpoint_every == 0:
            save(f"step {step}")
    trainable.eval()
    save("final")
    summary = {"steps": steps, "vae_steps": 0 if vae_from else cfg.vae_steps, "vae_from": vae_from,
               "text_layers": text_encoder.config.num_hidden_layers, "init_from": init_from,
               "grounding_weight": grounding_weight, "pixel_weight": pixel_weight,
               "colour_dropout": colour_dropout, "unet_transformer_layers": unet.config.transformer_layers_per_block,
               "scenes": cfg.scenes, "batch": batch, "lr": cfg.lr, "seed": seed,
               "train_seconds": round(time.time() - t0, 1), "scaling_factor": scaling, "config": cfg.model_dump()}
    (out / "training_summary.json").write_text(json.dumps(summary, indent=1))
    return summary


# command-line option -> TrainConfig key, where the names differ
FLAG_KEYS = {"grounding": "grounding_weight", "grounding_pixel": "pixel_weight"}


def config_from_args(argv: list[str] | None = None, prog: str | None = None) -> TrainConfig:
    """The training config from `--config` (optional), the options given (they win) and `--set`."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--config", help="YAML file of TrainConfig keys (e.g. configs/train/shapes-sd.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config key")
    p.add_argument("--out", help=TrainConfig.model_fields["out"].description)
    for flag, kind in (("steps", int), ("vae-steps", int), ("scenes", int), ("batch", int), ("lr", float),
                       ("seed", int), ("checkpoint-every", int), ("vae-batch", int), ("data-cache", str),
                       ("workers", int), ("threads", int), ("text-layers", int), ("vae-from", str),
                       ("init-from", str), ("grounding", float), ("grounding-pixel", float),
                       ("colour-dropout", float), ("unet-transformer-layers", int)):
        key = flag.replace("-", "_")
        p.add_argument(f"--{flag}", type=kind, help=TrainConfig.model_fields[FLAG_KEYS.get(key, key)].description)
    a = vars(p.parse_args(argv))
    config, overrides = a.pop("config"), a.pop("set")
    return load_train_config(config, overrides, {FLAG_KEYS.get(k, k): v for k, v in a.items()})


def main(argv: list[str] | None = None, prog: str | None = None) -> dict:
    """`python -m maskmill.toyworld.train` / `maskmill toyworld train`: train one stage."""
    return train(config_from_args(argv, prog))


if __name__ == "__main__":
    main()
