#!/usr/bin/env bash
# DDP scaling on one node: ResNet-18 (CIFAR variant) trained on the CIFAR-10 JPEG copy with none and
# division, on 1 and then 2 GPUs through torchrun (batch 256 per GPU), every record in one results store.
#
#   bash scripts/ddp_scaling.sh OUT_DIR [EPOCHS] [GPUS]
#
# The records carry world_size, images_per_sec_train (all ranks together) and peak_bytes_per_gpu;
# `python main.py mode=report results_dir=OUT_DIR/store report.group=ddp_scaling` tabulates them.
# Needs: CUDA, GPUS (default 2) GPUs, the CIFAR-10 JPEG copy in .data/cifar10-jpeg (or DIVISION_CIFAR10_JPEG).
set -uo pipefail
out=${1:?usage: ddp_scaling.sh OUT_DIR [EPOCHS] [GPUS]}
epochs=${2:-3}
gpus=${3:-2}
jpeg=${DIVISION_CIFAR10_JPEG:-.data/cifar10-jpeg}
mkdir -p "$out"
for method in none division; do
  for n in 1 "$gpus"; do
    name="${method}_${n}gpu"
    echo "=== $name" | tee -a "$out/commands.txt"
    cmd=(torchrun --standalone --nproc_per_node="$n" main.py mode=train model=resnet18 dataset=imagefolder
         "dataset.root=$jpeg" "method=$method" batch_size=256 "train.epochs=$epochs" train.lr=0.1
         precision=bf16 channels_last=true seed=0 "train.eval_every=$epochs" group=ddp_scaling
         logger=none device=cuda "results_dir=$out/store" train.progress=false "hydra.run.dir=$out/runs/$name")
    echo "${cmd[*]}" >> "$out/commands.txt"
    timeout 300 "${cmd[@]}" > "$out/$name.log" 2>&1
    echo "=== $name exit $?" | tee -a "$out/commands.txt"
  done
done
