#!/usr/bin/env bash
# Train the emoji-64 demo model on one GPU and export it as a model folder (see scripts/README.md).
#
#   scripts/train_demo_gpu.sh [DATA] [MINUTES] [OUT]
#
#   DATA     dataset folder (default data/emoji-64); built with `edify data emoji` when it has no
#            manifest.json (the emoji sets are fetched with npm, or read from $TARBALLS)
#   MINUTES  training time on the clock, from the trainer's start (default 20)
#   OUT      the exported model folder (default out/emoji-64): bf16 weights, config.json,
#            samples.png and a README.md model card
#
# Environment: RUN (checkpoint folder, default runs/emoji-64; an existing run is continued),
# TARBALLS (folder of iconify-json-*.tgz instead of npm), PEAK_TFLOPS (the GPU's bf16 peak, to
# report MFU), TRAIN_EXTRA (more `edify train` arguments, e.g. "--set compile=false"),
# PYTHON (default python3), SMOKE=1 (a one-minute check of the same steps on the CPU: the tiny
# network, one emoji set, then `edify generate` with the exported folder).
set -euo pipefail

SMOKE=${SMOKE:-0}
PY=${PYTHON:-python3}
if [ "$SMOKE" = 1 ]; then
  DATA=${1:-runs/smoke/data}; MINUTES=${2:-0.5}; OUT=${3:-runs/smoke/model}; RUN=${RUN:-runs/smoke/run}
  SETS=(--sets fxemoji)
  # the emoji-64 recipe on the tiny network and one set, small batches, nothing periodic
  TRAIN_SET=(--set model=tiny --set styles=fxemoji --set batch_size=8 --set warmup_images=0
             --set log_images=64 --set checkpoint_images=0 --set sample_images=0 --set compile=false
             --set num_workers=0 --set sample_steps=2)
else
  DATA=${1:-data/emoji-64}; MINUTES=${2:-20}; OUT=${3:-out/emoji-64}; RUN=${RUN:-runs/emoji-64}
  SETS=()
  TRAIN_SET=()
  if ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "no CUDA GPU found: on a CPU, train the emoji-64-cpu preset (README.md) or run SMOKE=1 $0" >&2
    exit 1
  fi
fi
EXTRA=()
read -r -a EXTRA <<< "${TRAIN_EXTRA:-}"
if [ -n "${PEAK_TFLOPS:-}" ]; then EXTRA+=(--set "peak_tflops=$PEAK_TFLOPS"); fi
TARBALL_ARGS=()
if [ -n "${TARBALLS:-}" ]; then TARBALL_ARGS=(--tarballs "$TARBALLS"); fi

# 1. The dataset: the permissively licensed emoji sets rendered at 64 px (docs/data.md).
if [ ! -f "$DATA/manifest.json" ]; then
  "$PY" -m edify.cli data emoji --permissive-only --sizes 64 --quiet --out "$DATA" \
    "${TARBALL_ARGS[@]}" "${SETS[@]}"
fi

# 2. Train for MINUTES (continuing RUN if it holds checkpoints), then export the EMA weights in
#    bf16 with a sample grid and a model card filled from the run's logs.
"$PY" -m edify.cli train --preset emoji-64 --data "$DATA" --out "$RUN" --resume --max-minutes "$MINUTES" \
  "${TRAIN_SET[@]}" "${EXTRA[@]}" --export "$OUT" --export-dtype bf16 --model-card

# 3. Use it.
if [ "$SMOKE" = 1 ]; then
  "$PY" -m edify.cli generate --model "$OUT" "red apple" --style fxemoji --steps 6 -o "$RUN/red-apple.png"
else
  echo "try it: edify generate --model $OUT \"red apple\" --style twemoji -o apple.png"
fi
