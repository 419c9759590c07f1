#!/bin/bash
# One run that measures fineflax beside its peers on the same GPU. From the repository root:
#   bash benchmarks/peers/gpu_run.sh [224|32] [resnet50|convnext_tiny|efficientnetv2_s|vit_b_16_torchvision]
# It needs fineflax's GPU install (pip install -e '.[cuda12]' -c constraints.txt), torch and
# torchvision with CUDA, and keras 3 (+ namex, optree). On a machine without network, first
# download the missing wheels elsewhere into .whl/ (ignored by git); they are installed into
# /tmp/site before anything runs:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl ml-collections keras namex optree
# On a lent device machine: command "bash benchmarks/peers/gpu_run.sh [224|32] [MODEL]", carry
# [".whl"], timeout 590. The outputs go to $OUT (default runs/peers).
set -o pipefail
cd "$(dirname "$0")/../.." || exit  # the repository root
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-runs/peers}; mkdir -p "$OUT" || exit
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
side=${1:-224}; model=${2:-resnet50}; batch=$([ "$side" = 32 ] && echo 512 || echo 256)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
run() { local s=$1; shift; timeout "$s" "$@" 2>&1 | grep -v -iE "warn|^\s*$"; }
run 200 python3 scripts/benchmark.py --backbone "$model" --batch $batch --image $side \
  | tee "$OUT/fineflax_${model}_$side.txt"
run 240 python3 benchmarks/peers/peer_torch.py $batch $side "$model" | tee "$OUT/torch_${model}_$side.jsonl"
run 120 python3 benchmarks/peers/peer_keras.py $batch $side "$model" | tee "$OUT/keras_${model}_$side.jsonl"
