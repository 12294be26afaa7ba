"""The micro CLIP's model card (README.md beside its weights), written from the training summary.

Figures measured after training (`maskmill toyworld eval-clip`) go under "## Measured", which a
re-written card keeps.
"""
from __future__ import annotations

from pathlib import Path

MEASURED = "## Measured"


def _generated_text(summary: dict) -> str:
    g, s = summary.get("generated_pool"), summary["settings"]
    if not g:
        return ""
    share = s["generated_share"]
    return f"""
- **Generated data**: {share:.0%} of the items are cut from {g['images']:,} images the micro SD drew
  (`{g['file']}`, `maskmill toyworld clip-pool --n {g['images']}`, {g['generate_seconds'] / 60:.1f} min): trained
  captions with a seed stream of their own (`evaluate.SPLIT_SEEDS["clip-train"]`), never the tune or
  eval split's images, never the held-out captions. Each object's region is recovered from the
  image's colours and captioned with its colour and the shape `classify_shape` fits to it
  ({g['regions']:,} regions; {g['judged_not_prompted']} judged another shape than prompted). Of these items,
  85 % are object regions (the same crop and mask perturbations) and 15 % background regions.
  This is the judge the check is measured against, on other images: the eval figures below stay held out."""


def card_text(summary: dict) -> str:
    a, s, acc = summary["architecture"], summary["settings"], summary["rendered_accuracy"]
    generated = _generated_text(summary)
    rendered_part = f" ({1 - s['generated_share']:.0%} of them rendered, the rest generated)" if generated else ""
    command = (f"maskmill toyworld train-clip --out maskmill/assets/shapes-clip --steps {s['steps']} --batch {s['batch']} "
               f"--lr {s['lr']} --warmup {s['warmup']} --seed {s['seed']} --pool-scenes {s['pool_scenes']} "
               f"--threads {s['threads']}" + (" --distort" if s.get("distort") else "")
               + (f" --init {s['init']}" if s.get("init") else "")
               + (f" --generated {s['generated']} --generated-share {s['generated_share']}" if generated else ""))
    return f"""# shapes-clip: the embedded micro CLIP (model card)

clip-anytorch's own `clip.model.CLIP` class, tiny, trained contrastively on the rendered shapes
world (`maskmill/toyworld/render.py`). It is the model behind the CLIP consistency check
(`maskmill/clipcheck.py`) on the shapes world, and it loads through the same code as a real CLIP
checkpoint from a local file (`maskmill.clip_model.load_clip`: weight-only safetensors, OpenAI key
names, architecture inferred by `build_model` from the tensor shapes).

| part | config |
|---|---|
| vision | ViT: {a['image_resolution']} px input, patch {a['vision_patch_size']}, width {a['vision_width']}, {a['vision_layers']} layers, {a['vision_width'] // 64} head(s) |
| text | width {a['transformer_width']}, {a['transformer_layers']} layers, {a['transformer_heads']} head(s), context {a['context_length']}, CLIP's 49,408-token BPE (shipped with clip-anytorch) |
| joint embedding | {a['embed_dim']} dimensions; {summary['parameters']:,} parameters |
| weights | `model.safetensors`, fp16 (what `build_model` keeps; loaded as fp32 on CPU). The {summary['trained_token_rows']} token rows the training captions use are trained; every other row is zero (never trained, and zeros compress) |

## Training

- **Data**: {s['pool_scenes']:,} rendered scenes (seed {s['seed']}); multi-object captions held out of the
  micro SD's training are held out here too. Each step draws {s['batch']} items afresh{rendered_part}:
  25 % whole scenes with their caption ("a red circle and a blue star"), 60 % object regions
  ("a red circle" or "a circle", half each), 15 % background regions ("{summary['background_prompt']}").
  Regions are cut with the check's own crop (mask's box made square, the rest filled with CLIP's
  mean colour, resized to {a['image_resolution']} px), from masks perturbed the way attention masks err
  (grown or shrunk a pixel, or coarsened to 8x8 / 16x16 and upsampled). Background regions are a
  random shape's outline on empty background, like a mask that found no object. Images are
  blurred and noised half the time each (generated images are softer than rendered ones).{generated}
- **Loss**: CLIP's symmetric contrastive loss; a caption that describes several items of the
  batch ("a circle": every circle region and every scene with a circle in it) has all of them as
  positives (row-normalised targets).
- **Optimiser**: AdamW lr {s['lr']}, {s['warmup']} warm-up steps then cosine, weight decay {s['weight_decay']}
  (not on embeddings, gains and biases), gradient norm clipped to 1.
- **Steps**: {s['steps']:,}; **time**: {summary['train_seconds'] / 60:.1f} minutes on {s['threads']} CPU thread(s) of a
  shared 2-core machine; final loss {summary['final_loss']}.
- **Command**: `{command}`

## Zero-shot accuracy on rendered regions (measured at the end of training)

{acc['objects']} object regions and {acc['background_regions']} background regions of rendered scenes never trained on
(fresh seed; single objects and held-out multi-object captions), true masks:

| figure | value |
|---|---|
| colour (best of 16 "a {{colour}} {{shape}}" prompts) | {acc['colour']:.3f} |
| shape (best of 16 "a {{colour}} {{shape}}" prompts) | {acc['shape']:.3f} |
| shape (best of "a circle", "a square", "a triangle", "a star", "{summary['background_prompt']}") | {acc['shape_prompts']:.3f} |
| background regions won by "{summary['background_prompt']}" | {acc['background']:.3f} |
"""


def write_card(out: Path, summary: dict) -> Path:
    """Write README.md, keeping an existing "## Measured" section."""
    path = Path(out) / "README.md"
    kept = ""
    if path.exists() and MEASURED in path.read_text():
        kept = "\n" + path.read_text()[path.read_text().index(MEASURED):]
    path.write_text(card_text(summary) + kept)
    return path
