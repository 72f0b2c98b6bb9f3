#!/usr/bin/env bash
# Every GPU row of BENCHMARKS.md's "GPU" section, and the tests that need CUDA, in two parts that each fit one
# 10-minute command on one H100/H200 (the device tool's limit).
#
#   bash scripts/gpu_pass.sh tests+vq        # CUDA tests (sync debug mode, CUDA graphs, Triton), the VQ layer rows
#   bash scripts/gpu_pass.sh train+encode+prior   # training step, encoding and sampling rows
#   bash scripts/gpu_pass.sh all
#
# Run from the repository root with PYTHONPATH=. (or vqtok installed). The peers (vector-quantize-pytorch 1.32.0 and
# diffusers) must be importable; on a machine without package access, carry them as wheels, downloaded here with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#       vector-quantize-pytorch==1.32.0 einx loguru torch-einops-utils frozendict diffusers importlib_metadata
# and installed there with
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=.:/tmp/site
# Results (JSON and logs) go to $OUT (default gpu_out/). Each part prints its tables as it goes.
set -uo pipefail
part=${1:-all}
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
failed=0
step() {  # name, command...: run it, log it, remember a failure and go on to the next row
    local name=$1; shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$out/$name.log" || { echo "!! $name failed"; failed=1; }
}
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" | tee "$out/device.txt"

if [[ $part == all || $part == *tests* ]]; then
    # the tests that skip without CUDA: sync debug mode on the training step, the VQ step and the sampler, CUDA
    # graphs, the Triton search against float64, restart draws on CUDA
    step tests python -m pytest -q -p no:cacheprovider -rs tests/test_sync_free.py tests/test_vq_gpu_path.py \
        tests/test_vq_search.py tests/test_prior.py -k "cuda or triton"
fi
if [[ $part == all || $part == *vq* ]]; then
    step vq_fp32 python scripts/bench_vq.py --device cuda --steps 10 --min-seconds 2 --json "$out/vq_fp32.json"
    step vq_bf16 python scripts/bench_vq.py --device cuda --autocast bf16 --steps 10 --min-seconds 2 \
        --json "$out/vq_bf16.json"
    step vq_triton python scripts/bench_vq.py --device cuda --autocast bf16 --search auto --impl vqtok --steps 10 \
        --min-seconds 2 --json "$out/vq_triton.json"
fi
if [[ $part == all || $part == *train* ]]; then
    # the CIFAR-10 tokenizer's GPU settings (base 64, 2 res blocks, attention at 8, batch 128), bf16:
    # eager, compiled, and a bare PyTorch loop on the same model
    step train_step python scripts/bench_train_step.py --device cuda --json "$out/train_step.json"
    step prior_train python scripts/bench_prior.py --device cuda --json "$out/prior_train.json" throughput \
        --batch 64 --layers 12 --heads 12 --width 768 --dtype bf16 --compile --steps 20 --warmup 5
fi
if [[ $part == all || $part == *encode* ]]; then
    step encode python scripts/bench_encode.py --device cuda --size 256 --batch 32 --json "$out/encode.json"
fi
if [[ $part == all || $part == *prior* ]]; then
    # 12 x 768 prior, 64 images x 256 codes, top-k 100: today's KV cache, static + compiled, full recompute
    step sample python scripts/bench_prior.py --device cuda --json "$out/sample.json" kv-cache
    step sample_cfg python scripts/bench_prior.py --device cuda --json "$out/sample_cfg.json" kv-cache \
        --cfg-scale 2 --skip-recompute
fi
exit $failed
