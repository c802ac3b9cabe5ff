#!/usr/bin/env bash
# Compiled DIVISION on one GPU against compiled plain training: memory, then speed.
#
#   bash scripts/compiled_gpu.sh OUT_DIR memory   # fp32 b128 allocator figures, compiled (none, division,
#                                                 # division with rebuild_conv_input) and eager
#   bash scripts/compiled_gpu.sh OUT_DIR all      # memory, then speed
#   bash scripts/compiled_gpu.sh OUT_DIR speed    # starts the speed runs at once (they compile side by
#                                                 # side), then times bf16 channels_last b128 images/s
#                                                 # one run at a time (speed.queue):
#                                                 # compile=true (none, division, division with
#                                                 # rebuild_conv_input), then compile=reduce-overhead
#                                                 # (none, division: the graphs replayed as CUDA graphs),
#                                                 # then division with recompute_norm_input (and
#                                                 # both knobs), compile=true, then division with
#                                                 # fused_norm (the BatchNorm in its input's encode;
#                                                 # and with rebuild_conv_input), compile=true
#   bash scripts/compiled_gpu.sh OUT_DIR breaks   # Dynamo's graph breaks of compiled ResNet-50 with
#                                                 # fused_norm (scripts/graph_breaks.py, aot_eager, bf16)
#   bash scripts/compiled_gpu.sh OUT_DIR eager    # eager bf16 channels_last b128 images/s, one run at
#                                                 # a time: none, division, and division with
#                                                 # norm_from_codes=false (the BatchNorm unfused: half
#                                                 # the launches and allocations per step, more bytes
#                                                 # moved; with the kernels skipped on the CPU, a fifth
#                                                 # less host work: docs/results.md), group eager_speed
#
# Memory runs share the GPU (allocator figures are per process); speed runs never do. Records go to
# OUT_DIR/store (pack them with ``python -m runners.record pack``); each stage's log to OUT_DIR/NAME.log.
# DEADLINE (seconds from the start, default 3600) cuts every stage's time limit so that the script
# ends by then. SPEED_QUEUE, SPEED_QUEUE_SIZE and SPEED_QUEUE_TIMEOUT share one speed.queue folder with
# the speed runs of another script started beside this one (scripts/moonshot_gpu.sh's).
set -uo pipefail
out=${1:?usage: compiled_gpu.sh OUT_DIR memory|speed|all|breaks|eager}
what=${2:?usage: compiled_gpu.sh OUT_DIR memory|speed|all|breaks|eager}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/.inductor-cache}
mkdir -p "$out"
common=(logger=none device=cuda "results_dir=$out/store" train.progress=false)
r50=(model=resnet50 dataset.image_size=224 dataset.num_classes=1000)
fast=(precision=bf16 channels_last=true batch_size=128)
variants=("method=none compile=true" "method=division compile=true"
          "method=division method.rebuild_conv_input=true compile=true"
          "method=none compile=reduce-overhead" "method=division compile=reduce-overhead"
          "method=division method.recompute_norm_input=true compile=true"
          "method=division method.rebuild_conv_input=true method.recompute_norm_input=true compile=true"
          "method=division method.fused_norm=true compile=true"
          "method=division method.fused_norm=true method.rebuild_conv_input=true compile=true")
# ONLY="0 1 5" keeps those variants of the speed stage
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

if [[ $what == breaks ]]; then
  for knobs in "fused_norm=true" "fused_norm=true rebuild_conv_input=true"; do
    # shellcheck disable=SC2086
    TORCH_LOGS=graph_breaks timeout 300 python scripts/graph_breaks.py --model resnet50 --amp --knobs $knobs
  done > "$out/graph_breaks.log" 2>&1
fi
if [[ $what == memory || $what == all ]]; then
  for i in 0 1 2; do
    # shellcheck disable=SC2086
    stage "memory_compiled_$i" 540 mode=memory "${r50[@]}" batch_size=128 ${variants[$i]} group=compiled_memory &
  done
  for v in "method=none" "method=division"; do
    # shellcheck disable=SC2086
    stage "memory_eager_${v#method=}" 120 mode=memory "${r50[@]}" batch_size=128 $v group=compiled_memory
  done
  wait
fi
if [[ $what == speed || $what == all ]]; then
  # All the speed runs start at once: they compile side by side (Dynamo's tracing is single-threaded
  # host work, minutes per compiled DIVISION ResNet-50), then speed.queue times them one at a time,
  # once every one of them is warm (runners/speed_queue.py).
  queue=${SPEED_QUEUE:-$out/speed_queue}
  [[ -z ${SPEED_QUEUE:-} ]] && rm -rf "$queue"
  for i in "${only[@]}"; do
    # shellcheck disable=SC2086
    stage "speed_compiled_$i" 560 mode=speed "${r50[@]}" "${fast[@]}" ${variants[$i]} speed.warmup=3 \
      group=compiled_speed "speed.queue=$queue" "speed.queue_size=${SPEED_QUEUE_SIZE:-${#only[@]}}" \
      "speed.queue_timeout=${SPEED_QUEUE_TIMEOUT:-420}" &
  done
  wait
fi
if [[ $what == eager ]]; then
  queue=$out/eager_queue
  rm -rf "$queue"
  eager=("method=none" "method=division" "method=division method.norm_from_codes=false")
  for i in "${!eager[@]}"; do
    # shellcheck disable=SC2086
    stage "speed_eager_$i" 300 mode=speed "${r50[@]}" "${fast[@]}" ${eager[$i]} group=eager_speed \
      "speed.queue=$queue" "speed.queue_size=${#eager[@]}" speed.queue_timeout=120 &
  done
  wait
fi
