"""A run on a real S3 API: moto's server on 127.0.0.1, reached through s3fs with the endpoint and
credentials from the environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), as users configure it."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto")

from maskmill.config import load_config  # noqa: E402
from maskmill.run.direct import run_direct  # noqa: E402
from maskmill.shards import RunLayout, iter_samples, raw_samples, validate_run  # noqa: E402
from maskmill.storage import StorageError, check_output  # noqa: E402

from servers import s3_server  # noqa: E402
from runs import subprocess_env, write_config  # noqa: E402

BUCKET = "maskmill-test"


@pytest.fixture(scope="module")
def s3_env():
    """moto's S3 server, the AWS_* variables pointing at it, and an empty bucket."""
    import s3fs

    with s3_server() as endpoint:
        env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem().mkdir(BUCKET)
        try:
            yield env
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            s3fs.S3FileSystem.clear_instance_cache()


def _objects(prefix: str) -> list[str]:
    import s3fs

    fs = s3fs.S3FileSystem(use_listings_cache=False)
    return sorted(p.removeprefix(prefix + "/") for p in fs.find(prefix))


def test_direct_run_on_s3_writes_validates_resumes_and_reads(tmp_path, tiny_model, s3_env):
    url = f"s3://{BUCKET}/runs/shapes"
    check_output(url)
    with pytest.raises(StorageError, match=r"cannot write there \(") as err:
        check_output("s3://no-such-bucket-here/run")
    assert "\n" not in str(err.value)

    config = write_config(tmp_path / "c.yaml", tiny_model, url)
    cfg = load_config(config)
    first = run_direct(cfg, config, progress=False)
    assert first["run_dir"] == url and first["complete"] and first["valid"], first.get("validation")
    assert first["accepted"] == 8 and first["contact_sheet"] == f"{url}/contact_sheet.png"
    objects = _objects(f"{BUCKET}/runs/shapes")
    assert [o for o in objects if o.startswith("shards/")] == [f"shards/{i:05d}.tar" for i in range(4)]
    assert {"classes.json", "config.yaml", "run.json", "contact_sheet.png"} <= set(objects)
    assert not [o for o in objects if o.endswith(".tmp") or o.startswith("locks/") or o == "writers.jsonl"]

    assert validate_run(url).ok
    samples = list(iter_samples(url))
    assert len(samples) == 8 and samples[0].url.startswith(f"{url}/shards/")
    assert len(list(raw_samples(f"{url}/shards/00000.tar"))) == 2  # webdataset opens s3:// through fsspec

    again = run_direct(cfg, config, progress=False)
    assert again["written"] == [] and again["loaded_pipeline"] is False and again["valid"]


KILL_AT_STATS = textwrap.dedent("""
    import os, signal, sys
    from maskmill.config import load_config
    from maskmill.run.direct import run_direct
    from maskmill.shards.writer import ShardWriter

    upload_stats = ShardWriter._write_stats
    def die_at_shard_1(self, stats):
        if self.shard_id == 1:  # its tar and manifest are uploaded; the stats object is next
            os.kill(os.getpid(), signal.SIGKILL)
        upload_stats(self, stats)
    ShardWriter._write_stats = die_at_shard_1
    run_direct(load_config(sys.argv[1]), sys.argv[1], progress=False)
""")


def test_kill_between_tar_upload_and_stats_leaves_nothing_complete(tmp_path, tiny_model, s3_env):
    url = f"s3://{BUCKET}/runs/killed"
    config = write_config(tmp_path / "c.yaml", tiny_model, url)
    proc = subprocess.run([sys.executable, "-c", KILL_AT_STATS, str(config)], env={**subprocess_env(), **s3_env},
                          capture_output=True, timeout=600)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    objects = _objects(f"{BUCKET}/runs/killed")
    assert "shards/00001.tar" in objects and "manifests/00001.parquet" in objects  # uploaded whole...
    assert "stats/00001_stats.json" not in objects  # ...but not marked complete
    layout = RunLayout(url)
    assert layout.completed_shards() == [0]
    assert not validate_run(url).ok

    cfg = load_config(config)
    rerun = run_direct(cfg, config, progress=False)
    assert rerun["written"] == [1, 2, 3] and rerun["valid"], rerun.get("validation")
    assert layout.completed_shards() == [0, 1, 2, 3]


def test_flow_run_on_s3_tasks_read_the_frozen_config_from_the_bucket(tmp_path, tiny_model, s3_env, prefect_api):
    """The generate_dataset flow on an s3:// output: its shard tasks load the run's frozen config.yaml
    from the bucket (what fan-out slices on other hosts do), then it validates and draws the sheet."""
    from flows.generate_dataset import generate_dataset
    from maskmill.run.folder import resolved_config_path

    url = f"s3://{BUCKET}/runs/flow"
    config = write_config(tmp_path / "c.yaml", tiny_model, url, images_per_class=1)
    cfg = load_config(config)
    assert resolved_config_path(cfg) == f"{url}/config.yaml"
    summary = generate_dataset(str(config))
    assert summary["valid"] and summary["complete"] and summary["accepted"] == 4, summary
    assert summary["run_dir"] == url and summary["contact_sheet"] == f"{url}/contact_sheet.png"
    assert load_config(f"{url}/config.yaml").fingerprint() == cfg.fingerprint()
    assert RunLayout(url).completed_shards() == [0, 1]
