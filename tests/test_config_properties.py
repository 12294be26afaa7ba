"""Property tests: any mapping either loads as a config (or prompt set) or is refused with the
project's one-line error; never a traceback of another exception type."""
from __future__ import annotations

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maskmill.config import ConfigError, RunConfig, load_config, parse_config
from maskmill.prompts import PromptSetError, load_prompt_set

# Plain YAML values, nested a little: what a hand-edited file can hold.
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=10)
# Keys a config really has, besides random ones, so that validation goes past "unknown key".
config_keys = st.one_of(st.sampled_from(sorted(RunConfig.model_fields)), st.text(max_size=10))
config_like = st.dictionaries(config_keys, values, max_size=8)
nested = st.fixed_dictionaries({}, optional={
    "classes": st.one_of(values, st.lists(st.text(max_size=8), max_size=5)),
    "classes_per_image": st.one_of(values, st.dictionaries(st.integers(-3, 6), st.floats(-1, 2), max_size=3)),
    "extractor": st.one_of(values, st.fixed_dictionaries({"name": st.text(max_size=8)}, optional={"params": values})),
    "filter": st.one_of(values, st.dictionaries(st.sampled_from(["min_confidence", "min_area", "max_area",
                                                                 "max_retries_factor", "x"]), values)),
    "height": values, "steps": values, "prompts": values, "model": values,
})
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _one_line(e: Exception) -> None:
    msg = str(e)
    assert msg and "Traceback" not in msg


@SETTINGS
@given(st.one_of(config_like, nested))
def test_any_mapping_loads_or_raises_config_error(data):
    try:
        cfg = parse_config(data, "prop.yaml", check_files=False)
    except ConfigError as e:
        _one_line(e)
    else:
        assert isinstance(cfg, RunConfig)


@SETTINGS
@given(st.one_of(values, config_like, nested))
def test_any_yaml_file_loads_or_raises_config_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    try:
        load_config(path, check_files=False)
    except ConfigError as e:
        _one_line(e)


prompt_like = st.one_of(
    values,
    st.fixed_dictionaries({}, optional={
        "slots": st.one_of(values, st.dictionaries(st.sampled_from(["colour", "x", "a"]),
                                                   st.one_of(values, st.lists(scalars, max_size=3)))),
        "single": st.one_of(values, st.lists(st.sampled_from(["a {class}", "a [{colour} {class}]", "{a} {b}",
                                                              "[{class}", "a [{x} {class}]", "no slot"]) | scalars,
                                             max_size=3)),
        "multi": st.one_of(values, st.lists(st.sampled_from(["a [{a}] and [{b}]", "{b} {a}", "{class} {a}"]) | scalars,
                                            max_size=3)),
        "distinct": st.one_of(values, st.lists(st.sampled_from(["colour", "x"]) | scalars, max_size=2)),
        "description": values,
    }))


@SETTINGS
@given(prompt_like)
def test_any_prompt_set_loads_or_raises_prompt_set_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("prompts") / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    try:
        load_prompt_set(path)
    except PromptSetError as e:
        _one_line(e)


def test_prompt_set_with_bad_yaml_is_one_line(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("single: [a {class}\n")
    try:
        load_prompt_set(path)
    except PromptSetError as e:
        assert "not valid YAML" in str(e) and "\n" not in str(e)
    else:
        raise AssertionError("bad YAML was accepted")
