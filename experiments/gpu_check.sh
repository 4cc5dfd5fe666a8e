#!/usr/bin/env bash
# GPU check, for one CUDA GPU, in under 10 minutes (about 3 on an H200 before step 3, which compiles: a few more):
#   1. the core tests that run on any device, on CUDA (the float64 reference comparisons, state continuation,
#      memory spans, cached generation, and mixed precision: `pytest -k cuda`);
#   2. the training benchmark at labml_nn's experiment size (d_model 512, 8 heads, d_ff 2048, 6 layers, seq_len 128,
#      batch 64) for the parallel transformer and both Feedback Transformers, in fp32 and under bf16 autocast:
#      one JSON line per model and precision (tokens/s, slowdown versus the parallel model, peak GPU memory);
#   3. cached generation with the compiled step under CUDA graphs (compile='reduce-overhead') against the eager step,
#      at batch 1 and 16, both Feedback Transformers: one JSON line per model and batch (tokens/s compiled and eager,
#      their ratio, and the seconds of the first generation, compiling included). The tests of step 1 include the
#      compiled step under CUDA graphs (tests/model/test_compiled.py);
#   4. a compiled training step: the fused loop (hand-written backward) against the fixed-shape step compiled with
#      the backward AOTAutograd derives, with inductor's default code and under CUDA graphs, at the README size:
#      one JSON line per model and variant (forward and backward ms, speed over the fused loop, compile seconds,
#      the gradients' largest difference).
# It needs PyTorch with CUDA and pytest, nothing else (no labml): run it from a checkout, `bash experiments/gpu_check.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PYTHON="${PYTHON:-python3}"
"$PYTHON" - <<'PY'
import torch
assert torch.cuda.is_available(), "gpu_check.sh needs a CUDA GPU"
print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
PY
"$PYTHON" -m pytest -q -p no:cacheprovider --run-slow tests/model -k cuda
for precision in fp32 bf16; do
    "$PYTHON" experiments/benchmark.py --device cuda --precision "$precision" --d-model 512 --heads 8 --d-ff 2048 \
        --n-layers 6 --seq-len 128 --batch 64 --warmup 2 --steps 5 | tail -n 1 | "$PYTHON" -c '
import json, sys
run = json.load(sys.stdin)
for result in run["results"]:
    print(json.dumps({"precision": run["config"]["precision"], "device": "cuda", **result}))'
done
"$PYTHON" experiments/benchmark_generation.py --device cuda --compile reduce-overhead --compare-eager --batch 1 16 \
    --variants weighted kv --tokens 256 --repeats 3 --full-tokens 0 --growth-tokens 0 | tail -n 1 | "$PYTHON" -c '
import json, sys
run = json.load(sys.stdin)
for variant, by_batch in run["results"].items():
    for batch, result in by_batch.items():
        print(json.dumps({"benchmark": "generation", "device": "cuda", "variant": variant,
                          "batch": int(batch.split("_")[1]), **result}))'
"$PYTHON" experiments/benchmark_compiled_training.py --device cuda --compiled compiled cuda-graphs --repeats 5 \
    | tail -n 1 | "$PYTHON" -c '
import json, sys
for result in json.load(sys.stdin)["results"]:
    print(json.dumps({"benchmark": "compiled_training", "device": "cuda", **result}))'
