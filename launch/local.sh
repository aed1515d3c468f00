#!/usr/bin/env bash
# Local launcher: runs a fac_jax entry point on this machine's devices (CPU, or local GPUs/TPU).
# Usage: launch/local.sh [module] [flags...]   e.g. launch/local.sh fac_jax.demo --steps=20
set -euo pipefail
cd "$(dirname "$0")/.."
module=${1:-fac_jax.demo}
shift || true
exec "${PYTHON:-python3}" -m "$module" "$@"
