"""Segmenter training and evaluation: hand-computed IoU, loss falls, checkpoint reloads, CLI errors."""
from __future__ import annotations

import json

import pytest
import torch
from torchmetrics.classification import MulticlassJaccardIndex

from maskmill.cli import main
from maskmill.segmenter.config import SegmenterSize, TrainConfig
from maskmill.segmenter.evaluate import confusion_matrix, evaluate_folder, iou_from_confusion, read_labelled_folder
from maskmill.segmenter.model import build_model, load_model, predict, save_model
from maskmill.segmenter.train import train_segmenter
from maskmill.segmenter.transforms import FlipAndResizedCrop
from maskmill.toyworld.bench_downstream import write_run
from maskmill.toyworld.render import SHAPES
from maskmill.toyworld.testset import render_testset, rendered_scenes


def test_iou_matches_a_hand_computed_example():
    truth = torch.tensor([[0, 0, 1, 1],
                          [0, 2, 2, 255]])
    pred = torch.tensor([[0, 1, 1, 1],
                         [2, 2, 0, 1]])  # the 255 pixel's prediction is not scored
    # class 0: tp 1 (0,0); truth 3, pred 2 -> union 4 -> 1/4
    # class 1: tp 2; truth 2, pred 3 (the ignored pixel left out) -> union 3 -> 2/3
    # class 2: tp 1; truth 2, pred 1 + 1 = 2 -> union 3 -> 1/3
    r = iou_from_confusion(confusion_matrix(pred, truth, 3), ["background", "circle", "star"])
    assert r["per_class_iou"] == pytest.approx({"background": 1 / 4, "circle": 2 / 3, "star": 1 / 3})
    assert r["miou"] == pytest.approx((1 / 4 + 2 / 3 + 1 / 3) / 3)
    assert r["pixel_accuracy"] == pytest.approx(4 / 7)
    tm = MulticlassJaccardIndex(num_classes=3, ignore_index=255, average=None)(pred.flatten(), truth.flatten())
    assert tm.tolist() == pytest.approx([1 / 4, 2 / 3, 1 / 3])


def test_absent_class_is_left_out_of_the_mean():
    truth, pred = torch.tensor([0, 0, 1]), torch.tensor([0, 0, 1])
    r = iou_from_confusion(confusion_matrix(pred, truth, 3), ["background", "a", "b"])
    assert r["per_class_iou"]["b"] is None and r["miou"] == 1.0


def test_joint_crop_keeps_labels_exact_and_aligned():
    torch.manual_seed(0)
    image = torch.zeros(3, 32, 32)
    mask = torch.zeros(32, 32, dtype=torch.long)
    mask[8:20, 4:16] = 3
    mask[0] = 255
    image[0] = (mask == 3).float()
    aug = FlipAndResizedCrop(24, (0.3, 1.0))
    for _ in range(20):
        im, m = aug(image, mask)
        assert im.shape == (3, 24, 24) and m.shape == (24, 24) and m.dtype == torch.long
        assert set(m.unique().tolist()) <= {0, 3, 255}
        inside = m == 3
        if inside.any():  # the red channel (object) follows the mask wherever the crop and flip put it
            assert (im[0][inside] > 0.5).float().mean() > 0.95 and (im[0][m == 0] < 0.5).float().mean() > 0.95


TRANSFORMERS_BARS = ("Writing model shards", "Loading weights")  # transformers 5's save and load bars


