"""`maskmill segment`: writes label and overlay PNGs; refuses mismatched/corrupted banks and unknown classes (exit 2)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from maskmill.cli import main
from maskmill.prototypes import SDQueryFeatures, build_class_bank, make_fingerprint, merge_banks, save_bank
from maskmill.toyworld.render import render, sample_scene


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model folder, a bank of circle/square built from rendered scenes with its features, two images."""
    from conftest import build_sd1_pipeline

    from maskmill.models import load_pipeline

    root = tmp_path_factory.mktemp("segcli")
    model = root / "model"
    build_sd1_pipeline(seed=1).save_pretrained(model, safe_serialization=True)
    pipe = load_pipeline(str(model))
    ex = SDQueryFeatures(pipe, model_id=str(model))
    rng = np.random.default_rng(0)
    banks = []
    for name in ("circle", "square"):
        scenes = [sample_scene(rng, n_objects=1) for _ in range(3)]
        rendered = [render(s) for s in scenes]
        images = np.stack([im for im, _ in rendered])
        fg = np.stack([lab > 0 for _, lab in rendered])
        banks.append(build_class_bank(name, ex(images), fg, ~fg, [f"{name}-{i}" for i in range(3)], k_parts=3))
    fp = make_fingerprint(ex.fingerprint(), {"source": "rendered scenes"})
    bank = merge_banks(banks)
    bank_path = save_bank(bank, root / "bank.safetensors", fp)
    bad_fp = json.loads(json.dumps(fp))
    bad_fp["feature_extractor"]["model"]["weights"] = "0" * 16
    bad_fp["model"] = bad_fp["feature_extractor"]["model"]
    bad_path = save_bank(bank, root / "other-model.safetensors", bad_fp)
    paths = []
    for i in range(2):
        p = root / f"img{i}.png"
        Image.fromarray(render(sample_scene(rng))[0]).save(p)
        paths.append(p)
    return {"root": root, "model": model, "bank": bank_path, "bad_bank": bad_path, "images": paths}


def segment(setup, *extra, bank=None, classes="circle,square", out=None):
    out = out or setup["root"] / "out"
    argv = ["segment", *map(str, setup["images"]), "--bank", str(bank or setup["bank"]), "--classes", classes,
            "--model", str(setup["model"]), "--out", str(out), *extra]
    return main(argv), out


def test_segment_writes_label_and_overlay_pngs(setup, capsys):
    code, out = segment(setup)
    assert code == 0
    printed = capsys.readouterr().out
    for p in setup["images"]:
        labels = Image.open(out / f"{p.stem}.labels.png")
        overlay = Image.open(out / f"{p.stem}.overlay.png")
        assert labels.mode == "L" and labels.size == (32, 32)
        assert overlay.mode == "RGB" and overlay.size == (32, 32)
        assert set(np.unique(np.asarray(labels)).tolist()) <= {0, 1, 2}
        assert str(out / f"{p.stem}.labels.png") in printed
    legend = json.loads((out / f"{setup['images'][0].stem}.classes.json").read_text())
    assert legend["1"]["name"] == "circle" and legend["2"]["name"] == "square"
    code, out2 = segment(setup, "--no-background", out=setup["root"] / "out-nobg")
    assert code == 0
    assert all((np.asarray(Image.open(out2 / f"{p.stem}.labels.png")) > 0).all() for p in setup["images"])
    code, out3 = segment(setup, "--refine", "none", out=setup["root"] / "out-raw")
    assert code == 0 and all((out3 / f"{p.stem}.labels.png").exists() for p in setup["images"])


def test_mismatched_fingerprint_refused_before_any_work(setup, capsys):
    out = setup["root"] / "never"
    code, _ = segment(setup, bank=setup["bad_bank"], out=out)
    err = capsys.readouterr().err
    assert code == 2
    assert "error: bank refused" in err and "different fingerprint" in err and "weights" in err
    assert not out.exists()


