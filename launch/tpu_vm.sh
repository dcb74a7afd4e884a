#!/usr/bin/env bash
# Creates a Cloud TPU VM (one host or a pod slice) and runs the flava_jax binary on every worker.
#
#   launch/tpu_vm.sh create NAME ZONE ACCELERATOR [RUNTIME]   e.g. create flava us-east5-a v5p-128
#   launch/tpu_vm.sh setup  NAME ZONE                         copy this checkout, install it
#   launch/tpu_vm.sh run    NAME ZONE CONFIG_ARG WORKDIR [flags...]
#                                                             e.g. run flava us-east5-a full gs://b/run1
#   launch/tpu_vm.sh delete NAME ZONE
#
# WORKDIR should be a gs:// path every worker can write (Orbax checkpoints, metrics). Every worker
# runs the same command; --multiprocess makes each call jax.distributed.initialize(). Restarting
# `run` with the same WORKDIR resumes from the last checkpoint (after a preemption, for instance).
set -euo pipefail
cmd="${1:?create|setup|run|delete}"; name="${2:?TPU name}"; zone="${3:?zone}"
shift 3
gc() { gcloud compute tpus tpu-vm "$@" --zone="${zone}"; }
case "${cmd}" in
  create)
    accelerator="${1:?accelerator type, e.g. v5p-128}"; runtime="${2:-v2-alpha-tpuv5}"
    gc create "${name}" --accelerator-type="${accelerator}" --version="${runtime}" ;;
  setup)
    cd "$(dirname "$0")/.."
    tar czf /tmp/flava_jax_src.tgz --exclude=.venv --exclude=.git .
    gc scp /tmp/flava_jax_src.tgz "${name}:~/" --worker=all
    gc ssh "${name}" --worker=all --command="mkdir -p ~/flava_jax && tar xzf ~/flava_jax_src.tgz \
      -C ~/flava_jax && cd ~/flava_jax && python3 -m venv .venv && . .venv/bin/activate && \
      pip install -q -r requirements.txt 'jax[tpu]'" ;;
  run)
    arg="${1:?config arg, e.g. full}"; workdir="${2:?workdir, e.g. gs://bucket/run}"; shift 2
    gc ssh "${name}" --worker=all --command="cd ~/flava_jax && . .venv/bin/activate && \
      python -m flava_jax.main --multiprocess --config=configs/flava.py:${arg} \
      --workdir=${workdir} $*" ;;
  delete)
    gc delete "${name}" --quiet ;;
  *)
    echo "unknown command ${cmd}: create|setup|run|delete" >&2; exit 2 ;;
esac
