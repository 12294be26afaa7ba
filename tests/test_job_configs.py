"""Job configs: training (TrainConfig) and bank building (BankBuildConfig), from YAML in configs/ with
command-line options and `key=value` overrides; bad input refused with one line naming the key."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from maskmill.config import ConfigError
from maskmill.prototypes.build_config import load_bank_build_config
from maskmill.toyworld.train import config_from_args

REPO = Path(__file__).resolve().parents[1]
MODEL_CARD_SUMMARY = REPO / "maskmill" / "assets" / "shapes-sd" / "training_summary.json"


def test_the_training_config_reproduces_the_committed_models_last_stage():
    cfg = config_from_args(["--config", str(REPO / "configs" / "train" / "shapes-sd.yaml")])
    summary = json.loads(MODEL_CARD_SUMMARY.read_text())
    for key in ("steps", "batch", "lr", "scenes", "seed", "grounding_weight", "pixel_weight", "colour_dropout"):
        assert getattr(cfg, key) == summary[key], key
    assert cfg.init_from == cfg.vae_from and cfg.text_layers is None  # the grounded model's own text layers


def test_command_line_options_win_over_the_file_and_set_comes_last():
    cfg = config_from_args(["--config", str(REPO / "configs" / "train" / "shapes-sd.yaml"), "--steps", "7",
                            "--grounding", "0.3", "--set", "steps=9", "--out", "/tmp/x"])
    assert (cfg.steps, cfg.grounding_weight, cfg.out) == (9, 0.3, "/tmp/x")
    assert cfg.pixel_weight == 0.05  # untouched keys keep the file's value


@pytest.mark.parametrize("argv, message", [
    (["--steps", "3"], "options: key 'out': Field required"),
    (["--out", "x", "--set", "colour_dropout=1.5"], "key 'colour_dropout': Input should be less than or equal to 1"),
    (["--out", "x", "--set", "lr_typo=1"], "key 'lr_typo': unknown key"),
    (["--config", "nowhere.yaml"], "config file nowhere.yaml does not exist"),
])
def test_bad_training_configs_are_refused_in_one_line(argv, message):
    with pytest.raises(ConfigError) as e:
        config_from_args(argv)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_training_refuses_a_missing_source_folder_before_any_work(tmp_path):
    from maskmill.toyworld.train import train

    cfg = config_from_args(["--out", str(tmp_path / "m"), "--init-from", str(tmp_path / "nowhere"),
                            "--data-cache", str(tmp_path / "scenes.npz")])
    with pytest.raises(ConfigError, match="key 'init_from': .*nowhere is not a pipeline folder"):
        train(cfg)
    assert not (tmp_path / "m").exists() and not (tmp_path / "scenes.npz").exists()


def test_the_bank_config_reads_the_micro_models_recipe_and_per_class_overrides():
    cfg = load_bank_build_config(REPO / "configs" / "prototypes" / "shapes.yaml",
                                 ["class_overrides.star.k_parts=4", "class_overrides.star.filter.min_area=0.05"])
    shapes_run = (REPO / "configs" / "shapes.yaml").read_text()
    star, circle = cfg.class_spec("star"), cfg.class_spec("circle")
    # support images are made like the shapes run's samples, with the run's filter key names
    assert circle["support"]["filter"] == {"min_confidence": 0.2, "min_area": 0.01, "max_area": 0.9,
                                           "max_retries_factor": 5.0, "clip": None}
    assert "max_retries_factor: 5.0" in shapes_run
    assert (circle["support"]["prompts"], circle["support"]["steps"], circle["support"]["guidance"]) == ("shapes", 25, 4.0)
    assert star["bank"]["k_parts"] == 4 and circle["bank"]["k_parts"] == 32
    assert star["support"]["filter"]["min_area"] == 0.05 and star["support"]["filter"]["max_retries_factor"] == 5.0


def test_bank_config_on_another_model_uses_ovdiffs_recipe():
    cfg = load_bank_build_config(None, [], {"classes": ["cat"], "model": "some/model", "steps": 10})
    sup = cfg.class_spec("cat")["support"]
    assert sup["prompts"] == "a good picture of a {class}" and sup["steps"] == 10 and sup["guidance"] == 8.0
    assert sup["filter"] == {"min_confidence": 0.0, "min_area": 0.0, "max_area": 1.0, "max_retries_factor": 1.0,
                             "clip": None}


@pytest.mark.parametrize("overrides, message", [
    (["stuff_classes=[sky]"], "stuff_classes names ['sky'], which are not in classes"),
    (["class_overrides.dog.k_parts=2"], "class_overrides names ['dog'], which are not in classes"),
    (["classes=[a, a]"], "key 'classes': Value error, class names repeat"),
    (["classes=['../x']"], "path separators and '..' are not allowed"),
    (["filter.max_retries_factor=0.5"], "key 'filter.max_retries_factor': Input should be greater than or equal to 1"),
    (["filter.max_tries_factor=2"], "key 'filter.max_tries_factor': unknown key"),
])
def test_bad_bank_configs_are_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_bank_build_config(REPO / "configs" / "prototypes" / "shapes.yaml", overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_missing_model_or_support_run_is_refused_before_any_task(tmp_path):
    cfg = load_bank_build_config(None, [], {"classes": ["circle"], "model": str(tmp_path / "no-model")})
    with pytest.raises(ConfigError, match="key 'model': model .*no-model' not found"):
        cfg.check_sources()
    cfg = load_bank_build_config(None, [], {"classes": ["circle"], "support": str(tmp_path)})
    with pytest.raises(ConfigError, match="key 'support': must be 'generate' or a dataset run folder"):
        cfg.check_sources()


def test_banks_from_a_run_take_the_runs_stuff_classes_unless_given(tmp_path):
    from maskmill.shards import RunLayout

    RunLayout(tmp_path).create().write_classes(["circle", "sky", "grass"])
    (tmp_path / "config.yaml").write_text("classes: [circle, sky, grass]\nstuff_classes: [sky, grass]\n")
    from_run = load_bank_build_config(None, [], {"classes": ["circle", "sky"], "support": str(tmp_path)})
    assert [from_run.class_spec(c)["bank"]["stuff"] for c in ("circle", "sky")] == [False, True]
    given = load_bank_build_config(None, ["stuff_classes=[]"], {"classes": ["circle", "sky"], "support": str(tmp_path)})
    assert not given.class_spec("sky")["bank"]["stuff"]


def test_the_build_prototypes_command_refuses_bad_options_in_one_line(capsys):
    from flows.build_prototypes import main

    assert main(["--config", str(REPO / "configs" / "prototypes" / "shapes.yaml"), "--k-parts", "-2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert err.endswith("shapes.yaml: key 'k_parts': Input should be greater than or equal to 0")


def test_every_shipped_job_config_parses():
    """configs/*.yaml are runs (tests/test_config.py); configs/train/ and configs/prototypes/ hold job configs."""
    train = sorted((REPO / "configs" / "train").glob("*.yaml"))
    banks = sorted((REPO / "configs" / "prototypes").glob("*.yaml"))
    assert train and banks
    for path in train:
        assert config_from_args(["--config", str(path)]).steps > 0
    for path in banks:
        assert load_bank_build_config(path).classes
