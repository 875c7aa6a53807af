#!/usr/bin/env bash
# One prepared run for a lent GPU machine (the `device` tool): GPU tests, kernel tests on the GPU,
# the kernel benchmark (vs scipy and torch grid_sample on the same card) and pair-alignment speed on
# synthetic EM. It needs only the repository (no ../shared data, nothing downloaded): the machine's
# image already holds jax, flax, optax, orbax, tensorstore, absl, scipy, pytest and torch.
#
#   device run:  command="bash experiments/device_check.sh", timeout_s=540
#   here (CPU, a dry run with small sizes):  DEVICE_CHECK_QUICK=1 bash experiments/device_check.sh
#
# Everything lands in $OUT (./device_out when OUT is unset), at most 8 files: env.txt,
# tests_gpu.log, tests_kernels.log, kernels.log, kernels.json, pair_speed.log, pair_speed_synthetic.md.
# Each step has its own time limit, so one slow step cannot eat the others' device time.
set -uo pipefail
OUT=${OUT:-device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
if [[ -n "${DEVICE_CHECK_QUICK:-}" ]]; then
  KERNEL_SIZES=256,512; PAIR_SIZES=256; REPEATS=1
else
  KERNEL_SIZES=1024,2048,4096; PAIR_SIZES=512,1024,2048; REPEATS=3
fi

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import jax, flax, optax, orbax.checkpoint, tensorstore; print('jax', jax.__version__, 'backend', jax.default_backend(), jax.devices()); print('flax', flax.__version__, 'optax', optax.__version__, 'tensorstore', tensorstore.__version__)"
} 2>&1 | tee "$OUT/env.txt"

timeout 240 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/tests_gpu.log"
timeout 200 "$PY" -m pytest -q -p no:cacheprovider tests/test_fields.py tests/test_losses.py \
  tests/test_voting_decay_metrics.py 2>&1 | tee "$OUT/tests_kernels.log"
timeout 180 "$PY" experiments/bench_kernels.py --sizes="$KERNEL_SIZES" --repeats=5 \
  --json_out="$OUT/kernels.json" 2>&1 | grep -v -i "warning" | tee "$OUT/kernels.log"
timeout 240 "$PY" experiments/bench_pair.py --mode=speed --speed_data=synthetic --speed_sizes="$PAIR_SIZES" \
  --repeats="$REPEATS" --metroem=false --out_dir="$OUT" 2>&1 | grep -v -i "warning" | tee "$OUT/pair_speed.log"
echo "device_check done: $(date -u)" | tee -a "$OUT/env.txt"
