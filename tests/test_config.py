"""Run configs and prompt sets: bad input is refused with a message naming the key, before any work."""
from pathlib import Path

import numpy as np
import pytest
import yaml

from maskmill.config import ConfigError, load_config, parse_config
from maskmill.prompts import PromptSetError, load_prompt_set, sample_prompt

BASE = {"classes": ["circle", "star"], "prompts": "shapes", "model": "shapes-sd"}


def write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_shipped_configs_parse_without_files():
    from maskmill.extractors import get_extractor

    for path in Path("configs").glob("*.yaml"):
        cfg = load_config(path, check_files=False)
        assert cfg.total_samples > 0
        get_extractor(cfg.extractor.name, **cfg.extractor.params)  # its parameters build the extractor
    sd15 = load_config("configs/sd15-photo.yaml", check_files=False)  # the 512-px config records less (README)
    assert get_extractor(sd15.extractor.name, **sd15.extractor.params).refine_steps == (0.7, 1.0)


@pytest.mark.parametrize("change, key, words", [
    ({"bogus": 1}, "bogus", "unknown key"),
    ({"steps": "many"}, "steps", "integer"),
    ({"images_per_class": -3}, "images_per_class", "greater than 0"),
    ({"batch_size": 0}, "batch_size", "greater than 0"),
    ({"classes": []}, "classes", "at least 1"),
    ({"height": 30}, "height", "multiple of 8"),
    ({"scheduler": "magic"}, "scheduler", "ddim"),
    ({"extractor": {"name": "seediff", "colour": 1}}, "extractor.colour", "unknown key"),
    ({"classes": ["../../etc"]}, "classes", "must be letters"),
    ({"stuff_classes": ["sky"]}, "(top level)", "not in classes"),
])
def test_bad_values_name_the_key(tmp_path, change, key, words):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, {**BASE, **change}), check_files=False)
    msg = str(e.value)
    assert f"key '{key}'" in msg and words in msg, msg


def test_missing_model_path_is_refused(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, {**BASE, "model": str(tmp_path / "nope")}))
    assert "key 'model'" in str(e.value) and "nope" in str(e.value)


def test_unknown_extractor_and_bad_params_refused(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(ConfigError, match="key 'extractor': unknown extractor 'magic'"):
        parse_config({**BASE, "model": str(tmp_path), "extractor": {"name": "magic"}}, check_files=True)
    with pytest.raises(ConfigError, match="bad parameters for extractor 'seediff'"):
        parse_config({**BASE, "model": str(tmp_path), "extractor": {"name": "seediff", "params": {"nope": 1}}})


def test_template_without_class_slot_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"slots": {"colour": ["red"]}, "single": ["a {colour} thing"]}))
    with pytest.raises(PromptSetError, match="needs exactly one {class} slot"):
        load_prompt_set(bad)
    with pytest.raises(ConfigError, match="key 'prompts'"):
        load_config(write(tmp_path, {**BASE, "prompts": str(bad)}))


def test_overrides_replace_single_keys(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["steps=7", "filter.min_area=0.5", "classes=[circle, square]"],
                      check_files=False)
    assert cfg.steps == 7 and cfg.filter.min_area == 0.5 and cfg.classes == ["circle", "square"]
    with pytest.raises(ConfigError, match="key=value"):
        load_config(write(tmp_path, BASE), ["steps"], check_files=False)


def test_prompt_sampling_is_deterministic_and_marks_seed_phrases():
    ps = load_prompt_set("shapes")
    a = sample_prompt(ps, ["circle", "star"], np.random.default_rng([0, 5]))
    b = sample_prompt(ps, ["circle", "star"], np.random.default_rng([0, 5]))
    assert a == b
    assert [c.name for c in a.classes] == ["circle", "star"]
    colours = [c.phrase.split()[0] for c in a.classes]
    assert len(set(colours)) == 2  # 'distinct: [colour]'
    for c in a.classes:
        assert c.phrase.endswith(c.name) and c.phrase in a.text
    photo = sample_prompt(load_prompt_set("photo"), ["potted plant"], np.random.default_rng(1))
    assert photo.classes[0].phrase == "potted plant" and "[" not in photo.text
