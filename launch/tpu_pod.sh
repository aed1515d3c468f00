#!/usr/bin/env bash
# TPU-pod launcher: ships this checkout to every worker of a Cloud TPU VM slice, installs it once
# (jax[tpu] and the pinned requirements in a venv), then runs the same command on all workers at
# once; jax.distributed finds the other workers from the TPU metadata (--multihost).
# Usage: launch/tpu_pod.sh TPU_NAME ZONE [module] [flags...]
#   e.g. launch/tpu_pod.sh my-v5p-64 us-east5-a fac_jax.train.trainer --config=configs/fac_8b.py:stage1 \
#          --workdir=gs://bucket/stage1 --config.data.dir=gs://bucket/data
# Environment: PROJECT (gcloud project, optional), JAX_TPU_VERSION (default the pinned jax).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 TPU_NAME ZONE [module] [flags...]" >&2
  exit 2
fi
tpu=$1 zone=$2
shift 2
module=${1:-fac_jax.train.trainer}
shift || true
# The module and flags go into a remote shell command: the module must be a dotted name.
if [[ ! $module =~ ^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$ ]]; then
  echo "$0: module '$module' is not a Python module name (e.g. fac_jax.train.trainer)" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
jax_version=${JAX_TPU_VERSION:-$(sed -n 's/^jax==//p' requirements.txt)}
project_flag=${PROJECT:+--project=$PROJECT}

archive=$(mktemp -d)/fac_jax.tgz
tar czf "$archive" --exclude=.venv --exclude=.git --exclude='*.egg-info' .
gcloud compute tpus tpu-vm scp "$archive" "$tpu":fac_jax.tgz --worker=all --zone="$zone" $project_flag

setup="mkdir -p fac_jax && tar xzf fac_jax.tgz -C fac_jax && cd fac_jax && \
(test -x .venv/bin/python || python3 -m venv .venv) && \
.venv/bin/pip install -q -r requirements.txt -e . 'jax[tpu]==$jax_version'"
run=$(printf ' %q' -m "$module" --multihost "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --worker=all --zone="$zone" $project_flag \
  --command="$setup && .venv/bin/python$run"
