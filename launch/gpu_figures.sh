#!/usr/bin/env bash
# Every GPU figure of docs/performance.md ("On a GPU") in one call, in order of importance, each
# stage's results written as soon as it ends, so that a run cut off still reports the first ones:
#   launch/gpu_figures.sh [OUT_DIR] [STAGE...]
#   paired     FLAVA-full paired step (batch 128, text 77) beside transformers' FlavaForPreTraining
#              under torch.compile, bf16 autocast; the cuDNN/XLA attention check
#   max_batch  the same beside FlavaForPreTraining eager, and the largest paired batch that fits:
#              ours (XLA's memory analysis, then a real step) and eager's (measured peaks)
#   kinds      FLAVA-full image (MIM) and text (MLM) steps, beside FlavaForPreTraining eager
#   blip       BLIP ViT-B pretraining step (batch 128, text 30) beside the reference's step on
#              transformers' BLIP modules, eager and torch.compile; MFU
#   omni       the tri-modal model's base step (no PyTorch peer): MFU
#   loop       the training binary, FLAVA-full, a few hundred steps on the real pipeline reading
#              synthetic JPEG shards: examples/s of the whole loop against the bench's step
#   input      the input pipeline's examples/s per host core (how many cores the loop needs)
# and, for a second call, named only:
#   profile    3 traced paired steps (jax.profiler), packed as profile.tar.gz
#   unrolled   the paired step with unrolled layer stacks (model.scan_unroll=99)
#   no_triton  the paired step with cuBLAS for every matmul (--xla_gpu_enable_triton_gemm=false)
#   remat_full the largest paired batch with full rematerialisation (model.remat_policy=full)
# No STAGE: the first seven, in that order. OUT_DIR (default: $OUT, else /tmp/gpu_figures) gets
# log.txt (everything printed), summary.txt (the figure lines) and one STAGE.json per bench
# stage. BUDGET_S (default 470) bounds the whole call: each stage stops at its own limit or when
# the budget is spent, and a stage that would start with under 30 s left is skipped (run it in a
# second call). Where grain or
# ml_collections is missing, .whl/'s wheels (launch/gpu_wheels.sh) are installed to /tmp/site.
# TINY=1 runs the same stages on the tiny configs and small batches: a check on a CPU machine.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-/tmp/gpu_figures}}"
shift $(( $# > 0 ? 1 : 0 ))
stages=("$@")
(( ${#stages[@]} )) || stages=(paired max_batch kinds blip omni loop input)
mkdir -p "${out}"
log="${out}/log.txt"
budget="${BUDGET_S:-470}"
start=$(date +%s)
python="${PYTHON:-python3}"

if ! "${python}" -c "import grain, array_record, ml_collections, tensorboardX, portpicker" \
    2> /dev/null && compgen -G ".whl/*.whl" > /dev/null; then
  "${python}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:${PWD}${PYTHONPATH:+:${PYTHONPATH}}"
else
  export PYTHONPATH="${PWD}${PYTHONPATH:+:${PYTHONPATH}}"
fi
export PYTHONUNBUFFERED=1
# A stage's compiles serve the later ones where the programs are the same (the binary's steps).
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/flava_jax_xla_cache}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1
# XLA's GEMM autotuning results, kept for the later stages' compiles of the same fusions (the
# flag parses in jaxlib 0.10.2; it changes no result).
autotune=--xla_gpu_per_fusion_autotune_cache_dir=/tmp/flava_jax_autotune
export XLA_FLAGS="${XLA_FLAGS:+${XLA_FLAGS} }${autotune}"

if [[ "${TINY:-0}" == 1 ]]; then
  flava=configs/flava.py:tiny blip=configs/blip.py omni=configs/omni.py
  batch=16 text=0 blip_batch=16 omni_batch=16 steps=2 warmup=1 memory=(--memory_limit_gib=0.05)
  loop_steps=20 loop_log=10 examples=64 image=160x120 workers=2
else
  flava=configs/flava.py:full blip=configs/blip.py:base omni=configs/omni.py:base
  # The largest batches in an H100 80GB's memory, as the reference figures (176 eager, 192
  # compiled) were measured, also on a larger GPU.
  # The tri-modal step needs about 9.9 GiB + 0.89 GiB per example (XLA's memory analysis on CPU):
  # 64 rows leave room on any 80 GB GPU.
  batch=128 text=77 blip_batch=128 omni_batch=64 steps=10 warmup=3 memory=(--memory_limit_gib=79.6)
  loop_steps=300 loop_log=25 examples=512 image=640x480
  workers=$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))
fi

say() { echo "$*" | tee -a "${log}"; }
left() { echo $(( budget - ($(date +%s) - start) )); }

# stage NAME LIMIT_S COMMAND...: runs COMMAND for at most min(LIMIT_S, what the budget has left),
# its output appended to the log; notes how it ended and how long it took.
stage() {
  local name="$1" limit="$2"
  shift 2
  local remaining
  remaining=$(left)
  if (( remaining < 30 )); then
    say "== ${name}: skipped, ${remaining} s of the ${budget} s budget left"
    return
  fi
  (( limit < remaining )) || limit="${remaining}"
  say "== ${name}: up to ${limit} s: $*"
  local t0=$(date +%s) rc
  timeout --signal=TERM --kill-after=15 "${limit}" "$@" 2>&1 | tee -a "${log}"
  rc=${PIPESTATUS[0]}
  local how="exit ${rc}"
  (( rc == 124 )) && how+=" (time limit)"
  say "== ${name}: ${how} after $(( $(date +%s) - t0 )) s"
}

bench=("${python}" -m flava_jax.tools.bench --steps="${steps}" --warmup="${warmup}")
say "flava_jax GPU figures, $(date -u +%FT%TZ), budget ${budget} s, stages ${stages[*]}"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
  --format=csv,noheader | tee -a "${log}"
"${python}" -c "import jax, flax, torch, transformers; print('jax', jax.__version__, 'flax', \
flax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, \
jax.devices())" 2>&1 | tee -a "${log}"

for name in "${stages[@]}"; do
  case "${name}" in
    paired)  # the peer gets part of the limit, so that ours is measured too
      stage paired 240 "${bench[@]}" --config="${flava}" --batch="${batch}" --text_len="${text}" \
        --kinds=paired --peer=transformers --peer_modes=compile --peer_timeout_s=150 \
        --json_out="${out}/paired.json" ;;
    max_batch)
      stage max_batch 150 "${bench[@]}" --config="${flava}" --batch="${batch}" \
        --text_len="${text}" --kinds=paired --max_batch "${memory[@]}" --peer=transformers \
        --peer_modes=eager --peer_timeout_s=80 --nocheck_attention \
        --json_out="${out}/max_batch.json" ;;
    kinds)
      stage kinds 120 "${bench[@]}" --config="${flava}" --batch="${batch}" --text_len="${text}" \
        --kinds=image,text --nocheck_attention --peer=transformers --peer_modes=eager \
        --peer_timeout_s=60 --json_out="${out}/kinds.json" ;;
    blip)
      stage blip 180 "${bench[@]}" --config="${blip}" --batch="${blip_batch}" \
        --peer=transformers --peer_timeout_s=100 --json_out="${out}/blip.json" ;;
    omni)
      stage omni 90 "${bench[@]}" --config="${omni}" --batch="${omni_batch}" \
        --json_out="${out}/omni.json" ;;
    loop)
      corpus=/tmp/flava_jax_gpu_corpus workdir=/tmp/flava_jax_gpu_loop
      rm -rf "${corpus}" "${workdir}"
      stage corpus 60 "${python}" -m flava_jax.tools.bench_data --config="${flava}" \
        --write_corpus="${corpus}" --examples="${examples}" --image_size="${image}"
      corpus_flags=$(cat "${corpus}/flags.txt" 2> /dev/null)
      if [[ -z "${corpus_flags}" ]]; then  # not the embedded data in the corpus' place
        say "== loop: skipped, no ${corpus}/flags.txt from the corpus stage"
        continue
      fi
      # shellcheck disable=SC2086  (the flags are words)
      stage loop 200 "${python}" -m flava_jax.main --config="${flava}" --workdir="${workdir}" \
        ${corpus_flags} --config.global_batch="${batch}" --config.total_steps="${loop_steps}" \
        --config.log_every_steps="${loop_log}" --config.data.worker_count="${workers}" \
        --config.checkpoint.every_steps="${loop_steps}" ;;
    input)  # how many cores feed the bench's paired step, where the paired stage measured it
      need=$("${python}" -c "import json, sys; t = json.load(open(sys.argv[1]))['timings']; \
print(next(x['examples_per_second'] for x in t if x['name'] == 'flava_jax'))" \
        "${out}/paired.json" 2> /dev/null || echo 0)
      stage input 60 "${python}" -m flava_jax.tools.bench_data --config="${flava}" \
        --batch="${batch}" --batches=6 --examples="${examples}" --image_size="${image}" \
        --fast_decode=false --workers="${workers}" --need="${need}" ;;
    profile)
      rm -rf /tmp/flava_jax_gpu_profile
      stage profile 150 "${bench[@]}" --config="${flava}" --batch="${batch}" --text_len="${text}" \
        --kinds=paired --steps=3 --nocheck_attention --profile_dir=/tmp/flava_jax_gpu_profile
      tar -C /tmp -czf "${out}/profile.tar.gz" flava_jax_gpu_profile \
        && ls -l "${out}/profile.tar.gz" ;;
    unrolled)
      stage unrolled 150 "${bench[@]}" --config="${flava}" --batch="${batch}" --text_len="${text}" \
        --kinds=paired --nocheck_attention --config.model.scan_unroll=99 \
        --json_out="${out}/unrolled.json" ;;
    no_triton)
      XLA_FLAGS="${XLA_FLAGS:+${XLA_FLAGS} }--xla_gpu_enable_triton_gemm=false" \
        stage no_triton 120 "${bench[@]}" --config="${flava}" --batch="${batch}" \
        --text_len="${text}" --kinds=paired --nocheck_attention \
        --json_out="${out}/no_triton.json" ;;
    remat_full)
      stage remat_full 150 "${bench[@]}" --config="${flava}" --batch="${batch}" \
        --text_len="${text}" --kinds=paired --max_batch "${memory[@]}" --nocheck_attention \
        --config.model.remat_policy=full --json_out="${out}/remat_full.json" ;;
    *) say "unknown stage ${name}: use paired max_batch kinds blip omni loop input profile" \
         "unrolled no_triton remat_full"; exit 2 ;;
  esac
done
say "== done after $(( $(date +%s) - start )) s; the figures:"
figures='^\[|^\| |largest batch|attention check|examples_per_s'
figures+='|^  (paired|image|text|mixture|feeding) |^== '
grep -E "${figures}" "${log}" | grep -v '^== .*: up to' | tee "${out}/summary.txt" || true
jsons=()  # the stages' figures joined, for results.md; in stage order (the first file wins)
for name in paired max_batch kinds blip omni unrolled no_triton remat_full; do
  [[ -f "${out}/${name}.json" ]] && jsons+=("${out}/${name}.json")
done
if (( ${#jsons[@]} )); then
  "${python}" -m flava_jax.tools.bench_table "${jsons[@]}" | tee -a "${out}/summary.txt"
fi
