"""`maskmill segment IMG... --bank BANK --classes a,b [--model M] [--clip CKPT [--clip-template T]] [--out DIR]
[--no-background] [--refine {pamr,none}] [--max-side N]`

Checks everything before any work: the class list, the image files (read as RGB by
`maskmill.images.read_rgb`: 16-bit, float, palette and CMYK images converted correctly, others
refused), the bank (readable, tensor and fingerprint hashes intact), the classes (each must have
foreground prototypes in the bank), the CLIP checkpoint and its template, the model; then rebuilds
the bank's feature extractor on the chosen model (layers, timestep, size and noise seed are read
from the bank's fingerprint) and refuses the bank unless its fingerprint matches (model configs
and weights digest, extractor settings, maskmill version). Any of these failures prints one clear
`error:` line and exits 2.

Images larger than --max-side (default: the model's own image size, the UNet's sample size
times the VAE's scale factor, 32 for shapes-sd and 512 for SD 1.5: what it was trained on, and a
bound on time and memory) are resized for segmenting, and their labels scaled back to the input
size (nearest neighbour); the output line says so. Then it segments each image (OVDiff: class score = max over its prototypes, background = max
over the background prototypes; scores refined with PAMR unless `--refine none`; argmax) and
writes `<stem>.labels.png` (value k = k-th class of --classes, 0 background), `<stem>.overlay.png`
and `<stem>.classes.json` into --out.

With --clip, OVDiff's class pre-filter first keeps the classes the CLIP finds likely in the whole
image, scoring each as --clip-template says (default: CLIP's "a photo of a {}."; the embedded
shapes-clip was trained on "a circle" and never saw "a photo of", so its default is its own "a {}").
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

EXIT_USAGE = 2


class SegmentError(Exception):
    """A problem with the command's inputs: reported as one line, exit 2."""


def parse_classes(text: str) -> list[str]:
    classes = [c.strip() for c in str(text).split(",") if c.strip()]
    if not classes:
        raise SegmentError("--classes is empty: give comma-separated class names, e.g. --classes circle,star")
    dup = sorted({c for c in classes if classes.count(c) > 1})
    if dup:
        raise SegmentError(f"--classes names {', '.join(dup)} more than once")
    return classes


def read_images(paths: list[Path]) -> list[np.ndarray]:
    from PIL import Image, UnidentifiedImageError

    from .images import ImageModeError, read_rgb

    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        raise SegmentError(f"image file(s) not found: {', '.join(missing)}")
    images = []
    for p in paths:
        try:
            images.append(read_rgb(p))
        except (UnidentifiedImageError, ImageModeError, Image.DecompressionBombError, OSError) as e:
            raise SegmentError(f"cannot read image {p}: {' '.join(str(e).split())}") from None
    return images


def model_image_side(pipe) -> int:
    """The side of the images the model was trained on: UNet sample size x VAE scale factor."""
    sample = pipe.unet.config.sample_size
    return int(max(sample) if isinstance(sample, (list, tuple)) else sample) * int(pipe.vae_scale_factor)


def working_images(images: list[np.ndarray], paths: list[Path], max_side: int, extractor) -> list[np.ndarray]:
    """Each image resized to fit `max_side`; refused (one line) if one would fall below the UNet's minimum."""
    from .images import fit_max_side

    work = [fit_max_side(im, max_side) for im in images]
    for path, im in zip(paths, work):
        try:
            extractor._target_size(im.shape[:2])
        except ValueError as e:
            raise SegmentError(f"image {path}: {e} (after --max-side {max_side}); give a larger --max-side") from None
    return work


def unique_stems(paths: list[Path]) -> list[str]:
    """Output stems from file names; repeated names (a/x.png, b/x.png) get -1, -2 ... suffixes."""
    stems, seen = [], {}
    for p in paths:
        stem = Path(p).stem or "image"
        n = seen.get(stem, 0)
        seen[stem] = n + 1
        stems.append(stem if n == 0 else f"{stem}-{n}")
    taken = set()
    for i, s in enumerate(stems):  # a later "x-1.png" could collide with a generated "x-1"
        while s in taken:
            s += "_"
        taken.add(s)
        stems[i] = s
    return stems


def load_checked_bank(path: Path):
    """Load the bank (readability and tensor hash checked); the fingerprint is checked later."""
    from .prototypes.bank_files import BankError, bank_paths, load_bank

    tensor_path, meta_path = bank_paths(path)
    if not tensor_path.exists() and not meta_path.exists():
        raise SegmentError(f"no bank at {path} (looked for {tensor_path} and {meta_path})")
    try:
        bank = load_bank(path)
    except BankError as e:
        raise SegmentError(f"bank refused: {e}") from None
    if not bank.fingerprint or not isinstance(bank.fingerprint.get("feature_extractor"), dict):
        raise SegmentError(f"bank refused: {path} carries no feature-extractor fingerprint")
    return bank


def check_classes(bank, classes: list[str]) -> None:
    have = sorted({m.class_name for m in bank.meta if m.side == "fg"})
    unknown = [c for c in classes if c not in have]
    if unknown:
        raise SegmentError(f"unknown class(es) {', '.join(repr(c) for c in unknown)}: the bank has no prototypes "
                           f"for them (it has: {', '.join(have)}); build them with the build_prototypes flow")


