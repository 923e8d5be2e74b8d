#!/usr/bin/env bash
# The GPU checks of issue 7, run on a lent H100/H200 (Python 3.12, torch + Triton, no registry).
# Needs the wheels in .whl/ (git-ignored through .git/info/exclude), made on a machine with a registry:
#   P="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any"
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $P -d .whl \
#     torchrec==1.6.1 fbgemm-gpu-cpu==1.6.0 tensordict==0.15.3 "pyvers<0.3" iopath
#   pip wheel --no-deps --no-build-isolation . -w .whl      # this project, from the working tree
# (torchrec 1.8.0 does not import with fbgemm-gpu-cpu 1.6.0, the build for the GPU machine's torch 2.11:
# fbgemm_gpu.tbe.monitoring is missing.) For the Criteo cells of robe_scatter.py also copy
# ../shared/data/criteo/kaggle_8k_train.tsv into .whl/ (the GPU machine has no ../shared).
# Writes the logs and results under $OUT (default ./gpu_out).
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT" /tmp/gpu_results
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/benchmarks PYTHONUNBUFFERED=1 MAX_JOBS=16
nvidia-smi -L
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
# The tests' session start loads the C++ CPU extensions: build the three at once, beside the bandwidth run.
for method in robe qr tt; do
  python3 -c "import torchrec_pss_plugins.$method.cpu_kernels as k; assert k.load() is not None" &
done
timeout "${BANDWIDTH_S:-90}" python3 benchmarks/gpu_bandwidth.py --out "$OUT/gpu_bandwidth" 2>&1 | tail -20
wait
timeout "${TEST_S:-300}" python3 -m pytest -q -rf --tb=short -p no:cacheprovider -n "${TEST_WORKERS:-8}" \
  tests/test_triton_kernels.py tests/test_cuda.py tests/test_triton_launcher.py 2>&1 | tee "$OUT/tests.log" | tail -40
timeout "${OVERHEAD_S:-60}" python3 benchmarks/op_overhead.py --device cuda --batch 8 10240 --pooling 1 20 \
  --out /tmp/gpu_results/op_overhead_cuda 2>&1 | tail -5
timeout "${CALLS_S:-60}" python3 benchmarks/robe_calls.py --device cuda --batch 8 1024 10240 --pooling 1 20 \
  --optimizers sgd --iters 10 --out /tmp/gpu_results/robe_calls_cuda 2>&1 | tail -3
CRITEO=${CRITEO_FILE:-.whl/kaggle_8k_train.tsv}
SCATTER_IDS="uniform zipf"
[ -f "$CRITEO" ] && SCATTER_IDS="uniform zipf criteo"
timeout "${SCATTER_S:-90}" python3 benchmarks/robe_scatter.py --device cuda --distributions $SCATTER_IDS \
  --criteo-file "$CRITEO" --out /tmp/gpu_results/robe_scatter_cuda 2>&1 | tail -5
GRID_ARGS=${GRID_ARGS:---rows 4000000 64000000 --compressions 10 100 1000 10000 --chunk-sizes 1 32 --pooling 1 20}
timeout "${GRID_S:-180}" python3 benchmarks/grid.py --device cuda $GRID_ARGS --out /tmp/gpu_results/grid_cuda 2>&1 \
  | tee "$OUT/grid.log" | tail -5
tar czf "$OUT/grid_cuda.tgz" -C /tmp/gpu_results .
