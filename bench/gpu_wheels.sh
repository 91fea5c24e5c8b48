#!/usr/bin/env bash
# Prepare (here, with a package index) the wheels a bare GPU machine lacks, for bench/gpu_check.sh there.
# The lent machine has torch, numpy, scipy, pillow, httpx, pyyaml, tqdm, matplotlib and prometheus-client
# but no package index; this downloads CPython 3.12 manylinux x86_64 wheels of the rest (and their
# dependencies) into .gpu_wheels/ (git-ignored, carried with the device call). Never downloads torch.
#   bash bench/gpu_wheels.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.gpu_wheels}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$DIR"
PKGS=(fastapi uvicorn pydantic pydantic-settings python-multipart "pillow>=13" isal zlib-ng pydicom pynetdicom dicomweb-client
      PyWavelets pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle pytest)
"$PY" -m pip download -q --disable-pip-version-check --only-binary=:all: --python-version 3.12 \
  --implementation cp --abi cp312 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d "$DIR" "${PKGS[@]}"
# The device has these already (and numpy must match its torch build): keep the folder small.
rm -f "$DIR"/numpy-*.whl "$DIR"/scipy-*.whl
size_kb=$(du -sk "$DIR" | cut -f1)
echo "$(ls "$DIR" | wc -l) wheels, $((size_kb / 1024)) MiB in $DIR"
if [ "$size_kb" -gt $((64 * 1024)) ]; then echo "error: over the 64 MiB the device call carries" >&2; exit 1; fi
