#!/usr/bin/env bash
# Every measurement the README and the model cards give for a demo model folder, one after another
# at one thread each (scripts/README.md):
#   bash scripts/measure_model.sh [MODEL] [OUT]
# MODEL (default weights/emoji-64): a model folder; OUT (default runs/measure): one log per bench.
# DELTA (a finetune of MODEL, e.g. weights/emoji-64-openmoji) adds the finetune measures;
# ONLY=recipe,heldout,canny,inpaint,finetune,speed picks some (default: all).
set -euo pipefail
MODEL=${1:-weights/emoji-64}
OUT=${2:-runs/measure}
DATA=${DATA:-data/emoji}
STYLE_DATA=${STYLE_DATA:-data/openmoji}
DELTA=${DELTA:-}
ONLY=${ONLY:-recipe,heldout,canny,inpaint,finetune,speed}
mkdir -p "$OUT"
want() { [[ ",$ONLY," == *",$1,"* ]]; }
run() {  # NAME COMMAND...: run it, its output in OUT/NAME.log, its last line shown
    local name=$1; shift
    echo "[$name] $*"
    "$@" > "$OUT/$name.log" 2>&1 || { echo "[$name] failed: see $OUT/$name.log"; return 1; }
    tail -n 1 "$OUT/$name.log"
}
want recipe && run recipe python bench/recipe.py --data "$DATA" --out "$OUT/recipe" --model "$MODEL" \
    --guidance 4 --sigma-min 0.4 --threads 1 --sampler dpmpp_2m_sde --eta 1,0,0
want heldout && run heldout python bench/heldout_loss.py --data "$DATA" --min-sigma 0.3 --threads 1 "$MODEL"
want canny && run canny python bench/control_quality.py canny --model "$MODEL" \
    --controlnet weights/controlnet-canny-64 --data "$DATA" --num 200 --first 200 --threads 1 --out "$OUT/canny"
want inpaint && run inpaint python bench/control_quality.py inpaint --model "$MODEL" \
    --controlnet weights/inpaint-64 --data "$DATA" --num 200 --methods controlnet+repaint --threads 1 --out "$OUT/inpaint"
if want finetune && [[ -n "$DELTA" ]]; then
    run finetune python bench/finetune_quality.py --base "$MODEL" --delta "$DELTA" --data "$DATA" \
        --style-data "$STYLE_DATA" --measures cost,style,forgetting,loss --num 200 --guidance 4 --sigma-min 0.4 \
        --threads 1 --out "$OUT/finetune"
    run finetune-controlnet python bench/finetune_quality.py --base "$MODEL" --delta "$DELTA" --data "$DATA" \
        --style-data "$STYLE_DATA" --controlnet weights/controlnet-canny-64 --measures controlnet --num-control 200 \
        --guidance 4 --threads 1 --out "$OUT/finetune-controlnet"
fi
want speed && run speed python bench/cpu_generate.py --threads 2 --model "$MODEL"
echo "logs in $OUT"
