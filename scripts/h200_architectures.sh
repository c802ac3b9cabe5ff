#!/usr/bin/env bash
# Modern architectures on one H200 (issue: every saved activation of any architecture), in one call:
#   bash scripts/h200_architectures.sh OUT_DIR [VIT_EPOCHS]
# 1. throughput (alone on the GPU): vit_b_16 and convnext_tiny, bf16 autocast, batch 128, eager,
#    none against division;
# 2. at the same time: memory (fp32, 224x224, batch 64) of vit_b_16, swin_t, convnext_tiny,
#    efficientnet_b0, mobilenet_v3_large and resnet50, none against division (allocator and ledger,
#    with coverage), and the small ViT on the CIFAR-10 JPEG copy, none and division, same seed
#    (experiment=cifar10_vit, VIT_EPOCHS epochs, default 15).
# Every record lands in OUT_DIR/store (then packed into OUT_DIR/store.tgz).
set -uo pipefail
out=${1:?usage: h200_architectures.sh OUT_DIR [VIT_EPOCHS]}
epochs=${2:-15}
store="$out/store"
jpeg=${DIVISION_CIFAR10_JPEG:-.data/cifar10-jpeg}
mkdir -p "$out"
common=(logger=none device=cuda "results_dir=$store" train.progress=false)
stage() {  # stage NAME SECONDS ARGS...
  local name=$1 seconds=$2; shift 2
  echo "=== $name: python main.py $*" | tee -a "$out/commands.txt"
  timeout "$seconds" python main.py "$@" "${common[@]}" > "$out/$name.log" 2>&1
  echo "=== $name exit $?" | tee -a "$out/commands.txt"
}
stage speed_arch 200 -m mode=speed model=vit_b_16,convnext_tiny dataset.image_size=224 dataset.num_classes=1000 \
  precision=bf16 batch_size=128 method=none,division group=h200_arch_speed
for method in none division; do
  stage "vit_cifar_$method" "${VIT_SECONDS:-330}" experiment=cifar10_vit "dataset.root=$jpeg" method=$method \
    train.epochs=$epochs seed=0 dataset.num_workers=6 group=h200_vit_cifar &
done
stage memory_arch 300 -m mode=memory model=vit_b_16,swin_t,convnext_tiny,efficientnet_b0,mobilenet_v3_large,resnet50 \
  dataset.image_size=224 dataset.num_classes=1000 batch_size=64 method=none,division group=h200_arch_memory
wait
tar czf "$out/store.tgz" -C "$out" store
