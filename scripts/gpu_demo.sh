#!/usr/bin/env bash
# Train and ship the emoji-64 demo model on a short GPU lease (see scripts/README.md).
#
#   scripts/gpu_demo.sh pack            here: tarballs, wheels and the caption table into .carry/
#   scripts/gpu_demo.sh data            device: render the permissive sets at 64 px (16 workers)
#   scripts/gpu_demo.sh train M         device: train (or --resume) for M minutes, then export into $OUT
#   scripts/gpu_demo.sh first M         device: data + train M (the first call of a lease)
#   scripts/gpu_demo.sh bg M            device: data, then train for M minutes as a detached job
#   scripts/gpu_demo.sh poll S          device: wait up to S seconds for the detached job, show its log
#   scripts/gpu_demo.sh collect         device: copy the detached job's export into $OUT
#   SMOKE=1 scripts/gpu_demo.sh smoke   here, on the CPU: every step above on a 2-set subset
#
# What comes back from a device call is $OUT, at most 8 files: model/{config.json,
# model.safetensors.index.json, 3 bf16 shards <= 16 MiB, README.md, samples.png} + scalars.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."

SMOKE=${SMOKE:-0}
PY=${PYTHON:-python3}
CARRY=${CARRY:-.carry}
TABLE=$CARRY/emoji-captions.safetensors
OUT=${OUT:-out/gpu-demo}
PEAK=${PEAK_TFLOPS:-790}  # the measured bf16 matmul rate of the H100 (DESIGN.md section 4)
if [ "$SMOKE" = 1 ]; then
  DATA=${DATA:-runs/smoke-data}; RUN=${RUN:-runs/smoke-run}; SETS=fxemoji,emojione; WORKERS=2; PEAK=0
  SHARD_MIB=0.2  # the tiny network's 0.5 MB of bf16 weights in several shards, as the real model's 44 MB
  # the emoji-64 preset on the tiny network for a few CPU seconds (no compile; bf16 is CUDA-only)
  TRAIN_SET=(--set model=tiny --set batch_size=8 --set total_images=1000000 --set log_images=64
             --set checkpoint_images=0 --set sample_images=0 --set warmup_images=0 --set compile=false
             --set sample_steps=2 --set num_workers=0 --set styles=emojione,fxemoji)
else
  DATA=${DATA:-data/emoji-64}; RUN=${RUN:-runs/emoji-64}; SETS=; WORKERS=16
  SHARD_MIB=16  # the largest file a device call returns
  TRAIN_SET=()
fi
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30  # a progress line every 30 s, not a flood in the log

python_deps() {  # the device image lacks these pure/small wheels; install them once per machine
  if [ -d "$CARRY/whl" ] && ! "$PY" -c "import resvg, emoji, braceexpand, webdataset" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$CARRY"/whl/*.whl
  fi
  if [ -d /tmp/site ]; then export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}; fi
}

