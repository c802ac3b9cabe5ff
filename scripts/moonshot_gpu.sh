#!/usr/bin/env bash
# The 20x levers on one GPU: method.rebuild_conv_input and method.recompute_norm_input against today's
# DIVISION and plain training, every stage bounded in time, every record in one results store.
#
#   bash scripts/moonshot_gpu.sh OUT_DIR
#
# Stages, in order (DEADLINE, seconds from the start, default 560, cuts the later ones short):
#   tests      the GPU tests of the rebuild and the recompute (cuDNN's BatchNorm node, the fused codec,
#              the fused BatchNorm, decode_affine, both knobs compiled with the fused codec)
#   memory     fp32 224x224 ResNet-50 at b128 and b256: none, and DIVISION with each knob off / on
#   speed      bf16 channels_last ResNet-50 b128, eager and CUDA-graph steps: none, and DIVISION with
#              each knob off / on (one run at a time)
#   max_batch  the largest ResNet-50 fp32 batch that trains: none, DIVISION, DIVISION with
#              recompute_norm_input (rebuild_conv_input off / on)
#   memory_wrn fp32 224x224 WRN-50-2 at b128: none, and DIVISION with each knob off / on
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

run tests 150 python -m pytest -q -p no:cacheprovider -m gpu tests/test_recompute.py tests/test_triton_codec.py \
  tests/test_compiled.py -k "cudnn or decode_affine or rebuild_and_recompute or recompute_and_rebuild" -rfE
run memory_none 60 main -m mode=memory "${r50[@]}" batch_size=128,256 method=none group=moonshot_memory
# shellcheck disable=SC2086
run memory_division 150 main -m mode=memory "${r50[@]}" batch_size=128,256 method=division $knobs group=moonshot_memory
fast=("${r50[@]}" precision=bf16 channels_last=true batch_size=128 group=moonshot_speed)
run speed_eager_none 60 main mode=speed "${fast[@]}" method=none
# shellcheck disable=SC2086
run speed_eager 120 main -m mode=speed "${fast[@]}" method=division $knobs
run speed_graph_none 60 main mode=speed "${fast[@]}" cuda_graph=true method=none
# shellcheck disable=SC2086
run speed_graph 120 main -m mode=speed "${fast[@]}" cuda_graph=true method=division $knobs
run max_batch 150 main -m mode=memory "${r50[@]}" batch_size=256 memory.find_max_batch=true \
  method=none,division group=moonshot_max_batch
run max_batch_recompute 180 main -m mode=memory "${r50[@]}" batch_size=256 memory.find_max_batch=true \
  method=division method.rebuild_conv_input=false,true method.recompute_norm_input=true group=moonshot_max_batch
run memory_wrn 90 main -m mode=memory model=wrn50_2 dataset.image_size=224 dataset.num_classes=1000 \
  batch_size=128 method=division $knobs group=moonshot_memory
run memory_wrn_none 40 main mode=memory model=wrn50_2 dataset.image_size=224 dataset.num_classes=1000 \
  batch_size=128 method=none group=moonshot_memory
