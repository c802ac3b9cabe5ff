#!/usr/bin/env bash
# The 20x levers on one GPU: method.rebuild_conv_input and method.recompute_norm_input against today's
# DIVISION and plain training, every stage bounded in time, every record in one results store.
#
#   bash scripts/moonshot_gpu.sh OUT_DIR
#
# Stages (STAGES, default "tests accuracy memory max_batch speed"; DEADLINE, seconds from the start,
# default 560, cuts the later ones short):
#   accuracy   ResNet-18 on the CIFAR-10 JPEG copy (.data/cifar10-jpeg or DIVISION_CIFAR10_JPEG),
#              EPOCHS (default 30) epochs, seeds 0 and 1: none, DIVISION, DIVISION with both knobs; the
#              six runs at once, in the background of the tests and memory stages
#   tests      the GPU tests of the rebuild and the recompute (cuDNN's BatchNorm node, the fused codec,
#              the fused BatchNorm, decode_affine, both knobs compiled with the fused codec)
#   memory     fp32 224x224 ResNet-50 at b128 and b256, WRN-50-2 at b128: none, and DIVISION with each
#              knob off / on (allocator figures are per process: plain training's runs and DIVISION's
#              share the GPU, with the above)
#   max_batch  the largest ResNet-50 fp32 batch that trains (alone on the GPU, after the accuracy
#              runs): none, DIVISION, DIVISION with recompute_norm_input (rebuild_conv_input off / on)
#   speed      bf16 channels_last ResNet-50 b128: CUDA-graph steps of none and of DIVISION with each knob
#              off / on, eager steps of none, DIVISION and both knobs; started together, timed one at
#              a time (speed.queue; SPEED_QUEUE, SPEED_QUEUE_SIZE and SPEED_QUEUE_TIMEOUT share one queue
#              folder with the runs of another script started beside this one, e.g. compiled_gpu.sh's)
# Needs CUDA and hydra-core, omegaconf, antlr4 and lmdb importable; logs in OUT_DIR/NAME.log.
set -uo pipefail
out=${1:?usage: moonshot_gpu.sh OUT_DIR}
deadline=${DEADLINE:-560}
mkdir -p "$out"
common=(logger=none device=cuda "results_dir=$out/store" train.progress=false)
r50=(model=resnet50 dataset.image_size=224 dataset.num_classes=1000)
knobs="method.rebuild_conv_input=false,true method.recompute_norm_input=false,true"
run() {  # run NAME SECONDS COMMAND...: bounded by the deadline, logged to OUT/NAME.log (COMMAND
  # "main" is python main.py with the common keys)
  local name=$1 seconds=$2; shift 2
  (( seconds > deadline - SECONDS )) && seconds=$(( deadline - SECONDS ))
  (( seconds < 20 )) && { echo "=== $name skipped: past the deadline" >> "$out/commands.txt"; return; }
  echo "=== $name: $*" >> "$out/commands.txt"
  local start=$SECONDS
  [[ $1 == main ]] && { shift; set -- python main.py "$@" "${common[@]}"; }
  timeout "$seconds" "$@" > "$out/$name.log" 2>&1
  echo "=== $name exit $? after $((SECONDS - start)) s" >> "$out/commands.txt"
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/versions.txt"
python -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)" >> "$out/versions.txt"

has() { [[ " ${STAGES:-tests accuracy memory max_batch speed} " == *" $1 "* ]]; }

if has accuracy; then
  jpeg=${DIVISION_CIFAR10_JPEG:-.data/cifar10-jpeg}
  epochs=${EPOCHS:-30}
  accuracy_runs=("method=none" "method=division"
                 "method=division method.rebuild_conv_input=true method.recompute_norm_input=true")
  labels=(none division both_knobs)
  for seed in 0 1; do
    for i in "${!accuracy_runs[@]}"; do
      # shellcheck disable=SC2086
      run "accuracy_${labels[$i]}_s$seed" $(( 120 + 10 * epochs )) main mode=train model=resnet18 \
        dataset=imagefolder "dataset.root=$jpeg" ${accuracy_runs[$i]} batch_size=256 "train.epochs=$epochs" \
        train.lr=0.1 train.weight_decay=5e-4 precision=bf16 channels_last=true "seed=$seed" \
        dataset.num_workers=4 group=moonshot_accuracy &
    done
  done
fi
has tests && run tests 150 python -m pytest -q -p no:cacheprovider -m gpu tests/test_recompute.py \
  tests/test_triton_codec.py tests/test_compiled.py \
  -k "cudnn or decode_affine or rebuild_and_recompute or recompute_and_rebuild" -rfE
if has memory; then  # two chains side by side: plain training's runs, DIVISION's
  {
    run memory_none 90 main -m mode=memory "${r50[@]}" batch_size=128,256 method=none group=moonshot_memory
    run memory_wrn_none 60 main mode=memory model=wrn50_2 dataset.image_size=224 dataset.num_classes=1000 \
      batch_size=128 method=none group=moonshot_memory
  } &
  # shellcheck disable=SC2086
  run memory_division 200 main -m mode=memory "${r50[@]}" batch_size=128,256 method=division $knobs group=moonshot_memory
  # shellcheck disable=SC2086
  run memory_wrn 120 main -m mode=memory model=wrn50_2 dataset.image_size=224 dataset.num_classes=1000 \
    batch_size=128 method=division $knobs group=moonshot_memory
fi
wait  # the accuracy runs: the largest-batch search and the timed steps need the GPU alone
if has max_batch; then
  run max_batch_recompute 180 main -m mode=memory "${r50[@]}" batch_size=256 memory.find_max_batch=true \
    method=division method.rebuild_conv_input=false,true method.recompute_norm_input=true group=moonshot_max_batch
  run max_batch 150 main -m mode=memory "${r50[@]}" batch_size=256 memory.find_max_batch=true \
    method=none,division group=moonshot_max_batch
fi
if has speed; then
  fast=("${r50[@]}" precision=bf16 channels_last=true batch_size=128 group=moonshot_speed)
  both="method.rebuild_conv_input=true method.recompute_norm_input=true"
  speed_runs=("cuda_graph=true method=none" "cuda_graph=true method=division"
              "cuda_graph=true method=division method.rebuild_conv_input=true"
              "cuda_graph=true method=division method.recompute_norm_input=true"
              "cuda_graph=true method=division $both"
              "method=none" "method=division" "method=division $both")
  queue=${SPEED_QUEUE:-$out/speed_queue}
  [[ -z ${SPEED_QUEUE:-} ]] && rm -rf "$queue"
  for i in "${!speed_runs[@]}"; do
    # shellcheck disable=SC2086
    run "speed_$i" 540 main mode=speed "${fast[@]}" ${speed_runs[$i]} "speed.queue=$queue" \
      "speed.queue_size=${SPEED_QUEUE_SIZE:-${#speed_runs[@]}}" "speed.queue_timeout=${SPEED_QUEUE_TIMEOUT:-180}" &
  done
  wait
fi
