#!/usr/bin/env bash
# The main job on the embedded default: shapes-world SD -> SeeDiff masks -> WebDataset shards.
# Extra arguments go to `maskmill generate` (e.g. --set images_per_class=64).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 HF_HUB_OFFLINE=1
exec maskmill generate --config configs/shapes.yaml "$@"
