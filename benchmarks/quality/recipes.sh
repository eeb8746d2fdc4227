#!/usr/bin/env bash
# The recipe ablation of docs/RESULTS.md (issue #27), resumable: rerun the same command after a stop.
#
#   bash benchmarks/quality/recipes.sh                       # every stage not done yet
#   STAGES="teach" bash benchmarks/quality/recipes.sh        # stages: prune teach train eval answers collect
#   STAGES="train eval" RECIPES="kd-sharegpt" MODES=overfill bash benchmarks/quality/recipes.sh
#
# The decoder is `overfill prune --hidden 0.45 --intermediate 0.45 --method $METHOD` of SmolLM2-135M-Instruct
# (hidden 288, MLP 848); METHOD=select (the committed records of docs/results/recipe.json), or rotate (the
# pruner's default since), in another RUN. Every recipe trains both modes on the same batches for the same 500k-token schedule
# (batch 16, cosine to 0 after 10 warm-up steps, bf16 autocast where bf16 is faster); a recipe is
#   <objective>-<data>[-lr<LR>]:  objective ce (cross-entropy) | kd (KL(full || decoder) alone) | cekd (both)
#                                 data sharegpt (ShareGPT's responses) | teacher (the full model's own answers
#                                 to the same prompts, written once by `overfill teach`)
# Each decoder is evaluated on 300 documents per task and 200 held-out ShareGPT chats, and answers the
# 5 fixed prompts. One torch thread per process: two lanes (e.g. teach + train) share a 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUN=${RUN:-runs/recipes}
STAGES=${STAGES:-"prune teach train eval answers collect"}
RECIPES=${RECIPES:-"ce-sharegpt kd-sharegpt ce-teacher kd-teacher"}
MODES=${MODES:-"overfill pruned"}
TOKENS=${TOKENS:-500000}
METHOD=${METHOD:-select}
FULL=smollm2-135m-instruct
TEACH="$RUN/teacher/sharegpt-smollm2.jsonl.gz"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$RUN/eval" "$RUN/logs"
has() { case " $STAGES " in *" $1 "*) return 0;; esac; return 1; }
stamp() { echo "$(date -u +%FT%TZ) $*" | tee -a "$RUN/logs/stages.log"; }

recipe_flags() {  # recipe -> the train flags it stands for
  local objective=${1%%-*} rest=${1#*-} data lr=3e-4
  data=${rest%%-lr*}
  [[ $rest == *-lr* ]] && lr=${rest##*-lr}
  case $objective in
    ce) echo -n "--ce-weight 1 --kd-weight 0" ;;
    kd) echo -n "--ce-weight 0 --kd-weight 1" ;;
    cekd) echo -n "--ce-weight 1 --kd-weight 1" ;;
    *) echo "unknown objective in recipe '$1'" >&2; exit 2 ;;
  esac
  case $data in
    sharegpt) echo -n " --data sharegpt" ;;
    teacher) echo -n " --data $TEACH" ;;
    *) echo "unknown data in recipe '$1'" >&2; exit 2 ;;
  esac
  echo " --lr $lr"
}

if has prune && [ ! -f "$RUN/pruned/model.safetensors" ]; then
  stamp prune
  overfill prune $FULL --hidden 0.45 --intermediate 0.45 --method "$METHOD" --out "$RUN/pruned" \
    > "$RUN/logs/prune.log" 2>&1
fi
if has teach && [ ! -f "$TEACH" ]; then
  stamp teach
  overfill teach --full $FULL --data sharegpt --out "$TEACH" --examples ${TEACH_EXAMPLES:-1400} --val-examples ${TEACH_VAL:-200} \
    --max-len 512 --max-new-tokens 256 > "$RUN/logs/teach.log" 2>&1
  stamp "teach done"
fi
if has train; then
  for recipe in $RECIPES; do
    for mode in $MODES; do
      out="$RUN/train/$recipe-$mode"
      [ -f "$out/summary.json" ] && continue
      stamp "train $recipe $mode"
      # shellcheck disable=SC2046
      overfill train --full $FULL --decoder "$RUN/pruned" --mode "$mode" --out "$out" $(recipe_flags "$recipe") \
        --tokens "$TOKENS" --batch-size 8 --grad-accum 2 --warmup 10 --max-len 512 --precision auto \
        --checkpoint-every 10 --keep 1 --eval-every 0 --resume > "$RUN/logs/train-$recipe-$mode.log" 2>&1
      stamp "train $recipe $mode done"
    done
  done
fi
evaluate() {  # name mode [decoder]
  local name=$1 mode=$2 decoder=${3:-}
  [ -f "$RUN/eval/$name.json" ] && return 0
  stamp "eval $name"
  overfill eval --full $FULL ${decoder:+--decoder "$decoder"} --mode "$mode" --limit 300 --chat-examples 200 \
    --precision auto --out "$RUN/eval/$name.json" > "$RUN/logs/eval-$name.log" 2>&1
  stamp "eval $name done"
}
if has eval; then
  evaluate full full
  for recipe in $RECIPES; do
    for mode in $MODES; do
      out="$RUN/train/$recipe-$mode"
      [ -f "$out/summary.json" ] || continue
      if [ "$mode" = overfill ]; then evaluate "$recipe-overfill" overfill "$out"
      else evaluate "$recipe-pruned" decoder "$out"; fi
    done
  done
fi
if has answers; then
  python3 benchmarks/quality/recipes.py answers --run "$RUN"
fi
if has collect; then
  python3 benchmarks/quality/recipes.py collect --run "$RUN"
fi