def test_corrupted_bank_refused(setup, capsys, tmp_path):
    import shutil

    target = tmp_path / "bank.safetensors"
    shutil.copy(setup["bank"], target)
    shutil.copy(setup["bank"].with_suffix(".json"), target.with_suffix(".json"))
    data = bytearray(target.read_bytes())
    data[-8:] = b"\x00\x01\x02\x03\x04\x05\x06\x07"
    target.write_bytes(bytes(data))
    code, _ = segment(setup, bank=target, out=tmp_path / "never")
    assert code == 2 and "corrupted" in capsys.readouterr().err
    code, _ = segment(setup, bank=tmp_path / "missing.safetensors", out=tmp_path / "never")
    assert code == 2 and "no bank at" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_bank_with_edited_timestep_refused(setup, capsys, tmp_path):
    """The feature timestep changed in the JSON (200 -> 400), fingerprint_hash left as it was: the
    extractor would be rebuilt at 400 and match the edited fingerprint, so the hash must catch it."""
    import shutil

    target = tmp_path / "bank.safetensors"
    shutil.copy(setup["bank"], target)
    sidecar = json.loads(setup["bank"].with_suffix(".json").read_text())
    assert sidecar["fingerprint"]["feature_extractor"]["timestep"] == 200
    sidecar["fingerprint"]["feature_extractor"]["timestep"] = 400
    target.with_suffix(".json").write_text(json.dumps(sidecar, indent=1))
    code, _ = segment(setup, bank=target, out=tmp_path / "never")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: bank refused")
    assert "feature_extractor.timestep changed" in err
    assert not (tmp_path / "never").exists()


def _labels(out, stem):
    return np.asarray(Image.open(out / f"{stem}.labels.png"))


def test_16_bit_png_segmented_as_its_8_bit_version(setup, capsys, tmp_path):
    """A 16-bit PNG must not saturate to white: it gives the labels of the same picture at 8 bits."""
    grey8 = np.asarray(Image.open(setup["images"][0]).convert("L"))
    paths = {"grey8": tmp_path / "grey8.png", "grey16": tmp_path / "grey16.png", "white": tmp_path / "white.png"}
    Image.fromarray(grey8).save(paths["grey8"])
    Image.fromarray(grey8.astype(np.uint16) * 257).save(paths["grey16"])  # 0..65535, same picture
    Image.fromarray(np.full_like(grey8, 255)).save(paths["white"])        # what convert("RGB") made of it
    assert Image.open(paths["grey16"]).mode.startswith("I")
    out = tmp_path / "out"
    argv = ["segment", *map(str, paths.values()), "--bank", str(setup["bank"]), "--classes", "circle,square",
            "--model", str(setup["model"]), "--out", str(out)]
    assert main(argv) == 0
    assert np.array_equal(_labels(out, "grey16"), _labels(out, "grey8"))
    assert not np.array_equal(_labels(out, "grey8"), _labels(out, "white"))  # the test can tell them apart