@pytest.fixture
def transformers_bars_on():
    """transformers as in a fresh process (its bars on, whatever earlier tests silenced); restored after."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    yield hf_logging.enable_progress_bar
    (hf_logging.enable_progress_bar if was_enabled else hf_logging.disable_progress_bar)()


def test_saving_and_loading_the_segmenter_draws_no_transformers_bars(tmp_path, capfd, transformers_bars_on):
    model = build_model(list(SHAPES), SegmenterSize())
    model.save_pretrained(tmp_path / "raw", safe_serialization=True)  # control: the bar shows when not silenced
    assert TRANSFORMERS_BARS[0] in capfd.readouterr().err
    transformers_bars_on()
    save_model(model, tmp_path / "model")
    transformers_bars_on()  # load_model must silence them by itself
    again = load_model(tmp_path / "model")
    printed = "".join(capfd.readouterr())
    assert not [bar for bar in TRANSFORMERS_BARS if bar in printed], printed
    assert again.config.id2label[4] == "star"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    images, masks = rendered_scenes(24, "tune")
    write_run(root / "run", images, masks, list(SHAPES), shard_size=8)
    render_testset(8, root / "val", split="tune", hard=True)
    return root


def test_training_lowers_the_loss_and_the_checkpoint_reloads(tiny_run, tmp_path):
    cfg = TrainConfig(data=[tiny_run / "run"], out=tmp_path / "seg", val=tiny_run / "val", steps=40, batch_size=8,
                      lr=3e-3, progress=False, shuffle=16)
    metrics = train_segmenter(cfg, log=lambda *_: None)
    assert metrics["loss_last"] < 0.7 * metrics["loss_first"]
    assert (tmp_path / "seg" / "model" / "model.safetensors").is_file()
    saved = json.loads((tmp_path / "seg" / "metrics.json").read_text())
    assert saved["val"]["images"] == 8 and 0 <= saved["val"]["miou"] <= 1
    assert TrainConfig.model_validate_json((tmp_path / "seg" / "train_config.json").read_text()) == cfg
    images, _, _ = read_labelled_folder(tiny_run / "val")
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    again = load_model(tmp_path / "seg" / "model")
    assert again.config.id2label[0] == "background" and again.config.id2label[4] == "star"
    assert torch.equal(predict(again, x), predict(load_model(tmp_path / "seg" / "model"), x))
    assert evaluate_folder(again, tiny_run / "val")["miou"] == pytest.approx(saved["val"]["miou"])


def test_same_seed_trains_the_same_model(tiny_run, tmp_path):
    def losses(out):
        cfg = TrainConfig(data=[tiny_run / "run"], out=out, steps=5, batch_size=8, progress=False)
        return train_segmenter(cfg)["losses"]

    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_cli_trains_and_evaluates(tiny_run, tmp_path, capfd, transformers_bars_on):
    assert main(["train-segmenter", "--data", str(tiny_run / "run"), "--out", str(tmp_path / "o"), "--steps", "3",
                 "--batch-size", "4", "--no-progress"]) == 0
    transformers_bars_on()  # evaluate-segmenter alone, as in its own process
    assert main(["evaluate-segmenter", "--ckpt", str(tmp_path / "o" / "model"), "--data", str(tiny_run / "val"),
                 "--json", str(tmp_path / "r.json")]) == 0
    out, err = capfd.readouterr()
    assert "mIoU" in out and "star" in out
    assert not [bar for bar in TRANSFORMERS_BARS if bar in out + err], err  # a quiet console (issue #18)
    assert set(json.loads((tmp_path / "r.json").read_text())["per_class_iou"]) == {"background", *SHAPES}


@pytest.mark.parametrize("args, message", [
    (["--data", "nowhere"], "nowhere: not a maskmill run"),
    (["--val", "nowhere"], "not a labelled folder"),
    (["--steps", "0"], "steps"),
    (["--init", "nowhere"], "only local checkpoints"),
])
def test_cli_refuses_bad_input_in_one_line(tiny_run, tmp_path, capsys, args, message):
    base = {"--data": str(tiny_run / "run"), "--out": str(tmp_path / "o")}
    argv = ["train-segmenter"]
    for k, v in base.items():
        if k not in args:
            argv += [k, v]
    assert main(argv + args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0 and err.startswith("error:")
    assert not (tmp_path / "o").exists()


def test_evaluate_refuses_a_folder_without_masks(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    assert main(["evaluate-segmenter", "--ckpt", str(tmp_path), "--data", str(tmp_path)]) == 2
    assert "error:" in capsys.readouterr().err
