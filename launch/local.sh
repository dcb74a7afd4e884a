#!/usr/bin/env bash
# Runs the flava_jax binary on this machine (CPU or local accelerators).
#   launch/local.sh [CONFIG_ARG] [WORKDIR] [extra flags...]
# e.g. launch/local.sh tiny /tmp/flava_tiny --config.seed=1
set -euo pipefail
cd "$(dirname "$0")/.."
arg="${1:-tiny}"; workdir="${2:-/tmp/flava_${arg}}"
shift $(( $# > 2 ? 2 : $# ))
exec python -m flava_jax.main --config="configs/flava.py:${arg}" --workdir="${workdir}" "$@"
