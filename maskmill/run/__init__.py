"""Runs: the run folder, shard claiming, and the runners that fill a folder with shards.

    folder.py       prepare/reopen a run folder, refuse another config's run, pending shards
    process.py      process liveness (what a lock's owner is)
    locks.py        shard locks and the run-wide guard
    writers_log.py  writers.jsonl: who claimed, wrote or failed which shard
    claim.py        write one shard under its lock (the unit of work of every runner)
    pipelines.py    one pipeline per (model, scheduler, device) per worker process
    summary.py      counts over the completed shards, validation, contact sheet
    direct.py       the Prefect-free runner, on one process or each rank of a launch
    orchestrate.py  flow or direct runner: the only module here that imports `flows`
"""
