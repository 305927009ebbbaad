#!/usr/bin/env bash
# The issue-16 benchmark runs in priority order, as one resumable background queue (one thread,
# niced). Finished runs are skipped and an interrupted run continues from its last epoch, so
# rerunning this script continues where it stopped. It trains from a snapshot of src/ taken at
# start (runs/job_src), so editing the tree does not change a running queue.
#   nohup configs/ltsf/queue.sh >> /work/logs/ltsf_queue.log 2>&1 &
# Results: runs/ltsf/repro/*/results.json; tables: ltsf table runs/ltsf/repro [--rcf]
# (edit this file only by writing a copy and renaming it over: a running bash reads it lazily)
set -u
cd "$(dirname "$0")/../.."
PY=${PY:-/work/main/.venv/bin/python}
export OMP_NUM_THREADS=1 LTSF_DATA=${LTSF_DATA:-/work/shared/data/ltsf}
rm -rf runs/job_src && mkdir -p runs && cp -r src runs/job_src
export PYTHONPATH=$PWD/runs/job_src
grid() { nice -n 10 "$PY" -m ltsf.cli -v grid "$@" --quiet || echo "ltsf grid $* failed (rc $?)"; }
# (a) RCF plug-in table, look-back 96: seed 2024 first
grid configs/ltsf/rcf_plugin_etth.yaml --seeds 2024
# (b) CycleNet look-back 336 / 720, ETTh1 then ETTh2, one seed at a time
grid configs/ltsf/cyclenet_etth_long.yaml --seeds 2024
grid configs/ltsf/rcf_plugin_etth.yaml --seeds 2025 2026 2027 2028 --order seed
for seed in 2025 2026 2027 2028; do grid configs/ltsf/cyclenet_etth_long.yaml --seeds "$seed"; done
# CycleNet look-back 96 (the RLinear / RMLP + RCF pairs of `ltsf table --rcf`)
grid configs/ltsf/cyclenet_etth.yaml --order seed
# (c) SegRNN look-back 720, ETTh1-96, one seed (hours on one core)
grid configs/ltsf/segrnn_etth_long.yaml
echo "ltsf queue finished $(date -u +%FT%TZ)"
