"""A command line that explains itself: help on every flag and subcommand, `--version`, `python -m maskmill`,
one bad input per subcommand answered with one `error:` line and exit status 2, and nothing served on a
bad cron or config."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

import maskmill
from maskmill.cli import build_parser, main
from test_shards import make_run

REPO = Path(__file__).resolve().parents[1]


def _parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, parser) for the parser and every subcommand below it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*path, name))


ALL_COMMANDS = [path for path, _ in _parsers(build_parser())]


def test_every_flag_and_subcommand_has_help():
    missing = []
    for path, parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                missing += [f"{' '.join(path)} {c.dest}" for c in action._choices_actions if not c.help]
            elif not isinstance(action, argparse._HelpAction) and not action.help:
                missing.append(f"{' '.join(path) or 'maskmill'} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, f"no help text: {missing}"
    assert ("prototypes", "build") in ALL_COMMANDS and ("export",) in ALL_COMMANDS


def test_the_trainers_own_flags_have_help_too(monkeypatch):
    """`maskmill toyworld train` hands its options to the trainer's parser: every flag there has help."""
    from maskmill.toyworld.train import config_from_args

    seen = []

    def capture(self, args=None, namespace=None):
        seen.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(SystemExit):
        config_from_args([], prog="maskmill toyworld train")
    no_help = [a.dest for a in seen[0]._actions if not isinstance(a, argparse._HelpAction) and not a.help]
    assert seen[0].prog == "maskmill toyworld train" and not no_help, no_help


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=lambda p: " ".join(p) or "maskmill")
def test_every_subcommand_help_runs(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: maskmill") and len(out.splitlines()) > 3


def test_toyworld_help_describes_every_subcommand(capsys):
    with pytest.raises(SystemExit):
        main(["toyworld", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines: compare the words
    for name, words in (("train", "train the micro SD"), ("eval", "colour and shape accuracy"),
                        ("bench-masks", "every extractor's mIoU"), ("bench-ovdiff", "OVDiff banks from generated")):
        assert f"{name} {words}" in text, (name, text)


def test_version_and_python_dash_m_work_like_the_script():
    run = lambda *args: subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO,  # noqa: E731
                                       env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=120)
    by_module = run("-m", "maskmill", "--version")
    assert by_module.returncode == 0 and by_module.stdout.strip() == f"maskmill {maskmill.__version__}"
    assert run("-m", "maskmill.cli", "--version").stdout == by_module.stdout
    bad = run("-m", "maskmill", "preview", str(REPO / "no-such-run"))
    assert bad.returncode == 2 and bad.stderr.strip() == f"error: run folder {REPO / 'no-such-run'} does not exist"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    (root / "empty").mkdir()
    started = make_run(root / "started", shards=0)  # classes.json, no shard yet
    done = make_run(root / "done", shards=1, n=4)
    return {"empty": root / "empty", "started": started.root, "done": done.root, "root": root}


def bad_inputs(r: dict) -> list[tuple[list[str], str]]:
    """One bad input per subcommand, and the start of the one line it must answer."""
    return [
        (["generate", "--config", str(r["root"] / "missing.yaml")], "config file"),
        (["preview", str(r["empty"])], "is not a maskmill run folder (no classes.json)"),
        (["preview", str(r["started"])], "has no completed shard yet: nothing to preview"),
        (["validate", str(r["root"] / "missing")], "run folder"),
        (["export", str(r["done"]), "--format", "mmseg", "--out", str(r["root"] / "x"), "--val-fraction", "1.5"],
         "--val-fraction must be in [0, 1), got 1.5"),
        (["serve", "--config", "configs/shapes.yaml", "--cron", "bad"], "--cron 'bad' is not a cron schedule"),
        (["serve", "--job", "prototypes", "--config", "configs/prototypes/shapes.yaml", "--cron", "61 * * * *"],
         "--cron '61 * * * *' is not a cron schedule"),
        (["serve", "--config", "configs/shapes.yaml", "--set", "steps=0"], "configs/shapes.yaml: key 'steps'"),
        (["prototypes", "build", "--config", "configs/prototypes/shapes.yaml", "--set", "k_parts=-1"],
         "configs/prototypes/shapes.yaml: key 'k_parts'"),
        (["prototypes", "build", "--config", "configs/prototypes/shapes.yaml", "--support", str(r["empty"])],
         "key 'support'"),
        (["segment", str(r["root"] / "none.png"), "--bank", "b.safetensors", "--classes", "a"], "image file(s) not found"),
        (["toyworld", "train", "--out", str(r["root"] / "m"), "--set", "nokey=1"], "options: key 'nokey': unknown key"),
        (["toyworld", "eval", "--model", "no-such-model"], "model 'no-such-model' not found"),
        (["toyworld", "bench-masks", "--model", "no-such-model"], "model 'no-such-model' not found"),
        (["toyworld", "bench-ovdiff", "--model", "no-such-model"], "model 'no-such-model' not found"),
        (["toyworld", "train-clip", "--out", str(r["root"] / "c"), "--steps", "0"], "steps"),
        (["toyworld", "eval-clip", "--clip", str(r["root"] / "no-clip")], "not found"),
        (["toyworld", "clip-pool", "--out", str(r["root"] / "pool.txt")], "--out must name an .npz file"),
        (["train-segmenter", "--data", str(r["empty"]), "--val", str(r["empty"]), "--out", str(r["root"] / "s")],
         "not a maskmill run (no classes.json)"),
        (["evaluate-segmenter", "--ckpt", str(r["root"] / "no-ckpt"), "--data", str(r["empty"])],
         "no segmenter checkpoint"),
        (["toyworld", "render-testset", "--n", "0", "--out", str(r["root"] / "t")], "--n must be positive, got 0"),
        (["toyworld", "bench-downstream", "--steps", "0"], "steps: Input should be greater than 0"),
    ]


def test_every_subcommand_answers_a_bad_input_with_one_line(runs, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    import flows.scheduled

    served = []
    monkeypatch.setattr(flows.scheduled, "serve", lambda *a, **k: served.append(a))
    monkeypatch.setattr(flows.scheduled, "serve_prototypes", lambda *a, **k: served.append(a))
    covered = set()
    for argv, start in bad_inputs(runs):
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and start in err, (argv, err)
        covered.add(tuple(a for a in argv[:2] if not a.startswith(("-", "/"))))
    assert not served, "a bad cron or config must be refused before serving"
    leaves = {p for p in ALL_COMMANDS if p and not any(q[:len(p)] == p and q != p for q in ALL_COMMANDS)}
    assert leaves <= covered, f"subcommands without a bad-input case: {leaves - covered}"


def test_serve_checks_then_serves_the_job_it_names(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    import flows.scheduled

    served = []
    monkeypatch.setattr(flows.scheduled, "serve", lambda **k: served.append(("generate", k)))
    monkeypatch.setattr(flows.scheduled, "serve_prototypes", lambda cfg, **k: served.append(("prototypes", cfg, k)))
    assert main(["serve", "--config", "configs/shapes.yaml", "--cron", "*/5 * * * *"]) == 0
    assert main(["serve", "--job", "prototypes", "--config", "configs/prototypes/shapes.yaml", "--cron", "0 4 * * 1",
                 "--set", "k_parts=8"]) == 0
    assert served[0] == ("generate", {"config_path": "configs/shapes.yaml", "cron": "*/5 * * * *",
                                      "name": "maskmill-nightly", "overrides": []})
    kind, cfg, kwargs = served[1]
    assert kind == "prototypes" and cfg.k_parts == 8 and kwargs == {"cron": "0 4 * * 1", "name": "maskmill-banks"}


def test_prototype_deployment_has_the_cron_and_absolute_folders(monkeypatch):
    monkeypatch.chdir(REPO)
    from flows.scheduled import build_prototypes_deployment
    from maskmill.prototypes.build_config import load_bank_build_config

    cfg = load_bank_build_config("configs/prototypes/shapes.yaml")
    dep = build_prototypes_deployment(cfg, cron="0 4 * * *", name="banks")
    assert dep.name == "banks" and dep.schedules[0].schedule.cron == "0 4 * * *"
    params = dep.parameters["config"]
    assert params["cache_root"] == str(REPO / "outputs" / "banks") and Path(params["out"]).is_absolute()
    assert params["classes"] == ["circle", "square", "triangle", "star"]


def test_export_command_round_trips(runs, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from maskmill.shards import iter_samples

    out = tmp_path / "mmseg"
    assert main(["export", str(runs["done"]), "--format", "mmseg", "--out", str(out), "--val-fraction", "0.5",
                 "--seed", "3"]) == 0
    assert capsys.readouterr().out.startswith("exported ")
    keys = {split: (out / "splits" / f"{split}.txt").read_text().split() for split in ("train", "val")}
    assert sorted(keys["train"] + keys["val"]) == sorted(s.key for s in iter_samples(runs["done"]))
    for s in iter_samples(runs["done"]):
        split = "train" if s.key in keys["train"] else "val"
        np.testing.assert_array_equal(np.asarray(Image.open(out / "ann_dir" / split / f"{s.key}.png")), s.mask)
    meta = json.loads((out / "metainfo.json").read_text())
    assert meta["classes"][0] == "background" and len(meta["palette"]) == len(meta["classes"])

