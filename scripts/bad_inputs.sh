#!/bin/bash
# Each bad input of issue 24 through main.py: a clean rejection is exit 2, "configuration error", no traceback.
cd "$(dirname "$0")/.."
out=$(mktemp -d)
ok=0; n=0
for bad in "seed=abc" "seed=1.5" "train.lr=-0.1" "train.momentum=-1" "method.bits=2.0" "train.epochs=1.5" \
    "train.warmup_epochs=-1" "dataset.image_size=0" "dataset.num_classes=0" "channels_last=maybe" "resume=maybe" \
    "+method.bit=4" "method.rounding=up" "method.backend=cuda" "method.backend=triton" "cuda_graph=true" \
    "method.bits=3" "batch_size=0" "precision=fp64" "+trian.lr=1"; do
  n=$((n+1))
  out=$(python main.py $bad hydra.run.dir=$out/run$n results_dir=$out/store logger=none 2>&1); rc=$?
  if [ $rc -eq 2 ] && echo "$out" | grep -q "configuration error" && ! echo "$out" | grep -q Traceback; then ok=$((ok+1)); fi
  echo "$bad -> rc=$rc $(echo "$out" | grep -o 'configuration error: .*' | head -1)"
done
echo "cleanly rejected: $ok of $n; store written: $(ls $out/store 2>/dev/null | wc -l) files"
