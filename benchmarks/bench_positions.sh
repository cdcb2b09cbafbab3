#!/usr/bin/env bash
# Learned vs frozen position maps (the sprite decoder) on configs/bench.yaml, end to end:
# the bench dataset, 10 epochs of each, then the pipeline's stages 3-5 (the same 1,998
# counterfactual queries, answered and read back) on each run's best checkpoint.
#     bash benchmarks/bench_positions.sh [OUT]        # default runs/bench-positions; ~40 min on 2 cores
# Prints each run's last epoch and evaluation headline; reports in OUT/<variant>/eval/report.md.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/bench-positions}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
$PY -m jobs.prepare_data --config configs/bench.yaml --out "$OUT/data"
$PY - "$OUT" <<'PYEOF'
import sys, yaml
from cvae.config import load_config
from cvae.pipeline import counterfactual_spec
out = sys.argv[1]
raw = yaml.safe_load(open("configs/bench.yaml"))
raw["model"]["learn_translation"] = False
yaml.safe_dump(raw, open(f"{out}/bench-frozen.yaml", "w"))
yaml.safe_dump(counterfactual_spec(load_config("configs/bench.yaml")), open(f"{out}/spec.yaml", "w"))
PYEOF
$PY -m jobs.make_queries --spec "$OUT/spec.yaml" --data "$OUT/data" --out "$OUT/queries"
for variant in learned frozen; do
  config=configs/bench.yaml; [ "$variant" = frozen ] && config=$OUT/bench-frozen.yaml
  $PY -m jobs.train --config "$config" --data "$OUT/data" --out "$OUT/$variant/train" --run-name "$variant"
  ckpt=$($PY - "$OUT/$variant/train/$variant" <<'PYEOF'
import glob, json, sys  # the kept checkpoint with the lowest validation (else test) loss
def loss(d):
    m = json.load(open(d + "/checkpoint.json"))["metrics"]
    return m.get("validation_loss") or m.get("test_loss") or float("inf")
print(min(glob.glob(sys.argv[1] + "/checkpoint_epoch_*"), key=loss))
PYEOF
)
  $PY -m jobs.query --config "$config" --checkpoint "$ckpt" --queries "$OUT/queries" --out "$OUT/$variant/answers"
  $PY -m jobs.evaluate --results "$OUT/$variant/answers" --queries "$OUT/queries" --checkpoint "$ckpt" \
      --data "$OUT/data" --out "$OUT/$variant/eval" | tee "$OUT/$variant/headline.txt"
done
for variant in learned frozen; do
  echo "== $variant: $(tail -n 1 "$OUT/$variant/train/metrics.csv")"
  grep "intervened\|composition" "$OUT/$variant/headline.txt"
done
