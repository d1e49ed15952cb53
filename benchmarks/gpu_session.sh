#!/usr/bin/env bash
# One 10-minute device call on the 2-GPU machine: every step in priority
# order, each under `timeout` with its output tee'd to $OUT/<step>.log, the
# results JSON and the target checks copied to $OUT (8 files at most).
#
#   bash benchmarks/gpu_session.sh                      # repro check_gpu bench_multi bench
#   bash benchmarks/gpu_session.sh bench_multi longest  # a second call: the rest
#   bash benchmarks/gpu_session.sh rings                # the Hopper kernels on rings
#   bash benchmarks/gpu_session.sh mock                 # one GPU: rings of 2-8 compiled
#   T_MULTI=300 T_LONGEST=250 bash benchmarks/gpu_session.sh bench_multi longest
#   PYTHON=.venv/bin/python SMOKE=1 OUT=/tmp/out bash benchmarks/gpu_session.sh  # CPU
#
# Steps (default order and budgets in seconds; a step never runs past the
# session limit SESSION_LIMIT=580, the last one is cut to fit):
#   repro        T_REPRO=90     repro_pallas_ring_crash.py, 4 variants at a time (60 s each
#                               at most: REPRO_VARIANT_TIMEOUT)
#   check_gpu    T_CHECK=120    check_gpu.py: rings over both GPUs, then one GPU
#   bench_multi  T_MULTI=240    bench_multi_gpu.py -> results/h200x2.json (resumes)
#   bench        T_BENCH=120    bench.py masked + slice baselines -> results/h200.json
#   longest      T_LONGEST=300  bench_multi_gpu.py --only longest (log: bench_multi.log),
#                               LONGEST_BACKENDS=pallas,auto (searched in this order)
#   rings        T_RINGS=500    check_gpu.py mosaic on rings (check_vma=True, jax's default), then
#                               bench_multi_gpu.py LongNet-ring scaling, Hopper kernels
#                               against cuDNN blocks (log: rings.log)
#   docs         T_DOCS=400     bench_multi_gpu.py --only docs: dense causal over 8K-token
#                               documents, the Hopper kernels against the Triton kernels (the
#                               rings' masked blocks: the Hopper kernels' since session 26),
#                               checked at 32K, timed at 128K on 1 GPU and on both (log:
#                               docs.log)
#   profile      T_PROFILE=200  profile_ring.py: per GPU, where the LongNet-ring 2M (1 GPU,
#                               a ring of 2 in both layouts) and dense 128K rings' time goes
#                               (log: profile.log, profile_ring.json; GPU only)
#   scheduler    T_SCHED=440    bench_multi_gpu.py: the scaling cases (LongNet-ring on the Hopper
#                               kernels, dense on cuDNN) in two runs, XLA's defaults, then
#                               XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true (off in
#                               stock jaxlib): does XLA hide the rings' communication better?
#                               check_targets.py judges the first, prints the second (log:
#                               scheduler.log)
#   mock         T_MOCK=540     one GPU posing as 2, 4 and 8 (compile only, no times):
#                               repro_pallas_ring_crash.py --mock-gpus on the library's rings,
#                               then mock_rings.py (Hopper, then Triton kernels) ->
#                               results/h200_mock_rings.json (log: mock.log; GPU only)
#   mosaic       T_MOSAIC=400   the Hopper kernels: mosaic_probe.py (exactness against the
#                               Triton kernels, 14 children over 2 GPUs; dense speed alone),
#                               check_gpu.py mosaic with and
#                               without check_vma, bench.py --only mosaic,masked (log: mosaic.log)
# Each script gets an internal --time-budget below its timeout, so it stops
# starting cases in time and keeps what it measured. RESUME=0 re-measures
# cases already in the results files; TRACE=1 adds a jax.profiler trace of
# one ring (trace.tgz, if under 16 MiB).
#
# Files in $OUT: session.log (machine, versions, step exit codes,
# check_targets.py on both files), repro.log, check_gpu.log, bench_multi.log,
# bench.log, h200.json, h200x2.json (+ trace.tgz).

