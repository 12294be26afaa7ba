"""`maskmill generate`: the flow by default, the direct runner with --direct; bad flags refused before any work."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from maskmill.cli import main
from maskmill.run.writers_log import read_writers_log
from maskmill.shards import RunLayout, validate_run
from runs import write_config


@pytest.mark.parametrize("flags, message", [
    (["--ready"], "--ready, --no-progress and --no-finalize apply to --direct runs only"),
    (["--direct", "--shards", "0,x"], "--shards takes comma-separated shard ids (e.g. 0,3,7), got '0,x'"),
    (["--direct", "--shards", "9"], "shards [9] are outside this run's 2 shards (0..1)"),
])
def test_bad_flags_are_refused_before_any_work(tmp_path, tiny_model, capsys, flags, message):
    cfg = write_config(tmp_path / "c.yaml", tiny_model, tmp_path / "run", images_per_class=1)
    assert main(["generate", "--config", str(cfg), *flags]) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"
    assert not (tmp_path / "run" / "shards").exists() or not list((tmp_path / "run" / "shards").iterdir())


def test_direct_run_of_some_shards_then_the_rest(tmp_path, tiny_model, capsys):
    cfg = write_config(tmp_path / "c.yaml", tiny_model, tmp_path / "run", images_per_class=1)  # 4 samples, 2 shards
    assert main(["generate", "--config", str(cfg), "--direct", "--shards", "1", "--no-progress", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["written"] == [1] and first["shards"] == 1 and not first["complete"] and first["valid"] is None
    assert main(["generate", "--config", str(cfg), "--direct", "--no-progress", "--json"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["written"] == [0] and second["complete"] and second["valid"] and second["accepted"] == 4
    assert Path(second["contact_sheet"]).is_file()
    assert sorted(e["shard"] for e in read_writers_log(tmp_path / "run") if e["event"] == "written") == [0, 1]
    assert validate_run(RunLayout(tmp_path / "run").root).ok


def test_a_run_folder_of_the_old_layout_is_refused_before_any_work(tmp_path, tiny_model, capsys):
    cfg = write_config(tmp_path / "c.yaml", tiny_model, tmp_path / "run", images_per_class=1)
    old = tmp_path / "run" / "shards"
    old.mkdir(parents=True)
    (old / "00000.parquet").write_bytes(b"PAR1")  # manifests lived beside the tars before
    assert main(["generate", "--config", str(cfg), "--direct"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: refusing to write into {tmp_path / 'run'}: its shards/ folder holds files "
                          "that are not shard tars (00000.parquet;"), err
    assert sorted(p.name for p in (tmp_path / "run").rglob("*")) == ["00000.parquet", "shards"]
