#!/usr/bin/env bash
# The paper quality study on one H200 (docs/paper_study.md, examples/sweeps/paper_study_gpu.yaml):
# 8 runs in three chunks, each well inside one 10-minute device call:
#
#   bash tools/bench/paper_study_gpu.sh 1        # transformer s1, transmamba_v9 s1, mamba2 s1
#   bash tools/bench/paper_study_gpu.sh 2        # transformer s2, hybrid s1, transmamba_fixed s1
#   bash tools/bench/paper_study_gpu.sh 3        # transmamba_v9 s2, transmamba_v2 s1
#   bash tools/bench/paper_study_gpu.sh report   # only the report, from what the study holds
#
# Each call builds the code corpus from this machine's site-packages into runs/code_corpus
# (tools/data/build_code_corpus.py; its manifest, with its size, is kept in the study as
# corpus_manifest_chunk<N>.json), unpacks the study of the earlier calls (PREVIOUS, default
# runs/paper_study_gpu.tar.gz: carry it) into /tmp/paper_study, and trains the chunk's runs one
# `sweep.py study --only RUN` at a time (a finished run is skipped), packing the study and its
# report after each, so a call stopped at its limit keeps what finished. No run is started that
# would end past TIME_BUDGET_S (540) seconds after the call's start, going by the longest run so
# far. The study is always planned at /tmp/paper_study, so every call writes the same run
# configs and the runs of earlier calls count as finished.
#
# $OUT (default runs/paper_study_out) gets 8 files, the most a device call returns:
#   paper_study.tar.gz (the whole study: run folders without checkpoints, report, manifests),
#   study.md, study.csv, curves.csv, valid_loss_vs_tokens.png, valid_loss_vs_time.png,
#   corpus_manifest.json, chunk.log.
# Between calls: copy the returned paper_study.tar.gz to runs/paper_study_gpu.tar.gz and carry
# it. Anywhere: `tar -xzf paper_study.tar.gz -C runs && python tools/scaling/sweep.py report
# runs/paper_study` rebuilds the report.
#
# On the device machine python3 holds torch, triton, matplotlib and tensorboard; megatron-core
# travels as a cp312 wheel in .whl/ (carry it) and the kernels are importable as
# transmamba_kernels through a link (as in lean_step_gpu.sh). PYTHON=<interpreter> uses that
# one as it is, without the wheels: SWEEP=examples/sweeps/paper_study_cpu.yaml
# PYTHON=.venv/bin/python runs the same steps on a CPU at toy size.
set -uo pipefail
start=$(date +%s)
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
chunk="${1:-}"
case "$chunk" in        # longest run first: it sets the estimate for the time budget
  1) runs=("transformer-*-s1" "transmamba_v9-*-s1" "mamba2") ;;
  2) runs=("transformer-*-s2" "hybrid" "transmamba_fixed") ;;
  3) runs=("transmamba_v9-*-s2" "transmamba_v2") ;;
  report) runs=() ;;
  *) echo "usage: paper_study_gpu.sh 1|2|3|report" >&2; exit 2 ;;
esac
out="${OUT:-runs/paper_study_out}"
mkdir -p "$out"
exec > >(tee -a "$out/chunk.log") 2>&1
sweep="${SWEEP:-examples/sweeps/paper_study_gpu.yaml}"
study=/tmp/paper_study
previous="${PREVIOUS:-runs/paper_study_gpu.tar.gz}"
budget="${TIME_BUDGET_S:-540}"

source tools/bench/device_env.sh

if [ -f "$previous" ]; then
  echo "unpacking the earlier chunks' study: $previous"
  tar -xzf "$previous" -C /tmp || exit 1
fi
mkdir -p "$study"

pack() {   # the study and its report into $OUT (written in /tmp, then moved: no 9th file in $OUT)
  tar -czf /tmp/paper_study_pack.tar.gz -C /tmp --exclude=checkpoints --exclude=data_cache \
    paper_study && mv /tmp/paper_study_pack.tar.gz "$out/paper_study.tar.gz"
  for f in study.md study.csv curves.csv plots/valid_loss_vs_tokens.png plots/valid_loss_vs_time.png; do
    [ -f "$study/$f" ] && cp "$study/$f" "$out/"
  done
  return 0
}

if [ "$chunk" = report ]; then
  "$py" tools/scaling/sweep.py report "$study"
  code=$?
  pack
  exit $code
fi

echo "=== chunk $chunk: corpus from this machine's site-packages"
"$py" tools/data/build_code_corpus.py --output runs/code_corpus || exit 1
cp runs/code_corpus/manifest.json "$study/corpus_manifest_chunk$chunk.json"
cp runs/code_corpus/manifest.json "$out/corpus_manifest.json"
"$py" - "$study" <<'EOF'
import glob, json, sys
manifests = {path: json.load(open(path)) for path in sorted(glob.glob(f"{sys.argv[1]}/corpus_manifest_chunk*.json"))}
digests = {m["request"]["sha256"] for m in manifests.values()}
for path, m in manifests.items():
    s = m["splits"]
    print(f"{path.rsplit('/', 1)[1]}: train {s['train']['bytes'] / 1e6:,.1f} MB {s['train']['tokens']:,} tokens, "
          f"valid {s['valid']['bytes'] / 1e6:,.1f} MB {s['valid']['tokens']:,} tokens, files sha256 {m['request']['sha256'][:12]}")
if len(digests) > 1:
    print("WARNING: the chunks trained on different corpora (different installed packages); compare runs across chunks with care")
EOF

status=0
longest=0
for only in "${runs[@]}"; do
  used=$(( $(date +%s) - start ))
  if (( used + longest > budget )); then
    echo "=== time budget: ${used} s used, the longest run took ${longest} s, budget ${budget} s: not starting '$only' (run chunk $chunk again)"
    status=3
    continue
  fi
  echo "=== chunk $chunk: $only (${used} s used)"
  t0=$(date +%s)
  "$py" tools/scaling/sweep.py study "$sweep" --out "$study" --only "$only" || status=1
  took=$(( $(date +%s) - t0 ))
  (( took > longest )) && longest=$took
  pack
done
echo "=== chunk $chunk done in $(( $(date +%s) - start )) s (exit $status)"
exit $status