pack() {  # here (needs ../shared, pip and the MiniLM weights): what the device calls carry
  mkdir -p "$CARRY/emoji-npm" "$CARRY/whl"
  cp -u ../shared/data/emoji-npm/*.tgz ../shared/data/emoji-npm/SHA256SUMS "$CARRY/emoji-npm/"
  (cd "$CARRY/emoji-npm" && sha256sum -c --quiet SHA256SUMS)
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$CARRY/whl" resvg==0.2.0 emoji==2.16.0 braceexpand==0.1.7 webdataset==1.0.2
  table
  grep -qx '/.carry/' .git/info/exclude 2>/dev/null || echo '/.carry/' >> .git/info/exclude
  du -sh "$CARRY"/*
}

table() {  # every caption the dataset build will write (both splits) + the sample prompts, encoded once
  "$PY" - "$CARRY/emoji-npm" "$CARRY/captions.txt" <<'EOF'
import sys
from pathlib import Path
from edify.data import emoji as E
from edify.data.emoji_names import EmojiNamer

folder, out = Path(sys.argv[1]), Path(sys.argv[2])
sets = [E.read_icon_set(E.find_tarball(folder, n), n) for n in E.parse_sets(None, permissive_only=True)]
chars = {n: E.read_icon_set(p, n).chars for n in E.KNOWN_SETS if (p := E.find_tarball(folder, n))}
namer = EmojiNamer(chars)  # the same naming inputs as build_emoji_dataset over this folder
texts = sorted({s.caption.text.strip() for st in sets for s in E.plan_samples(st, namer)})
out.write_text("\n".join(texts) + "\n", encoding="utf-8")
print(f"{len(texts)} captions planned from {len(sets)} sets")
EOF
  "$PY" -m edify.training.memory_data "$TABLE" --texts "$CARRY/captions.txt" \
    --prompt "grinning face" --prompt "red heart" --prompt "rocket" --prompt "flag: Malta" \
    --prompt "a red heart" --prompt "a smiling face" --prompt "red apple"
}

data() {
  python_deps
  local sets=()
  if [ -n "$SETS" ]; then sets=(--sets "$SETS"); fi
  "$PY" -m edify.cli data emoji --tarballs "$CARRY/emoji-npm" --permissive-only --sizes 64 \
    --workers "$WORKERS" --quiet --out "$DATA" "${sets[@]}"
}

train() {  # train M minutes from the latest checkpoint in $RUN (or from scratch), export into $2
  local minutes=$1 export_dir=${2:-$OUT/model} extra=()
  read -r -a extra <<< "${TRAIN_EXTRA:-}"  # e.g. TRAIN_EXTRA="--set compile=false"
  python_deps
  [ -f "$DATA/manifest.json" ] || data  # a fresh machine: build the data first
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
  "$PY" -m edify.cli train --preset emoji-64 --data "$DATA" --out "$RUN" --resume --max-minutes "$minutes" \
    --set text_table="$TABLE" --set peak_tflops="$PEAK" "${TRAIN_SET[@]}" "${extra[@]}" \
    --export "$export_dir" --export-dtype bf16 --export-shard-mib "$SHARD_MIB" --model-card --manifest "$DATA/manifest.json"
  if [ "$(dirname "$export_dir")" != "$RUN" ]; then cp "$RUN/scalars.jsonl" "$(dirname "$export_dir")/"; fi
  summary "$export_dir"
}

summary() {
  ls -la "$1"
  grep -E '^\| (accelerator|images seen|wall time|training throughput|MFU|final)' "$1/README.md" || true
  tail -n 2 "$RUN/runs.jsonl"
}

bg() {  # the alternative to back-to-back calls: one detached job that outlives this call
  data
  mkdir -p "$RUN"
  rm -f "$RUN/bg.done"
  setsid nohup bash -c "scripts/gpu_demo.sh train $1 $RUN/export > $RUN/bg.log 2>&1; echo \$? > $RUN/bg.done" \
    < /dev/null > /dev/null 2>&1 &
  echo "detached training job started; log: $RUN/bg.log"
}

poll() {  # wait up to $1 seconds for the detached job (keeps the machine busy), then show the log
  local waited=0
  while [ ! -f "$RUN/bg.done" ] && [ "$waited" -lt "$1" ]; do sleep 10; waited=$((waited + 10)); done
  tail -c 3000 "$RUN/bg.log" | tr '\r' '\n' | tail -n 15
  if [ -f "$RUN/bg.done" ]; then echo "job finished with status $(cat "$RUN/bg.done")"; fi
}

collect() {
  poll 540
  [ "$(cat "$RUN/bg.done" 2>/dev/null)" = 0 ] || { echo "the detached job has not finished well"; exit 1; }
  mkdir -p "$OUT/model"
  cp "$RUN"/export/* "$OUT/model/"
  cp "$RUN/scalars.jsonl" "$OUT/"
  summary "$OUT/model"
}

smoke() {  # SMOKE=1: the whole path on the CPU, then `edify generate` on the exported folder
  [ "$SMOKE" = 1 ] || { echo "smoke needs SMOKE=1"; exit 2; }
  [ -f "$TABLE" ] || table
  rm -rf "$RUN" "$OUT"
  data
  train 0.4  # stops on the clock after 24 s, checkpoints, exports
  "$PY" -m edify.cli train --preset emoji-64 --data "$DATA" --out "$RUN" --resume --max-steps 1 \
    --set text_table="$TABLE" "${TRAIN_SET[@]}"  # continues from that checkpoint
  "$PY" -m edify.cli generate --model "$OUT/model" "red apple" --steps 6 -o "$OUT/red-apple.png"
  ls -la "$OUT" "$OUT/model"
}

step=${1:-}
shift || true
case "$step" in
  pack|table|data|smoke|collect) "$step" ;;
  train) train "${1:?minutes}" "${2:-}" ;;
  first) data; train "${1:?minutes}" ;;
  bg) bg "${1:?minutes}" ;;
  poll) poll "${1:-540}" ;;
  *) sed -n '2,16p' "$0"; exit 2 ;;
esac
