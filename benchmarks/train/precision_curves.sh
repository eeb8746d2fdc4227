#!/usr/bin/env bash
# Does bf16 training move quality? The same 200-step OverFill run in fp32 and in bf16, on the same
# batches; their validation-loss curves go to benchmarks/train/results/precision_curves.{json,png}.
#   bash benchmarks/train/precision_curves.sh [DECODER]   (default: runs/quality/pruned, from benchmarks/quality/run.sh)
set -euo pipefail
cd "$(dirname "$0")/../.."
DECODER=${1:-runs/quality/pruned}
OUT=${OUT:-runs/precision-curves}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
for p in fp32 bf16; do
  [ -f "$OUT/$p/summary.json" ] && continue
  overfill train --full smollm2-135m-instruct --decoder "$DECODER" --data sharegpt --mode overfill \
    --out "$OUT/$p" --steps 200 --batch-size 4 --max-len 256 --lr 3e-4 --warmup 20 --precision $p \
    --eval-every 25 --val-examples 64 --checkpoint-every 50 --resume > "$OUT-$p.log" 2>&1 &
done
wait
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
out = Path(sys.argv[1])
curves = {}
for p in ("fp32", "bf16"):
    lines = [json.loads(l) for l in (out / p / "metrics.jsonl").read_text().splitlines()]
    curves[p] = {"val": [(m["step"], m["val_loss"]) for m in lines if "val_loss" in m],
                 "train": [(m["step"], m["loss"]) for m in lines if "loss" in m],
                 "summary": json.loads((out / p / "summary.json").read_text())}
val = {p: dict(c["val"]) for p, c in curves.items()}
steps = sorted(set(val["fp32"]) & set(val["bf16"]))
diff = [val["bf16"][s] - val["fp32"][s] for s in steps]
# noise: the step-to-step spread of the fp32 training loss over the last 50 steps
tail = [l for s, l in curves["fp32"]["train"] if s > 150]
mean = sum(tail) / len(tail)
noise = (sum((l - mean) ** 2 for l in tail) / (len(tail) - 1)) ** 0.5
record = {"curves": curves, "val_loss_difference_bf16_minus_fp32": dict(zip(steps, diff)),
          "max_abs_val_difference": max(abs(d) for d in diff), "train_loss_noise_std_last_50_steps": noise}
dest = Path("benchmarks/train/results")
dest.mkdir(parents=True, exist_ok=True)
(dest / "precision_curves.json").write_text(json.dumps(record, indent=2))
fig, ax = plt.subplots(figsize=(6, 4))
for p, c in curves.items():
    ax.plot(*zip(*c["train"]), alpha=0.35, label=f"train loss, {p}")
    ax.plot(*zip(*c["val"]), marker="o", label=f"validation loss, {p}")
ax.set_xlabel("step (4 examples, 256 tokens max)"); ax.set_ylabel("response cross-entropy"); ax.legend(); ax.grid(alpha=0.3)
fig.tight_layout(); fig.savefig(dest / "precision_curves.png", dpi=120)
print(f"max |val bf16 - fp32| = {record['max_abs_val_difference']:.4f}; train-loss noise (std) {noise:.4f}")
PY
