#!/usr/bin/env bash
# Runs the flava_jax training binary on this machine (CPU or local accelerators).
#   launch/local.sh [CONFIG] [WORKDIR] [extra flags...]
# CONFIG is a variant of configs/flava.py (tiny, full) or a config path with its argument
# (configs/mlm.py:full); the config's task decides what trains (configs/dvae.py: the dVAE).
# e.g. launch/local.sh tiny /tmp/flava_tiny --config.seed=1
#      launch/local.sh configs/dvae.py /tmp/flava_dvae
# PROCESSES=N runs it as an N-process job (python -m flava_jax.launch: one coordinator on
# localhost, as a pod slice's hosts); CPU_DEVICES=K gives each process K CPU devices (gloo):
#      PROCESSES=2 CPU_DEVICES=4 launch/local.sh tiny /tmp/flava_2x4
set -euo pipefail
cd "$(dirname "$0")/.."
arg="${1:-tiny}"
shift $(( $# > 0 ? 1 : 0 ))
case "${arg}" in
  *.py|*.py:*) config="${arg}" ;;
  *) config="configs/flava.py:${arg}" ;;
esac
name="$(basename "${config%%:*}" .py)"
workdir="${1:-/tmp/flava_${name}}"
shift $(( $# > 0 ? 1 : 0 ))
main=(python -m flava_jax.main --config="${config}" --workdir="${workdir}" "$@")
if [[ -n "${PROCESSES:-}" ]]; then
  exec python -m flava_jax.launch --processes="${PROCESSES}" \
    --cpu_devices="${CPU_DEVICES:-0}" -- "${main[@]}"
fi
exec "${main[@]}"
