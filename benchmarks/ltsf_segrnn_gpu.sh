#!/usr/bin/env bash
# SegRNN look-back 720 on ETTh1 and ETTh2, every horizon (its paper's Table II setting), on a GPU;
# resumable (finished runs skipped). Prints the table against the paper. From the repository root:
#   bash benchmarks/ltsf_segrnn_gpu.sh        (then commit runs/ltsf/repro/*/results.json)
set -euo pipefail
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" LTSF_DATA=${LTSF_DATA:-../shared/data/ltsf}
PY=${PY:-python}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device: this script is for a GPU'"
"$PY" -m ltsf.cli grid configs/ltsf/segrnn_etth_long_gpu.yaml
"$PY" -m ltsf.cli table $("$PY" -m ltsf.cli grid configs/ltsf/segrnn_etth_long_gpu.yaml --list | sed "s|^|runs/ltsf/repro/|")
