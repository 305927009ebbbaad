#!/usr/bin/env bash
# GPU checks (a few minutes on one GPU; never needed by the tests). Run from the repository root:
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# 1. the sink path equals eager attention on CUDA in fp32 and bf16 (bundled model, 1 x 1024 tokens)
#    and stays on a fused SDPA kernel; 2. the Surgery / SFT / official step benchmark at the default
#    size and at 1,024 tokens; 3. the sink pass alone at 4,096 tokens. JSON lines go to OUT_DIR.
set -euo pipefail
OUT=${1:-${OUT:-gpu_check_out}}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
PY=${PY:-python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

"$PY" - <<'PY' | tee "$OUT/sink_vs_eager.json"
import json, torch
from sinkguard.models import load_model
from sinkguard.sink import sink_values, sink_values_eager
assert torch.cuda.is_available(), "no CUDA device"
out = {}
for dtype in (torch.float32, torch.bfloat16):
    model = load_model("smollm2-135m-instruct", dtype=dtype, device="cuda").eval()
    ids = torch.randint(100, 20000, (1, 1024), device="cuda")
    mask = torch.ones_like(ids)
    fast = sink_values(model, ids, mask).float()
    ref = sink_values_eager(model, ids, mask).float()
    torch.cuda.reset_peak_memory_stats()
    model.train()
    sink_values(model, ids, mask).sum().backward()
    peak = torch.cuda.max_memory_allocated() / 2**20
    out[str(dtype)] = {"max_abs_diff": float((fast - ref).abs().max()),
                       "sink_fwd_bwd_peak_mib": round(peak, 1)}
print(json.dumps(out))
PY

"$PY" benchmarks/surgery_step.py --json | tee "$OUT/surgery_step_default.json"
"$PY" benchmarks/surgery_step.py --seq 1024 --batch 1 --pool-len 1024 --json | tee "$OUT/surgery_step_1024.json"
"$PY" benchmarks/surgery_step.py --sink-alone --seq 4096 --batch 1 --json | tee "$OUT/sink_alone_4096.json"
echo "results in $OUT"
