#!/usr/bin/env bash
# GPU serving benchmark on one H100/H200 (bench/serve_gpu.py): the training image prepares the
# random-weight Llama-3-8B-architecture model and its W4A16 quantization, the serving image runs
# the vLLM sweep. Build both images first (README, "Containers"):
#   docker build -f Dockerfile.train -t tuneship-train .
#   docker build -f Dockerfile.serve -t tuneship-serve .
# then, from the repository root: bench/serve_gpu.sh [WORK_DIR]   (about 15 GB written there)
set -euo pipefail
work=${1:-/tmp/tuneship-gpu-bench}
mkdir -p "$work" bench/results
run=(docker run --rm --gpus all --ipc host --user "$(id -u):$(id -g)" -e HOME=/work
     -v "$PWD:/src" -v "$work:/work" --entrypoint python)
"${run[@]}" tuneship-train /src/bench/serve_gpu.py prepare --work /work
"${run[@]}" tuneship-serve /src/bench/serve_gpu.py sweep --work /work --out /src/bench/results
