#!/usr/bin/env bash
# The whole test suite (no network beyond package registries, no GPU). Extra arguments go to pytest.
# The scale-out tests start a real PostgreSQL, Prefect server and S3 API (moto) on 127.0.0.1;
# PostgreSQL comes from Debian's package, installed here if missing (root or sudo needed).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null
  # Debian starts a cluster of its own on install; the tests start theirs on a free port.
  $SUDO service postgresql stop >/dev/null 2>&1 || true
fi
bash scripts/setup.sh
. .venv/bin/activate
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec python -m pytest "$@"
