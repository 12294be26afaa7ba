"""Bad input never costs a run: class names the text encoder would cut off and outputs that cannot
be written are refused in one line before anything is written or Prefect starts; a run folder that
completed no shard does not block a corrected config."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml

from maskmill.config import ConfigError, load_config
from maskmill.models import load_tokenizer
from maskmill.plan import RunPlan
from maskmill.run.folder import RUN_INFO, RunConflictError, check_output_writable, check_run_folder, prepare_run
from maskmill.run.locks import LOCKS_DIR
from maskmill.shards.layout import RunLayout
from maskmill.tokens import phrase_token_indices

REPO = Path(__file__).resolve().parents[1]
LONG_NAME = "x" * 300


def write_config(path: Path, output: Path, **changes) -> Path:
    """configs/shapes.yaml (embedded model, shapes prompt set) with `output` and changes applied."""
    data = yaml.safe_load((REPO / "configs" / "shapes.yaml").read_text())
    data.update(output=str(output), **changes)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def one_line(message: str) -> str:
    assert message and "\n" not in message.strip() and "Traceback" not in message, message
    return message


# --- 1. class names the text encoder cannot hold --------------------------------------------------
def test_300_character_class_refused_at_validation_naming_it(tmp_path):
    cfg_path = write_config(tmp_path / "c.yaml", tmp_path / "run", classes=["circle", "square", "star", LONG_NAME])
    with pytest.raises(ConfigError) as err:
        load_config(cfg_path)
    msg = one_line(str(err.value))
    assert "key 'classes'" in msg and LONG_NAME[:30] in msg and "300 characters" in msg and "77-token" in msg
    assert not (tmp_path / "run").exists()


def test_a_class_pushed_out_only_by_a_multi_class_template_is_refused(tmp_path):
    """Alone ("a red NAME") the name fits; after another class ("a red A and a yellow NAME") it does not."""
    tok = load_tokenizer("shapes-sd")
    n_words = next(n for n in range(60, 76)
                   if len(tok("a red " + "big " * n + "and a yellow circle", add_special_tokens=False).input_ids) > 75)
    fits_alone = " ".join(["big"] * n_words)
    assert len(tok("a yellow " + fits_alone, add_special_tokens=False).input_ids) <= 75
    ok = write_config(tmp_path / "one.yaml", tmp_path / "run", classes=["circle", fits_alone],
                      classes_per_image={1: 1.0})
    assert load_config(ok).classes[1] == fits_alone
    bad = write_config(tmp_path / "two.yaml", tmp_path / "run", classes=["circle", fits_alone],
                       classes_per_image={1: 0.5, 2: 0.5})
    with pytest.raises(ConfigError, match=r"class 'big big .*\{a\}\] and a \[\{colour\} \{b\}\]"):
        load_config(bad)


def test_a_config_that_validates_has_every_planned_phrase_in_its_prompts(tmp_path):
    """The check is not too lenient: the longest name that passes still seeds every planned sample."""
    tok = load_tokenizer("shapes-sd")
    longest = None
    for n in range(50, 76):
        name = " ".join(["big"] * n)
        try:
            cfg = load_config(write_config(tmp_path / "c.yaml", tmp_path / "run",
                                           classes=["circle", "square", "star", name]))
        except ConfigError:
            break
        longest = cfg
    assert longest is not None and n > 50  # some long names pass, a longer one does not
    plan = RunPlan(longest)
    for index in range(200):
        for c in plan.sample(index).prompt.classes:
            assert phrase_token_indices(tok, plan.sample(index).prompt.text, c.phrase)


def test_prompt_set_without_a_template_for_the_class_count_refused(tmp_path):
    cfg_path = write_config(tmp_path / "c.yaml", tmp_path / "run", classes=["circle", "square", "star", "triangle"],
                            classes_per_image={1: 0.5, 4: 0.5})
    with pytest.raises(ConfigError, match="has no template for 4 classes"):
        load_config(cfg_path)


def test_cli_refuses_long_class_before_prefect(tmp_path, capsys, monkeypatch):
    import maskmill.run.orchestrate as orchestrate
    from maskmill.cli import main

    monkeypatch.setattr(orchestrate, "generate", lambda *a, **k: pytest.fail("the run started"))
    cfg_path = write_config(tmp_path / "c.yaml", tmp_path / "run", classes=["circle", "square", "star", LONG_NAME])
    assert main(["generate", "--config", str(cfg_path)]) == 2
    err = one_line(capsys.readouterr().err)
    assert err.startswith("error: ") and "300 characters" in err
    assert not (tmp_path / "run").exists()


# --- 1. a run folder that completed no shard ------------------------------------------------------------
def _partial_run(tmp_path: Path) -> tuple[Path, RunLayout]:
    """A run of the long-class-free config, interrupted before any shard was complete."""
    cfg_path = write_config(tmp_path / "c.yaml", tmp_path / "run", classes=["circle", "square"],
                            classes_per_image={1: 1.0}, images_per_class=2, shard_size=2)
    layout = prepare_run(load_config(cfg_path), cfg_path)
    layout.shard(0).tar_tmp.write_bytes(b"half a tar")
    layout.shard(1).tar.write_bytes(b"a tar without stats")  # not complete: no stats file
    return cfg_path, layout


def test_partial_run_of_another_config_is_replaced(tmp_path, caplog):
    cfg_path, layout = _partial_run(tmp_path)
    old = json.loads((layout.root / RUN_INFO).read_text())["fingerprint"]
    corrected = load_config(cfg_path, ["steps=3"])
    check_run_folder(corrected)  # the CLI's check before Prefect: no refusal
    with caplog.at_level(logging.WARNING, logger="maskmill.run.folder"):
        prepare_run(corrected, cfg_path)
    lines = [r.getMessage() for r in caplog.records if "replacing the run" in r.getMessage()]
    assert len(lines) == 1 and one_line(lines[0])
    assert old in lines[0] and corrected.fingerprint() in lines[0] and "steps: 25 -> 3" in lines[0]
    assert json.loads((layout.root / RUN_INFO).read_text())["fingerprint"] == corrected.fingerprint()
    assert not layout.shard_ids_on_disk()  # the old run's partial shards went with it
    assert "steps: 3" in (layout.root / "config.yaml").read_text()


def test_run_with_a_completed_shard_still_refuses_another_config(tmp_path):
    cfg_path, layout = _partial_run(tmp_path)
    layout.shard(1).stats.write_text("{}")  # shard 1 now complete
    with pytest.raises(RunConflictError, match="refusing to mix runs.*steps: 25 -> 3"):
        check_run_folder(load_config(cfg_path, ["steps=3"]))
    assert layout.shard(1).tar.read_bytes() == b"a tar without stats"


def test_partial_run_being_written_is_not_replaced(tmp_path):
    cfg_path, layout = _partial_run(tmp_path)
    from maskmill.run.process import me

    (layout.root / LOCKS_DIR / "00000.lock").write_text(json.dumps(me()))  # a live writer: this process
    with pytest.raises(RunConflictError, match="shard 0 of it is being written"):
        prepare_run(load_config(cfg_path, ["steps=3"]), cfg_path)
    assert layout.shard(0).tar_tmp.read_bytes() == b"half a tar"


# --- 2. outputs that cannot be written -------------------------------------------------------------------
def test_output_that_is_a_file_refused(tmp_path):
    f = tmp_path / "taken"
    f.write_text("not a folder")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        check_output_writable(str(f))
    with pytest.raises(ConfigError, match=r"lies under .*taken, which is a file"):
        check_output_writable(str(f / "run"))
    assert f.read_text() == "not a folder"


@pytest.mark.parametrize("output", ["/proc/1/maskmill-run", "/proc/maskmill-run/deeper"])
def test_output_where_no_folder_can_be_made_refused(output):
    """/proc refuses new folders even to root (tests run as root, so permission bits would not)."""
    with pytest.raises(ConfigError, match="cannot be written: no folder can be made in /proc"):
        check_output_writable(output)
    assert not Path(output).exists()


def test_writable_output_passes_and_leaves_nothing(tmp_path):
    check_output_writable(str(tmp_path / "a" / "b"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["file", "proc"])
def test_cli_refuses_unwritable_output_before_prefect(tmp_path, capsys, monkeypatch, where):
    import maskmill.run.orchestrate as orchestrate
    from maskmill.cli import main

    monkeypatch.setattr(orchestrate, "generate", lambda *a, **k: pytest.fail("the run started"))
    (tmp_path / "taken").write_text("x")
    output = tmp_path / "taken" / "run" if where == "file" else Path("/proc/1/maskmill-run")
    cfg_path = write_config(tmp_path / "c.yaml", output)
    assert main(["generate", "--config", str(cfg_path)]) == 2
    err = one_line(capsys.readouterr().err)
    assert err.startswith("error: output ") and str(output) in err


def test_distinct_slot_too_short_for_a_template_refused(tmp_path):
    """Two colours cannot give three objects distinct colours: refused at validation, not mid-run."""
    prompts = tmp_path / "two-colours.yaml"
    prompts.write_text(yaml.safe_dump({
        "slots": {"colour": ["red", "blue"]}, "distinct": ["colour"], "single": ["a [{colour} {class}]"],
        "multi": ["a [{colour} {a}], a [{colour} {b}] and a [{colour} {c}]"]}))
    cfg_path = write_config(tmp_path / "c.yaml", tmp_path / "run", prompts=str(prompts),
                            classes_per_image={1: 0.5, 3: 0.5})
    with pytest.raises(ConfigError, match="key 'prompts': slot 'colour' ran out of distinct values"):
        load_config(cfg_path)


def test_shard_worker_of_another_config_never_replaces_a_run(tmp_path):
    """Only a run's start replaces a partial run; a produce task (clean=False) of another config is refused."""
    cfg_path, layout = _partial_run(tmp_path)
    before = (layout.root / RUN_INFO).read_text()
    with pytest.raises(RunConflictError, match="holds a run of another config"):
        prepare_run(load_config(cfg_path, ["steps=3"]), cfg_path, clean=False)
    assert (layout.root / RUN_INFO).read_text() == before and layout.shard(0).tar_tmp.exists()
