"""Train the micro CLIP of the shapes world: clip-anytorch's own CLIP class at tiny widths.

    maskmill toyworld train-clip --out maskmill/assets/shapes-clip [--steps 1500] [--lr 1e-3] [--seed 0]

Contrastive training on rendered scenes, object regions and background regions with their
captions (`clip_data.py`). Where one caption describes several items of a batch ("a circle"),
each of them is a positive: the targets are the caption-describes-item matrix, row-normalised.
Writes model.safetensors (OpenAI key names, fp16: what `build_model` keeps anyway), config.json,
training_log.json and a model card README.md.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..clip_model import CONFIG_FILE, WEIGHTS_FILE, new_clip
from .clip_data import BACKGROUND, caption_meaning, describes, kind_weights, render_pool, sample_batch

ARCHITECTURE = dict(embed_dim=64, image_resolution=32, vision_layers=4, vision_width=64, vision_patch_size=4,
                    context_length=32, vocab_size=49408, transformer_width=64, transformer_heads=1,
                    transformer_layers=2)


@dataclass
class ClipTrainSettings:
    steps: int = 1500
    batch: int = 128
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.05
    seed: int = 0
    pool_scenes: int = 6000
    threads: int = 1
    distort: bool = False  # warp half the scenes and roughen outlines (lumpy generated shapes)
    eval_scenes: int = 400  # rendered scenes for the accuracy in the model card
    architecture: dict = field(default_factory=lambda: dict(ARCHITECTURE))
    init: str | None = None  # continue from these weights (their architecture wins)
    generated: str | None = None  # a pool of generated images (`clip_generated.make_pool`)
    generated_share: float = 0.4  # share of the items cut from it, when given

    def check(self) -> None:
        for name in ("steps", "batch", "warmup", "pool_scenes", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.lr < 1:
            raise ValueError(f"--lr must be in (0, 1), got {self.lr}")
        if not 0 < self.generated_share < 1:
            raise ValueError(f"--generated-share must be in (0, 1), got {self.generated_share}")
        if self.generated is not None and not Path(self.generated).is_file():
            raise ValueError(f"--generated: no such file {self.generated}")


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, positives: torch.Tensor,
                     scale: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP loss with several positives: (N images, T unique texts), positives bool (N, T)."""
    logits = scale * F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T
    p = positives.float()
    i2t = -(F.log_softmax(logits, 1) * (p / p.sum(1, keepdim=True))).sum(1).mean()
    t2i = -(F.log_softmax(logits.T, 1) * (p.T / p.T.sum(1, keepdim=True))).sum(1).mean()
    return (i2t + t2i) / 2


def _lr_at(step: int, s: ClipTrainSettings) -> float:
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    return s.lr * 0.5 * (1 + math.cos(math.pi * (step - s.warmup) / max(1, s.steps - s.warmup)))


def train(settings: ClipTrainSettings, out: Path) -> dict:
    """Train, save and return the summary (also in config.json)."""
    from tqdm import tqdm

    from ..clip_model import ClipModel, load_clip
    from .clip_eval import rendered_accuracy

    settings.check()
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    t0 = time.time()
    pool = render_pool(settings.pool_scenes, seed=settings.seed)
    generated, generated_summary = None, None
    if settings.generated:
        from .clip_generated import load_regions, pool_summary

        generated = load_regions(settings.generated)
        generated_summary = pool_summary(settings.generated, generated)
    weights = kind_weights(settings.generated_share if generated else 0.0)
    model = _initial_model(settings)
    scorer = ClipModel(model, out / WEIGHTS_FILE)  # its tokenizer and normalisation, while training
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=settings.lr)
    log, used_tokens = [], set()
    bar = tqdm(range(settings.steps), desc="train-clip", mininterval=5)
    for step in bar:
        images, captions, meanings = sample_batch(pool, settings.batch, rng, settings.architecture["image_resolution"],
                                                  weights, distort=settings.distort, generated=generated)
        texts = list(dict.fromkeys(captions))
        positives = torch.tensor([[describes(caption_meaning(t), m) for t in texts] for m in meanings])
        tokens = scorer.tokenize(texts)
        used_tokens.update(tokens.unique().tolist())
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, settings)
        image_emb = model.encode_image(scorer.normalise(images))
        text_emb = model.encode_text(tokens)
        loss = contrastive_loss(image_emb, text_emb, positives, model.logit_scale.exp())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 25 == 0 or step == settings.steps - 1:
            log.append({"step": step, "loss": round(float(loss), 4), "lr": _lr_at(step, settings),
                        "seconds": round(time.time() - t0, 1)})
            bar.set_postfix(loss=f"{float(loss):.3f}")
    train_seconds = time.time() - t0
    model.eval()
    state = _export_state(model, used_tokens)
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file(state, str(out / WEIGHTS_FILE))
    accuracy = rendered_accuracy(load_clip(out / WEIGHTS_FILE), n_scenes=settings.eval_scenes)  # the shipped weights
    summary = {"architecture": settings.architecture, "settings": {k: v for k, v in asdict(settings).items()
                                                                   if k != "architecture"},
               "background_prompt": BACKGROUND, "train_seconds": round(train_seconds, 1),
               "final_loss": log[-1]["loss"], "trained_token_rows": len(used_tokens),
               "rendered_accuracy": accuracy, "parameters": sum(p.numel() for p in model.parameters()),
               "generated_pool": generated_summary}
    (out / CONFIG_FILE).write_text(json.dumps(summary, indent=1))
    (out / "training_log.json").write_text(json.dumps(log, indent=1))
    return summary


def _initial_model(settings: ClipTrainSettings) -> torch.nn.Module:
    """A fresh CLIP, or one continued from `settings.init` (read weight-only, as any checkpoint)."""
    if settings.init is None:
        return new_clip(settings.architecture).train()
    from ..clip_model import architecture_of, resolve_clip
    from ..clip_model import load_clip_state_dict

    state = load_clip_state_dict(resolve_clip(settings.init))
    settings.architecture = architecture_of(state)
    model = new_clip(settings.architecture)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.train()


def _export_state(model: torch.nn.Module, used_tokens: set[int]) -> dict[str, torch.Tensor]:
    """fp16 state dict; token rows never seen in training are zeroed (untrained noise, and zeros compress)."""
    state = {k: v.detach().to(torch.float16).contiguous().clone() for k, v in model.state_dict().items()}
    keep = torch.zeros(state["token_embedding.weight"].shape[0], dtype=torch.bool)
    keep[sorted(used_tokens)] = True
    state["token_embedding.weight"][~keep] = 0
    return state


def run_args(a: argparse.Namespace) -> int:
    settings = ClipTrainSettings(steps=a.steps, batch=a.batch, lr=a.lr, warmup=a.warmup, seed=a.seed,
                                 pool_scenes=a.pool_scenes, threads=a.threads,
                                 init=str(a.init) if a.init else None, distort=a.distort,
                                 generated=str(a.generated) if a.generated else None,
                                 generated_share=a.generated_share)
    try:
        settings.check()  # before rendering or training anything
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = train(settings, a.out)
    from .clip_card import write_card

    write_card(a.out, summary)
    print(json.dumps({k: summary[k] for k in ("train_seconds", "final_loss", "rendered_accuracy")}, indent=1))
    return 0
