#!/usr/bin/env bash
# The wheels a lent GPU machine needs to run this project: the device tool's image (Python 3.12, x86_64) has PyTorch,
# Lightning, torchmetrics, numpy, scipy, OpenCV, ONNX... but not albumentations, jsonargparse, wandb, torch-pruning or
# faster-coco-eval. Run here (PyPI reachable); it downloads our pins of those with their dependencies for that Python
# and keeps what the image lacks. Then the device call carries the folder and begins with benchmarks/gpu_session.sh,
# which installs them (see benchmarks/README.md, "GPU").
#
#   bash benchmarks/gpu_wheels.sh [.whl]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.whl}
grep -qxF "/$out/" .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo "/$out/" >>.git/info/exclude; }
rm -rf "$out" && mkdir -p "$out"
target=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
        --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
pin() { grep -E "^$1(\[|==)" requirements.txt; }
# torch-pruning without its dependencies: they are torch and numpy, which the image has (else pip fetches a CUDA torch)
python3 -m pip download -q --no-deps "${target[@]}" -d "$out" "$(pin torch-pruning)"
python3 -m pip download -q "${target[@]}" -d "$out" "$(pin albumentations)" "$(pin 'jsonargparse')" "$(pin wandb)" \
    "$(pin faster-coco-eval)"
# what the image holds (the device tool's KINDS.md, "Python packages already there", read 2026-11-17): carrying
# these would shadow builds that its torch was made with. typing-extensions is carried: pydantic-core needs a recent one.
have='numpy scipy pyyaml opencv_python_headless requests urllib3 idna certifi charset_normalizer click packaging
      protobuf xxhash torch pillow'
for w in "$out"/*.whl; do
    name=$(basename "$w" | cut -d- -f1 | tr 'A-Z-' 'a-z_')
    for h in $have; do [ "$name" = "$h" ] && rm "$w"; done
done
ls "$out"
du -sh "$out"