set -u -o pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-/tmp/gpu_session_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
SMOKE=${SMOKE:-0}
SESSION_LIMIT=${SESSION_LIMIT:-580}
T_REPRO=${T_REPRO:-90}
T_CHECK=${T_CHECK:-120}
T_MULTI=${T_MULTI:-240}
T_BENCH=${T_BENCH:-120}
T_LONGEST=${T_LONGEST:-300}
T_MOSAIC=${T_MOSAIC:-400}
T_RINGS=${T_RINGS:-500}
T_DOCS=${T_DOCS:-400}
T_PROFILE=${T_PROFILE:-200}
T_SCHED=${T_SCHED:-440}
T_MOCK=${T_MOCK:-540}
REPRO_VARIANT_TIMEOUT=${REPRO_VARIANT_TIMEOUT:-60}
# searched in this order (with SMOKE=1: auto; Pallas interprets on CPU, minutes a case)
LONGEST_BACKENDS=${LONGEST_BACKENDS:-$([ "$SMOKE" = 1 ] && echo auto || echo pallas,auto)}
RESUME=${RESUME:-1}
TRACE=${TRACE:-0}
if [ "$SMOKE" = 1 ]; then
  SMOKE_FLAG=--smoke
  RESULTS=${RESULTS:-/tmp/gpu_session_smoke_results}
else
  SMOKE_FLAG=
  RESULTS=${RESULTS:-benchmarks/results}
fi
mkdir -p "$RESULTS"
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(repro check_gpu bench_multi bench)

export NCCL_NVLS_ENABLE=0          # the machine sets these; NVLink multicast stays off
export TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# jax's default partitioner (Shardy) unless JAX_USE_SHARDY_PARTITIONER says
# otherwise: sessions 6-21 ran rings under GSPMD (README, "On NVIDIA GPUs").
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

log() { echo "$*" | tee -a "$OUT/session.log"; }

log "=== gpu_session $(date -u +%FT%TZ): steps ${STEPS[*]}, limit ${SESSION_LIMIT}s"
{
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv 2>&1 || true
  "$PY" -c "import sys, jax, jaxlib; print('python', sys.version.split()[0], 'jax', jax.__version__, 'jaxlib', jaxlib.__version__)" 2>&1
  "$PY" -c "import ringdilated; print('ringdilated', ringdilated.__version__, ringdilated.__file__)" 2>&1
  env | grep -E '^(NCCL_|XLA_|CUDA_VISIBLE)' | sort
} >> "$OUT/session.log" 2>&1

# run STEP BUDGET LOG CMD...: CMD under timeout, cut to what is left of the session.
run() {
  local step=$1 budget=$2 logfile=$3; shift 3
  local left=$((SESSION_LIMIT - SECONDS - 10))
  if [ "$left" -lt 30 ]; then
    log "--- $step: skipped, ${left}s left of the session"
    return
  fi
  local t=$((budget < left ? budget : left))
  log "--- $step: start at ${SECONDS}s, timeout ${t}s: $*"
  echo "=== $step (timeout ${t}s): $*" >> "$OUT/$logfile"
  timeout -k 10 "$t" "$@" 2>&1 | tee -a "$OUT/$logfile"
  local rc=${PIPESTATUS[0]}
  log "--- $step: exit $rc$([ "$rc" = 124 ] && echo ' (timed out)') at ${SECONDS}s"
}

# An internal budget: the step's timeout less MARGIN (what one case may take).
inner() {
  local budget=$1 margin=$2
  local left=$((SESSION_LIMIT - SECONDS - 10))
  local t=$((budget < left ? budget : left))
  local b=$((t - margin))
  echo $((b > 10 ? b : 10))
}