def test_unreadable_image_mode_refused_in_one_line(setup, capsys, tmp_path):
    bad = tmp_path / "signed.tiff"
    Image.fromarray(np.linspace(-1, 1, 32 * 32, dtype=np.float32).reshape(32, 32)).save(bad)
    argv = ["segment", str(bad), "--bank", str(setup["bank"]), "--classes", "circle",
            "--model", str(setup["model"]), "--out", str(tmp_path / "never2")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: cannot read image {bad}: float image with negative values" in err
    assert not (tmp_path / "never2").exists()


def test_large_image_resized_to_segment_and_labels_scaled_back(setup, capsys, tmp_path):
    """A 2400x1800 image is segmented at the model's size (32 px for this model) and its label map
    is that segmentation scaled back (nearest) to 2400x1800; the output line says it resized."""
    from maskmill.images import fit_max_side, labels_to_size

    rng = np.random.default_rng(7)
    scene = render(sample_scene(rng))[0]
    big = np.asarray(Image.fromarray(scene).resize((2400, 1800), Image.NEAREST))
    small = fit_max_side(big, 32)
    assert small.shape == (24, 32, 3)
    Image.fromarray(big).save(tmp_path / "big.png")
    Image.fromarray(small).save(tmp_path / "small.png")
    out = tmp_path / "out"
    argv = ["segment", str(tmp_path / "big.png"), str(tmp_path / "small.png"), "--bank", str(setup["bank"]),
            "--classes", "circle,square", "--model", str(setup["model"]), "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    big_line = next(line for line in printed.splitlines() if line.startswith(str(tmp_path / "big.png")))
    assert "resized from 2400x1800 to 32x24" in big_line
    small_line = next(line for line in printed.splitlines() if line.startswith(str(tmp_path / "small.png")))
    assert "resized from" not in small_line
    labels = _labels(out, "big")
    assert labels.shape == (1800, 2400)
    assert np.array_equal(labels, labels_to_size(_labels(out, "small"), 1800, 2400))
    assert Image.open(out / "big.overlay.png").size == (2400, 1800)

    # --max-side chooses the working size; a side below the UNet's minimum is refused in one line
    argv[-1] = str(tmp_path / "out64")
    assert main([*argv, "--max-side", "64"]) == 0
    assert "resized from 2400x1800 to 64x48" in capsys.readouterr().out
    assert _labels(tmp_path / "out64", "big").shape == (1800, 2400)
    assert main([*argv, "--max-side", "0"]) == 2
    assert "--max-side must be a positive" in capsys.readouterr().err


def test_unknown_class_named(setup, capsys):
    code, out = segment(setup, classes="circle,hexagon,pentagon", out=setup["root"] / "never2")
    err = capsys.readouterr().err
    assert code == 2
    assert "'hexagon'" in err and "'pentagon'" in err and "circle, square" in err
    assert not out.exists()


def test_same_weights_from_another_folder_accepted(setup, tmp_path):
    """The fingerprint is about configs and weights, not where the model was loaded from."""
    import shutil

    copy = tmp_path / "copied-model"
    shutil.copytree(setup["model"], copy)
    argv = ["segment", str(setup["images"][0]), "--bank", str(setup["bank"]), "--classes", "square",
            "--model", str(copy), "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    assert (tmp_path / "out" / f"{setup['images'][0].stem}.labels.png").exists()


def test_cli_refine_choices_are_the_refiners():
    from maskmill.cli import REFINE_CHOICES
    from maskmill.prototypes.segment import DEFAULT_REFINER, REFINERS

    assert set(REFINE_CHOICES) == set(REFINERS) and REFINE_CHOICES[0] == DEFAULT_REFINER


@pytest.mark.parametrize("template", ["a photo", "a {} and a {}", "a {name}", "a {0}", "a {{}}", "a {"])
def test_clip_template_refused_in_one_line_before_any_work(template, capsys, tmp_path):
    """Checked first: the images and the bank do not exist, yet the template is what is named."""
    argv = ["segment", str(tmp_path / "missing.png"), "--bank", str(tmp_path / "no-bank"), "--classes", "circle",
            "--clip", "shapes-clip", "--clip-template", template, "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --clip-template: template must contain exactly one '{}'") and repr(template) in err
    assert err.count("\n") == 0 and not (tmp_path / "out").exists()


def test_clip_template_without_clip_refused(capsys, tmp_path):
    argv = ["segment", str(tmp_path / "missing.png"), "--bank", str(tmp_path / "no-bank"), "--classes", "circle",
            "--clip-template", "a {}"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == "error: --clip-template needs --clip (the CLIP that scores the classes with it)"


def test_clip_template_reaches_the_class_scores(setup, tmp_path, monkeypatch):
    """The embedded micro CLIP hears its own captions ("a circle"), another CLIP CLIP's photo prompt, and
    --clip-template overrides both."""
    import shutil

    from maskmill.models import EMBEDDED_CLIPS
    from maskmill.prototypes.clip_features import CLIPPatchFeatures

    heard = []
    scores = CLIPPatchFeatures.class_logits

    def recording(self, image, classes, template="(the default)"):
        heard.append((template, list(classes)))
        return scores(self, image, classes, template)

    monkeypatch.setattr(CLIPPatchFeatures, "class_logits", recording)
    other_clip = tmp_path / "other-clip.safetensors"  # the same weights, not the embedded file: a real CLIP's default
    shutil.copy(EMBEDDED_CLIPS["shapes-clip"] / "model.safetensors", other_clip)
    for extra, expected in [(["--clip", "shapes-clip"], "a {}"),
                            (["--clip", "shapes-clip", "--clip-template", "a drawing of a {}"], "a drawing of a {}"),
                            (["--clip", str(other_clip)], "a photo of a {}.")]:
        heard.clear()
        code, _ = segment(setup, *extra, out=tmp_path / "out")
        assert code == 0
        assert heard == [(expected, ["circle", "square"])] * len(setup["images"])
