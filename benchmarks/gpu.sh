#!/usr/bin/env bash
# The GPU benchmarks in one prepared command, for a session lent a GPU machine (the device tool).
#
#   bash benchmarks/gpu.sh [BENCH...]        # default: kernels models tokens
#   bash benchmarks/gpu.sh tests tokens      # the kernel tests on CUDA first (log: tests-GPU.log)
#   bash benchmarks/gpu.sh tests tokens profile   # then UCC's and ToMe's kernels (token-profile-GPU.json)
#   bash benchmarks/gpu.sh hwprofile         # this GPU measured into a hardware profile (profile-GPU.yaml), as
#                                            # `search profile` does; check it here with benchmarks/profile_check.py
#
# Runs from the repository root on a machine that has torch, triton, timm, rich, pyyaml,
# safetensors, scikit-learn and nvidia-ml-py but not hwnas itself, nor optuna, pymoo, ray or
# platformdirs (the benchmarks need none of those). Each benchmark writes its JSON as soon as it
# ends, as BENCH-GPU.json (GPU: h100, h200, ...) under $OUT (the device tool's folder that comes
# back) or else benchmarks/results; a benchmark that fails does not stop the next one.
# The built-in digits models come from .hwnas-cache/ (git-ignored): copy this machine's cache there
# (cp -r ~/.cache/hwnas/models .hwnas-cache/) and name .hwnas-cache in the device tool's carry, so
# the GPU measures the weights the CPU results name and spends no device time training them.
# BENCH_TIMEOUT=S stops a benchmark after S seconds (its JSON is then lost, the next one still runs).
# DEVICE=cpu QUICK=1 bash benchmarks/gpu.sh is a dry run of the same path on the CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HWNAS_CACHE_DIR="${HWNAS_CACHE_DIR:-$PWD/.hwnas-cache}"
device="${DEVICE:-cuda}"
out="${OUT:-benchmarks/results}"
quick=()
[ -n "${QUICK:-}" ] && quick=(--quick)

if [ "$device" = cpu ]; then
  name=cpu-dryrun
else
  name=$(python3 -c 'import torch; print(torch.cuda.get_device_name().lower().replace("nvidia ", "").split()[0])') \
    || { echo "gpu.sh: no CUDA device here" >&2; exit 2; }
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw --format=csv || true
fi

# the tests of the Triton kernels and the token methods that use them: on CUDA they run the kernels there
kernel_tests=(tests/test_block_sparse.py tests/test_class_attention.py tests/test_descending_order.py
              tests/test_gather_scatter.py tests/test_tokens.py tests/test_compile.py)

status=0
benches=("$@")
[ ${#benches[@]} -eq 0 ] && benches=(kernels models tokens)
for bench in "${benches[@]}"; do
  echo "== bench $bench on $device ($name), $(date -u +%H:%M:%S)"
  if [ "$bench" = tests ]; then
    interpret=()  # on the CPU dry run, the kernels under the Triton interpreter
    [ "$device" = cpu ] && interpret=(TRITON_INTERPRET=1)
    env "${interpret[@]}" timeout "${BENCH_TIMEOUT:-0}" python3 -m pytest -q -ra -p no:cacheprovider \
      "${kernel_tests[@]}" 2>&1 | tee "$out/tests-$name.log" || status=1
    continue
  fi
  if [ "$bench" = hwprofile ]; then  # search profile's measurement, without the CLI (it needs optuna, absent there)
    timeout "${BENCH_TIMEOUT:-0}" python3 -c 'import sys
from hwnas.hwprofiles.measure_profile import measure_profile
from hwnas.hwprofiles.profile import write_profile
print(write_profile(measure_profile(sys.argv[1], quick=bool(sys.argv[3])), sys.argv[2]))' \
      "$device" "$out/profile-$name.yaml" "${QUICK:-}" || status=1
    continue
  fi
  if [ "$bench" = profile ]; then  # benchmarks/token_profile.py: where UCC's and ToMe's forwards spend their time
    timeout "${BENCH_TIMEOUT:-0}" python3 benchmarks/token_profile.py --device "$device" \
      --json "$out/token-profile-$name.json" || status=1
    continue
  fi
  timeout "${BENCH_TIMEOUT:-0}" python3 -m hwnas bench "$bench" --device "$device" "${quick[@]}" --json "$out/$bench-$name.json" || status=1
done
exit $status