RESUME_FLAG=
[ "$RESUME" = 1 ] && RESUME_FLAG=--resume
TRACE_FLAGS=()
[ "$TRACE" = 1 ] && TRACE_FLAGS=(--trace /tmp/ringdilated_trace)

for step in "${STEPS[@]}"; do
  case $step in
    repro)
      run repro "$T_REPRO" repro.log \
        "$PY" benchmarks/repro_pallas_ring_crash.py --jobs 4 \
        --timeout "$REPRO_VARIANT_TIMEOUT" $SMOKE_FLAG ;;
    check_gpu)
      run check_gpu "$T_CHECK" check_gpu.log \
        "$PY" benchmarks/check_gpu.py --time-budget "$(inner "$T_CHECK" 35)" $SMOKE_FLAG ;;
    bench_multi)
      run bench_multi "$T_MULTI" bench_multi.log \
        "$PY" benchmarks/bench_multi_gpu.py --out "$RESULTS/h200x2.json" --iters 5 \
        --time-budget "$(inner "$T_MULTI" 90)" $RESUME_FLAG "${TRACE_FLAGS[@]}" $SMOKE_FLAG ;;
    bench)
      run bench "$T_BENCH" bench.log \
        "$PY" benchmarks/bench.py --out "$RESULTS/h200.json" --only masked,slice \
        --seqs 1048576,524288 --iters 5 --no-fwd --time-budget "$(inner "$T_BENCH" 60)" \
        $SMOKE_FLAG ;;
    longest)
      run longest "$T_LONGEST" bench_multi.log \
        "$PY" benchmarks/bench_multi_gpu.py --out "$RESULTS/h200x2.json" --only longest \
        --backends "$LONGEST_BACKENDS" --time-budget "$(inner "$T_LONGEST" 100)" $SMOKE_FLAG ;;
    rings)
      # the Hopper kernels on rings under jax's default check_vma=True (since
      # session 20 they run there; until then only under check_vma=False):
      # exactness, then LongNet-ring scaling against the cuDNN blocks in the
      # same run
      run check_rings "$((T_RINGS / 2))" rings.log "$PY" benchmarks/check_gpu.py mosaic \
        --sections multi --time-budget "$(inner "$((T_RINGS / 2))" 30)" \
        $SMOKE_FLAG
      run bench_rings "$((T_RINGS / 2))" rings.log \
        "$PY" benchmarks/bench_multi_gpu.py --out "$RESULTS/h200x2.json" \
        --only strong,weak,layouts --backends mosaic,cudnn --match longnet_ring \
        --time-budget "$(inner "$((T_RINGS / 2))" 60)" $SMOKE_FLAG ;;
    docs)
      run docs "$T_DOCS" docs.log "$PY" benchmarks/bench_multi_gpu.py \
        --out "$RESULTS/h200x2.json" --only docs --backends mosaic,pallas \
        --time-budget "$(inner "$T_DOCS" 60)" $SMOKE_FLAG ;;
    profile)
      if [ "$SMOKE" = 1 ]; then
        log "profile: needs a GPU (a CPU trace has no device streams); skipped"
      else
        L=timing/longnet_ring/N2097152
        run profile "$T_PROFILE" profile.log "$PY" benchmarks/profile_ring.py --no-check-vma \
          --top 16 --json "$OUT/profile_ring.json" $L/P1/contiguous/mosaic \
          $L/P2/contiguous/mosaic $L/P2/zigzag/mosaic timing/dense/N131072/P2/zigzag/cudnn
      fi ;;
    scheduler)
      M="longnet_ring/N(1048576/P1|2097152/P[12])/.*/mosaic"
      M="$M|dense/N(65536/P1/.*|131072/P2/zigzag)/cudnn"
      for flags in "" --xla_gpu_enable_latency_hiding_scheduler=true; do
        run "scheduler${flags:+ $flags}" "$((T_SCHED / 2))" scheduler.log \
          env XLA_FLAGS="${XLA_FLAGS:-} $flags" \
          RINGDILATED_BENCH_RUN="$(date -u +%FT%TZ) scheduler ${flags:-defaults}" \
          "$PY" benchmarks/bench_multi_gpu.py --out "$RESULTS/h200x2.json" --no-check-vma \
          --only strong,weak,layouts --backends mosaic,cudnn --match "$M" \
          --time-budget "$(inner "$((T_SCHED / 2))" 50)" $SMOKE_FLAG
      done ;;
    mock)
      if [ "$SMOKE" = 1 ]; then
        log "mock: needs a GPU (jax mocks GPU processes only); skipped"
      else
        # z2 must crash (Shardy's zero-size operand); every ring must compile
        run mock_repro "$((T_MOCK / 6))" mock.log "$PY" benchmarks/repro_pallas_ring_crash.py \
          --mock-gpus --jobs 4 --timeout "$((T_MOCK / 6 - 30))" z2_empty_constant \
          a_contiguous a_zigzag a_fwd_bwd m_contiguous m_zigzag m_causal m_fwd_bwd
        # (compiling the Hopper kernels' rings takes 30-55 s each, 3 ring sizes at once)
        run "mock_rings mosaic" "$((T_MOCK * 4 / 6))" mock.log "$PY" benchmarks/mock_rings.py \
          --out "$RESULTS/h200_mock_rings.json" --timeout "$((T_MOCK * 4 / 6 - 20))"
        run "mock_rings pallas" "$((T_MOCK / 6))" mock.log "$PY" benchmarks/mock_rings.py \
          --kernels pallas --match /pallas --out "$RESULTS/h200_mock_rings.json" \
          --timeout "$((T_MOCK / 6 - 20))"
      fi ;;
    mosaic)
      # exactness cases in parallel over both GPUs (each is mostly compile time)
      run mosaic_probe "$((T_MOSAIC / 4))" mosaic.log env JOBS=14 PROBE_GPUS=0,1 \
        "$PY" benchmarks/mosaic_probe.py
      for vma in "" --no-check-vma; do
        run "check_mosaic$vma" "$((T_MOSAIC / 4))" mosaic.log "$PY" benchmarks/check_gpu.py \
          mosaic $vma --time-budget "$(inner "$((T_MOSAIC / 4))" 30)" $SMOKE_FLAG
      done
      run bench_mosaic "$((T_MOSAIC / 4))" mosaic.log \
        "$PY" benchmarks/bench.py --out "$RESULTS/h200.json" --only mosaic,masked \
        --seqs 1048576,32768 --iters 5 --time-budget "$(inner "$((T_MOSAIC / 4))" 60)" \
        $SMOKE_FLAG ;;
    *)
      log "--- unknown step $step (known: repro check_gpu bench_multi bench longest rings" \
          "profile scheduler mock mosaic)" ;;
  esac
done

[ -f "$RESULTS/h200_mock_rings.json" ] && cp "$RESULTS/h200_mock_rings.json" "$OUT/"
for f in h200.json h200x2.json; do
  if [ -f "$RESULTS/$f" ]; then
    cp "$RESULTS/$f" "$OUT/$f"
    log "=== check_targets.py $f"
    "$PY" benchmarks/check_targets.py "$RESULTS/$f" >> "$OUT/session.log" 2>&1
    log "=== check_targets.py $f: exit $?"
  fi
done
if [ "$TRACE" = 1 ] && [ -d /tmp/ringdilated_trace ]; then
  tar czf /tmp/ringdilated_trace.tgz -C /tmp ringdilated_trace
  if [ "$(stat -c %s /tmp/ringdilated_trace.tgz)" -lt $((16 * 1024 * 1024)) ]; then
    cp /tmp/ringdilated_trace.tgz "$OUT/trace.tgz"
  else
    log "trace over 16 MiB: not copied"
  fi
fi
log "=== done at ${SECONDS}s; files: $(ls "$OUT" | tr '\n' ' ')"
