#!/usr/bin/env bash
# The H200 reproduction in one call: throughput, memory and accuracy runs through main.py, each stage
# bounded in time, every record kept in one results store, then mode=report over it.
#
#   bash scripts/h200_reproduce.sh OUT_DIR [EPOCHS] [SCALE]
#
# SCALE (default 1) multiplies every stage's time limit (accuracy: 60 s + 8 s per epoch, room for
# DIVISION's ~5 s ResNet-18 epochs on an H200; the others leave room for a fresh machine's kernel
# compilation and cuDNN set-up); a stage cut short keeps the records it finished.
# SPEED=0 skips the throughput stages, MEMORY=0 the memory stages (largest-batch search included);
# COMPILE=0 skips the torch.compile stages of both;
# MAX_BATCH=0 skips the largest-batch search (the longest memory stage); ACCURACY=0 skips the
# accuracy runs (the longest stages; they can run on their own, e.g. one per GPU). ACC_METHODS
# (default "none division") and SEEDS (default "0") choose them, one run per method and seed; a method
# written METHOD+compile trains under torch.compile (compile=true); ACC_ARGS adds overrides to each;
# ACC_JOBS (default 1) runs that many at once (three ResNet-18 runs share one H200 well; their
# images/s are then not those of a run alone).
#
# Needs: CUDA; hydra-core, omegaconf, antlr4 and lmdb importable; the CIFAR-10 JPEG copy in
# .data/cifar10-jpeg (or DIVISION_CIFAR10_JPEG). wandb is not needed (logger=none).
set -uo pipefail
out=${1:?usage: h200_reproduce.sh OUT_DIR [EPOCHS] [SCALE]}
epochs=${2:-20}
scale=${3:-1}
store="$out/store"
jpeg=${DIVISION_CIFAR10_JPEG:-.data/cifar10-jpeg}
mkdir -p "$out"
common=(logger=none device=cuda "results_dir=$store" train.progress=false)
stage() {  # stage NAME SECONDS ARGS...: one main.py call, bounded, logged to OUT/NAME.log
  local name=$1 seconds=$2; shift 2
  echo "=== $name: python main.py $*" | tee -a "$out/commands.txt"
  timeout "$(awk "BEGIN { print int($seconds * $scale) }")" python main.py "$@" "${common[@]}" > "$out/$name.log" 2>&1
  echo "=== $name exit $?" | tee -a "$out/commands.txt"
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/versions.txt"
python -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)" >> "$out/versions.txt"

# Accuracy: ResNet-18 (CIFAR variant) on the CIFAR-10 JPEG copy, the same recipe and seeds for every method.
if [[ "${ACCURACY:-1}" == 1 ]]; then
  for seed in ${SEEDS:-0}; do
    for variant in ${ACC_METHODS:-none division}; do
      method=${variant%+compile}; compiled=false; [[ $variant == *+compile ]] && compiled=true
      while (( $(jobs -rp | wc -l) >= ${ACC_JOBS:-1} )); do wait -n; done
      stage "accuracy_${variant/+/_}_s$seed" $(( 60 + 8 * epochs )) mode=train model=resnet18 dataset=imagefolder \
        "dataset.root=$jpeg" method=$method compile=$compiled batch_size=256 train.epochs=$epochs train.lr=0.1 \
        train.weight_decay=5e-4 precision=bf16 channels_last=true seed=$seed group=h200_accuracy ${ACC_ARGS:-} &
    done
  done
  wait
fi
if [[ "${SPEED:-1}" == 1 ]]; then
# Throughput: ResNet-50, bf16 autocast, channels_last, batch 128 and 256, all compressing methods.
stage speed 150 -m mode=speed model=resnet50 dataset.image_size=224 dataset.num_classes=1000 \
  precision=bf16 channels_last=true batch_size=128,256 method=none,division,actnn,checkpoint,swap group=h200_speed
# The same with forward and backward replayed from CUDA graphs (methods that can be captured).
stage speed_graph 100 -m mode=speed model=resnet50 dataset.image_size=224 dataset.num_classes=1000 \
  precision=bf16 channels_last=true batch_size=128,256 method=none,division cuda_graph=true group=h200_speed
# Compiled against compiled (torch.compile, default mode): the first steps of each job compile (minutes).
[[ "${COMPILE:-1}" == 1 ]] && stage speed_compiled 600 -m mode=speed model=resnet50 dataset.image_size=224 \
  dataset.num_classes=1000 precision=bf16 channels_last=true batch_size=128,256 method=none,division \
  compile=true speed.warmup=3 group=h200_speed
fi
if [[ "${MEMORY:-1}" == 1 ]]; then
# Memory (fp32, the paper's protocol): WRN-50-2 none/division, ResNet-50 division (fused kernels) and swap.
stage memory_wrn 80 -m mode=memory model=wrn50_2 dataset.image_size=224 dataset.num_classes=1000 \
  batch_size=64,128,256,512 method=none,division group=h200_memory
stage memory_r50 120 -m mode=memory model=resnet50 dataset.image_size=224 dataset.num_classes=1000 \
  batch_size=64,128,256,512 method=none,division,swap group=h200_memory
[[ "${COMPILE:-1}" == 1 ]] && stage memory_compiled 600 -m mode=memory model=resnet50 dataset.image_size=224 \
  dataset.num_classes=1000 batch_size=128,256 method=none,division compile=true group=h200_memory
[[ "${MAX_BATCH:-1}" == 1 ]] && stage max_batch 120 -m mode=memory model=resnet50 dataset.image_size=224 dataset.num_classes=1000 \
  batch_size=256 memory.find_max_batch=true method=none,division group=h200_max_batch
fi

python main.py mode=report logger=none device=cpu "results_dir=$store" "hydra.run.dir=$out/report" > "$out/report.log" 2>&1
tar czf "$out/store.tgz" -C "$out" store report && rm -rf "$store"
