#!/usr/bin/env bash
# The GPU checks of issues 5/19 and 21 as one command for a lent H100/H200 (see /work/.library/device/README.md).
#
# The device image has PyTorch, transformers, safetensors, tokenizers and pytest, but not diffusers, PyAV
# or ftfy. Before the device call, on the CPU machine, in the repo root:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl diffusers==0.42.1 av==18.1.0 ftfy==6.3.1 wcwidth==0.9.4
#
# then run it there:  run(command="bash bench/gpu_session.sh", carry=[".whl"], timeout_s=590)
# (all steps: at most 590 s; a step cut short can be rerun alone: bash bench/gpu_session.sh vae720)
# Issue 19's runtime options (block offload 1.3B/14B, --compile, fp8 scaled_mm; diffusers not needed)
# are an opt-in step of at most 240 s, for a second device call while the machine is still warm, when
# status's budget_left_s allows (about 150-190 s expected on an H100):
#   run(command="bash bench/gpu_session.sh runtime", timeout_s=250)
# It prints a CPU-side smoke check of bench_gpu.py, the gpu-marked tests, and the GPU benchmark, and
# leaves the benchmark's JSON and the logs in $OUT (or bench/results when $OUT is unset).
set -u
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD/src:$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"

steps=" ${*:-smoke tests bench vae720} "  # a subset: bash bench/gpu_session.sh vae720

if [[ $steps == *" smoke "* ]]; then
  echo "== bench_gpu.py smoke (tiny shapes, CPU)"
  BENCH_GPU_SMOKE=1 timeout 60 python3 bench/bench_gpu.py --repeats 1 2>&1 | tail -4
fi
if [[ $steps == *" tests "* ]]; then
  echo "== gpu-marked tests"
  timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu -s tests 2>&1 | tee "$out/gpu-tests.log" | tail -25
fi
if [[ $steps == *" bench "* ]]; then
  echo "== GPU benchmark (real shapes, bf16)"
  timeout 270 python3 bench/bench_gpu.py --cases 1.3b,14b-i2v,vae --repeats 3 2>&1 | tee "$out/gpu-bench.log" | tail -12
fi
if [[ $steps == *" vae720 "* ]]; then
  echo "== exact tiled VAE decode at 1280 x 720 x 81 within 6 GiB (issue 21)"
  timeout 110 python3 bench/bench_gpu.py --cases vae720 2>&1 | tee "$out/gpu-vae720.log" | tail -4
fi
if [[ $steps == *" runtime "* ]]; then
  echo "== runtime options: block offload, --compile, fp8 scaled_mm (issue 19, opt-in)"
  timeout 240 python3 bench/bench_gpu.py --cases fp8,offload,compile --repeats 3 2>&1 | tee "$out/gpu-runtime.log" | tail -6
fi
if [ "$out" != bench/results ]; then
  cp bench/results/gpu-*.json "$out"/ 2>/dev/null || true
fi