def extractor_for_bank(bank, pipe, model: str):
    """The feature extractor the bank was built with, rebuilt on `pipe`."""
    from .prototypes.features import SDQueryFeatures

    fe = bank.fingerprint["feature_extractor"]
    if fe.get("name") != SDQueryFeatures.name:
        raise SegmentError(f"bank refused: it was built with feature extractor {fe.get('name')!r}; "
                           f"`maskmill segment` rebuilds {SDQueryFeatures.name!r} features only")
    try:
        return SDQueryFeatures(pipe, layers=fe.get("layers"), timestep=fe.get("timestep", 200), size=fe.get("size"),
                               noise_seed=fe.get("noise_seed", 0), model_id=model)
    except ValueError as e:  # layers this UNet does not have: a bank of another architecture
        raise SegmentError(f"bank refused: its feature layers do not exist in model {model!r}: {e}") from None


def expected_fingerprint(bank, extractor) -> dict:
    """The bank's fingerprint as this model + extractor + maskmill would stamp it.

    Build settings (support set, k-means parts, ...) are the bank's own business and are taken
    as stored; what must match is everything that makes features comparable. The model's
    display id is taken from the bank too (the same weights loaded as "shapes-sd" or by path
    are the same model: configs and the weights digest decide).
    """
    from .prototypes.fingerprint import maskmill_version

    fe = json.loads(json.dumps(extractor.fingerprint()))
    stored_model = (bank.fingerprint.get("feature_extractor") or {}).get("model") or {}
    if isinstance(fe.get("model"), dict) and "id" in stored_model:
        fe["model"]["id"] = stored_model["id"]
    return {**bank.fingerprint, "model": fe.get("model"), "feature_extractor": fe,
            "maskmill_version": maskmill_version()}


def clip_template_of(args) -> str | None:
    """--clip-template checked (one "{}" slot, and a --clip to score it), or None for the CLIP's default."""
    from .models import check_class_template

    template = getattr(args, "clip_template", None)
    if template is None:
        return None
    if getattr(args, "clip", None) is None:
        raise SegmentError("--clip-template needs --clip (the CLIP that scores the classes with it)")
    try:
        return check_class_template(template)
    except ValueError as e:
        raise SegmentError(f"--clip-template: {e}") from None


def clip_weights(args) -> Path | None:
    """The --clip weight file (an embedded name, a folder or the file itself), or None."""
    from .models import ClipNotFoundError, resolve_clip

    if getattr(args, "clip", None) is None:
        return None
    try:
        return resolve_clip(args.clip)
    except ClipNotFoundError as e:
        raise SegmentError(str(e)) from None


def _run(args) -> int:
    from .prototypes.bank_files import FingerprintMismatchError, load_bank
    from .prototypes.segment import DEFAULT_REFINER, clip_prefilter, make_refiner, save_segmentation, segment_images

    try:
        refine = make_refiner(str(getattr(args, "refine", None) or DEFAULT_REFINER))
    except ValueError as e:
        raise SegmentError(f"--refine: {e}") from None
    classes = parse_classes(args.classes)
    clip_template = clip_template_of(args)
    max_side = getattr(args, "max_side", None)
    if max_side is not None and max_side < 1:
        raise SegmentError(f"--max-side must be a positive number of pixels, got {max_side}")
    paths = [Path(p) for p in args.images]
    images = read_images(paths)
    bank = load_checked_bank(Path(args.bank))
    check_classes(bank, classes)
    clip_path = clip_weights(args)

    from .models import ModelNotFoundError, clip_class_template, load_pipeline

    model = str(getattr(args, "model", None) or "shapes-sd")
    try:
        pipe = load_pipeline(model)
    except ModelNotFoundError as e:
        raise SegmentError(str(e)) from None
    extractor = extractor_for_bank(bank, pipe, model)
    try:
        bank = load_bank(args.bank, expected_fingerprint=expected_fingerprint(bank, extractor))
    except FingerprintMismatchError as e:
        raise SegmentError(f"bank refused: {e}. Rebuild the bank for model {model!r} "
                           f"(flows/build_prototypes.py) or pass the --model it was built with") from None

    prefilter = None
    if clip_path is not None:
        from .prototypes.clip_features import CLIPPatchFeatures

        try:
            clip = CLIPPatchFeatures(clip_path)
        except Exception as e:  # noqa: BLE001 - any unloadable checkpoint is a usage error
            raise SegmentError(f"cannot load CLIP checkpoint {clip_path}: {type(e).__name__}: {e}") from None
        prefilter = clip_prefilter(clip, clip_template or clip_class_template(clip_path))

    from .images import labels_to_size

    max_side = max_side or model_image_side(pipe)
    work = working_images(images, paths, max_side, extractor)
    out = Path(getattr(args, "out", None) or "outputs/segment")
    t0 = time.perf_counter()
    results = segment_images(extractor, work, bank, classes, use_background=not getattr(args, "no_background", False),
                             prefilter=prefilter, refine=refine)
    seconds = time.perf_counter() - t0
    for path, stem, image, small, res in zip(paths, unique_stems(paths), images, work, results):
        labels = labels_to_size(res.labels, *image.shape[:2])
        written = save_segmentation(labels, image, classes, out, stem)
        found = [classes[k - 1] for k in np.unique(labels).tolist() if k > 0]
        resized = ""
        if small.shape != image.shape:
            (h, w), (sh, sw) = image.shape[:2], small.shape[:2]
            resized = f"  (resized from {w}x{h} to {sw}x{sh} to segment, --max-side {max_side}; labels at {w}x{h})"
        print(f"{path}: {written['labels']}  {written['overlay']}{resized}  "
              f"(classes found: {', '.join(found) or 'none'})")
    print(f"segmented {len(images)} image(s) in {seconds:.2f} s ({seconds / max(1, len(images)):.3f} s/image); "
          f"outputs in {out}")
    return 0


def run_segment(args) -> int:
    """Entry point of `maskmill segment`; returns the exit code (0 ok, 2 refused input)."""
    try:
        return _run(args)
    except SegmentError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
