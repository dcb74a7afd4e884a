#!/usr/bin/env bash
# Downloads into .whl/ the wheels a prepared GPU machine lacks, for its Python 3.12 on x86-64.
#   launch/gpu_wheels.sh
# The machine this is written for (docs/performance.md, "On a GPU") has jax 0.11 with CUDA,
# flax, optax, orbax, chex, absl-py, transformers, torch, pillow, etils, protobuf, PyYAML and
# cloudpickle, but not grain, array-record, ml-collections, portpicker (grain needs it) or
# tensorboardX (the binary's metrics). The versions are requirements.txt's (portpicker: the one
# pip installs with them). .whl/ is kept out of git (.git/info/exclude). On the GPU machine:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
pin() { grep -E "^$1==" requirements.txt | sed 's/[[:space:]]*#.*//'; }
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
    manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "${tag}")
done
for requirement in "$(pin grain)" "$(pin array-record)" "$(pin ml-collections)" \
    "$(pin tensorboardX)" "portpicker==1.6.0"; do
  [[ -n "${requirement}" ]] || { echo "a pin is missing from requirements.txt" >&2; exit 1; }
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d .whl "${requirement}"
done
ls -l .whl
du -sh .whl
