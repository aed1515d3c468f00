#!/usr/bin/env bash
# Local launcher: runs a fac_jax entry point on this machine's devices (CPU, or local GPUs/TPU).
# Usage: launch/local.sh [module] [flags...]   e.g. launch/local.sh fac_jax.pipeline --smoke
set -euo pipefail
cd "$(dirname "$0")/.."
module=${1:-fac_jax.pipeline}
shift || true
exec "${PYTHON:-python3}" -m "$module" "$@"
