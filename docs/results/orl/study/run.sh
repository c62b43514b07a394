#!/usr/bin/env bash
# The ORL study (docs/results/orl/study/README.md): every experiment of it, in the order they ran, then the report.
#   bash docs/results/orl/study/run.sh path/to/orl_faces runs/orl-study
# Each step is an askd.experiment: run the script again to continue an interrupted study (finished runs are kept).
set -euo pipefail
data=${1:?usage: run.sh ORL_FOLDER OUT}
out=${2:?usage: run.sh ORL_FOLDER OUT}
# ir_tiny_cbam; 20% of the identities held out for the final numbers, 20% of the rest ("val") to choose settings on
common=(--data "$data" --fused --set val_fraction=0.2 --scale 4,8 --seeds 5)
ts() { date -u +%FT%TZ; }

echo "$(ts) main"  # every method at the default weight 5, 20 epochs; trains the 5 teachers
python -m askd.experiment "${common[@]}" --epochs 20 --method base,askd,askd+kd,horkd,at --out "$out/main"
for w in 1 20; do
  echo "$(ts) askd_w$w"  # the distillation weight, same teachers
  python -m askd.experiment "${common[@]}" --epochs 20 --method askd --set distill_weight=$w \
    --teachers "$out/main" --out "$out/askd_w$w"
done
echo "$(ts) epochs40"  # a longer schedule for the students, same teachers
python -m askd.experiment "${common[@]}" --epochs 40 --method base,askd --teachers "$out/main" --out "$out/epochs40"
for w in 1 20; do
  echo "$(ts) askd+kd_w$w"
  python -m askd.experiment "${common[@]}" --epochs 20 --method askd+kd --set distill_weight=$w \
    --teachers "$out/main" --out "$out/askd+kd_w$w"
done
echo "$(ts) synthetic_orl_size"  # the embedded synthetic faces cut to ORL's training size: 26 identities x 10 images
python -m askd.experiment --data synthetic --set synthetic_identities=26 --set synthetic_samples=10 --fused \
  --scale 8 --seeds 5 --epochs 20 --method base,askd --out "$out/synthetic_orl_size"
echo "$(ts) done"

# chosen on val, tested on held-out; then the synthetic control (no val split: its own held-out set only)
python -m askd.compare "$out/main" "$out/askd_w1" "$out/askd_w20" "$out/epochs40" "$out/askd+kd_w1" \
  "$out/askd+kd_w20" --select val --report held-out --out "$out/compare"
python -m askd.compare "$out/synthetic_orl_size" --select held-out --report held-out --out "$out/compare_synthetic_orl_size"
