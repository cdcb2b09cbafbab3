#!/usr/bin/env bash
# The sprite model's training recipe and position maps, compared on configs/bench.yaml end to
# end: the bench dataset, 10 epochs of each variant, then the pipeline's stages 3-5 (the same
# 1,998 counterfactual queries, answered and read back) on each run's best checkpoint.
#     bash benchmarks/bench_positions.sh [OUT [VARIANT...]]   # default runs/bench-positions; ~15 min a variant on 2 cores
# Variants: learned (configs/bench.yaml as it is: position maps learned, cosine lr from 2e-3),
# frozen (the maps frozen at their whole-pixel guess), constant (the recipe before: lr 1e-3
# throughout). Prints each run's last epoch and evaluation headline; reports in
# OUT/<variant>/eval/report.md.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/bench-positions}
shift || true
VARIANTS=${*:-learned frozen constant}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
$PY -m jobs.prepare_data --config configs/bench.yaml --out "$OUT/data"
$PY - "$OUT" <<'PYEOF'
import sys, yaml
from cvae.config import load_config
from cvae.pipeline import counterfactual_spec
out = sys.argv[1]
changes = {"learned": {}, "frozen": {"model": {"learn_translation": False}},
           "constant": {"train": {"lr_schedule": "constant", "lr": 0.001}}}
for variant, sections in changes.items():
    raw = yaml.safe_load(open("configs/bench.yaml"))
    for section, values in sections.items():
        raw[section].update(values)
    yaml.safe_dump(raw, open(f"{out}/bench-{variant}.yaml", "w"))
yaml.safe_dump(counterfactual_spec(load_config("configs/bench.yaml")), open(f"{out}/spec.yaml", "w"))
PYEOF
$PY -m jobs.make_queries --spec "$OUT/spec.yaml" --data "$OUT/data" --out "$OUT/queries"
for variant in $VARIANTS; do
  config=$OUT/bench-$variant.yaml
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
for variant in $VARIANTS; do
  echo "== $variant: $(tail -n 1 "$OUT/$variant/train/metrics.csv")"
  grep "intervened\|composition" "$OUT/$variant/headline.txt"
done
