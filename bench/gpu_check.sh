#!/usr/bin/env bash
# One prepared check of the CUDA path and of GPU throughput, for a lent GPU machine (under 8 minutes there).
# On a CPU-only machine the same steps run in a reduced form, say that the CUDA parts were skipped, and the
# last line is still the JSON summary ("cuda": false).
#
#   here, once:        bash bench/gpu_wheels.sh            (wheels the bare GPU machine lacks -> .gpu_wheels/)
#   on the device:     bash bench/gpu_check.sh             (device tool: carry .gpu_wheels)
#
# Each step is time-boxed and writes its log (and the device facts) to $OUT (default reports/gpu_check).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-reports/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
WHEELS=${WHEELS:-.gpu_wheels}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
STEPS="$OUT/steps.tsv"
: > "$STEPS"

step() {  # step NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.log, record status and seconds
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$STEPS"
  tail -n 4 "$OUT/$name.log" | cut -c1-240
  [ "$rc" = 124 ] && echo "   (timed out after ${limit}s)"
  return 0
}

# 0. Dependencies: the machine's own torch; the rest from the wheel folder, never from a network.
if ! "$PY" -c "import fastapi, uvicorn, pydantic_settings, multipart, zlib_ng, pydicom, pynetdicom, dicomweb_client, pywt, pylibjpeg, pytest" 2>/dev/null; then
  if [ -d "$WHEELS" ]; then
    step install 180 "$PY" -m pip install -q --no-index --find-links "$WHEELS" fastapi uvicorn pydantic-settings \
      python-multipart "pillow>=13" isal zlib-ng pydicom pynetdicom dicomweb-client PyWavelets pylibjpeg pylibjpeg-libjpeg \
      pylibjpeg-openjpeg pylibjpeg-rle pytest
  else
    echo "error: dependencies missing and no wheel folder $WHEELS (run bash bench/gpu_wheels.sh first)" >&2
  fi
fi

# 1. Device facts.
"$PY" - > "$OUT/device.json" <<'PYEOF'
import json, platform, torch
cuda = torch.cuda.is_available()
doc = {"cuda": cuda, "torch": torch.__version__, "cuda_version": torch.version.cuda, "python": platform.python_version(),
       "cpu_threads": torch.get_num_threads()}
if cuda:
    p = torch.cuda.get_device_properties(0)
    doc.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}",
               bf16=torch.cuda.is_bf16_supported(), gpus=torch.cuda.device_count())
print(json.dumps(doc))
PYEOF
cat "$OUT/device.json"
CUDA=$("$PY" -c "import torch; print(1 if torch.cuda.is_available() else 0)")
[ "$CUDA" = 1 ] || echo "NOTE: no CUDA device here: CUDA tests are skipped and the benchmarks run in a reduced CPU form."

# 2. CUDA tests (they skip cleanly without a GPU).
step cuda_tests 240 "$PY" -m pytest -q -m cuda tests/models/inference/test_cuda.py -p no:cacheprovider

# 3. In-process pipeline: small (shipped weights) and paper (random weights), fp32/bf16, batches up to 64,
#    channels_last, torch.compile and CUDA graphs.
if [ "$CUDA" = 1 ]; then
  step pipeline_small 200 "$PY" bench/pipeline.py --size 256 --batches 1,8,32,64 --repeats 2 \
    --precisions fp32,bf16 --variants eager,channels_last,compile,cudagraphs
  step pipeline_paper 150 "$PY" bench/pipeline.py --weights random:paper --size 256 --batches 1,8,32 --repeats 2 \
    --precisions bf16,fp32 --variants eager,channels_last
  # 4. The real service on the GPU: 64 concurrent clients, batches up to 32.
  step load 200 "$PY" bench/load.py --size 256 --requests 256 --concurrency 64 --batch 32 --pipeline-pairs 32
else
  step pipeline_small 200 "$PY" bench/pipeline.py --quick --weights random:tiny --precisions fp32 \
    --variants eager,channels_last
  step load 200 "$PY" bench/load.py --quick
fi

# 5. A study end to end (bench/study.py): the real T1 where ../shared is beside the clone, else a phantom MR;
#    both tiers on CUDA, the fast tier once on a CPU (the full model's study takes minutes there).
SERIES_ARGS=()
[ -d ../shared/data/real_dicom/siemens_t1_sag_hfs ] || SERIES_ARGS=(--phantom)
if [ "$CUDA" = 1 ]; then
  step study 150 "$PY" bench/study.py --runs 2 ${SERIES_ARGS[@]+"${SERIES_ARGS[@]}"}
else
  step study 150 "$PY" bench/study.py --tiers fast --runs 1 ${SERIES_ARGS[@]+"${SERIES_ARGS[@]}"}
fi

# 6. One JSON line with everything.
"$PY" bench/gpu_summary.py "$OUT"
