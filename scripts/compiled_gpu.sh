#!/usr/bin/env bash
# Compiled DIVISION on one GPU against compiled plain training: memory, then speed, in two calls that
# share inductor's cache (the memory call compiles the speed runs' graphs too, beside its own).
#
#   bash scripts/compiled_gpu.sh OUT_DIR memory   # fp32 b128 allocator figures, compiled (none, division,
#                                                 # division with rebuild_conv_input) and eager; compiles
#                                                 # the speed runs' graphs into the cache meanwhile
#   bash scripts/compiled_gpu.sh OUT_DIR all      # memory, then speed (inductor's cache warm)
#   bash scripts/compiled_gpu.sh OUT_DIR speed    # compiles the speed runs' graphs at once, then measures
#                                                 # bf16 channels_last b128 images/s, one run at a time:
#                                                 # compile=true (none, division, division with
#                                                 # rebuild_conv_input), then compile=reduce-overhead
#                                                 # (none, division: the graphs replayed as CUDA graphs),
#                                                 # then division with recompute_norm_input (and
#                                                 # both knobs), compile=true
#
# Memory runs share the GPU (allocator figures are per process); speed runs never do. Records go to
# OUT_DIR/store (pack them with ``python -m runners.record pack``); each stage's log to OUT_DIR/NAME.log.
# TORCHINDUCTOR_CACHE_DIR (default .inductor-cache) must be the same for both calls. DEADLINE (seconds
# from the start, default 3600) cuts every stage's time limit so that the script ends by then.
set -uo pipefail
out=${1:?usage: compiled_gpu.sh OUT_DIR memory|speed|all}
what=${2:?usage: compiled_gpu.sh OUT_DIR memory|speed|all}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/.inductor-cache}
mkdir -p "$out"
common=(logger=none device=cuda "results_dir=$out/store" train.progress=false)
r50=(model=resnet50 dataset.image_size=224 dataset.num_classes=1000)
fast=(precision=bf16 channels_last=true batch_size=128)
variants=("method=none compile=true" "method=division compile=true"
          "method=division method.rebuild_conv_input=true compile=true"
          "method=none compile=reduce-overhead" "method=division compile=reduce-overhead"
          "method=division method.recompute_norm_input=true compile=true"
          "method=division method.rebuild_conv_input=true method.recompute_norm_input=true compile=true")
# ONLY="0 1 5" keeps those variants of the speed stages (and their warm-up), in that order
read -r -a only <<< "${ONLY:-${!variants[*]}}"
deadline=${DEADLINE:-3600}
stage() {  # stage NAME SECONDS ARGS...: one main.py call, bounded, logged to OUT/NAME.log
  local name=$1 seconds=$2; shift 2
  (( seconds > deadline - SECONDS )) && seconds=$(( deadline - SECONDS ))
  (( seconds < 30 )) && { echo "=== $name skipped: past the deadline" >> "$out/commands.txt"; return; }
  echo "=== $name: python main.py $*" >> "$out/commands.txt"
  local start=$SECONDS
  # the stage's own keys last, so that they win (the warm-up runs' results_dir)
  timeout "$seconds" python main.py "${common[@]}" "$@" > "$out/$name.log" 2>&1
  echo "=== $name exit $? after $((SECONDS - start)) s" >> "$out/commands.txt"
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/versions.txt"
python -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)" >> "$out/versions.txt"

warm_speed() {  # the speed runs' graphs, compiled into the cache at once (their records are thrown away)
  for i in "${only[@]}"; do
    # shellcheck disable=SC2086
    stage "warm_speed_$i" 540 mode=speed "${r50[@]}" "${fast[@]}" ${variants[$i]} speed.warmup=1 speed.steps=1 \
      "results_dir=/tmp/warm_store" &
  done
}
if [[ $what == memory || $what == all ]]; then
  for i in 0 1 2; do
    # shellcheck disable=SC2086
    stage "memory_compiled_$i" 540 mode=memory "${r50[@]}" batch_size=128 ${variants[$i]} group=compiled_memory &
  done
  warm_speed
  for v in "method=none" "method=division"; do
    # shellcheck disable=SC2086
    stage "memory_eager_${v#method=}" 120 mode=memory "${r50[@]}" batch_size=128 $v group=compiled_memory
  done
  wait
elif [[ $what == speed ]]; then
  warm_speed  # a cold cache would otherwise compile each run in turn, in its own time limit
  wait
fi
if [[ $what == speed || $what == all ]]; then
  for i in "${only[@]}"; do
    # shellcheck disable=SC2086
    # 240 s: the warm cache spares inductor's compile, not Dynamo's tracing (a compiled DIVISION
    # ResNet-50 speed run took 136 s on an H200 after the warm-up)
    stage "speed_compiled_$i" 240 mode=speed "${r50[@]}" "${fast[@]}" ${variants[$i]} speed.warmup=3 group=compiled_speed
  done
fi
