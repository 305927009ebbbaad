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
# (a) CycleNet look-back 336 / 720, ETTh1 then ETTh2, one seed at a time (all 32 settings per seed)
for seed in 2024 2025 2026 2027 2028; do grid configs/ltsf/cyclenet_etth_long.yaml --seeds "$seed"; done
# (b) SegRNN look-back 720, ETTh1-96, one seed (hours on one core)
grid configs/ltsf/segrnn_etth_long.yaml
# (c) RCF plug-in table, look-back 96, five seeds
grid configs/ltsf/rcf_plugin_etth.yaml --seeds 2024 2025 2026 2027 2028 --order seed
# CycleNet look-back 96 (the RLinear / RMLP + RCF pairs of `ltsf table --rcf`)
grid configs/ltsf/cyclenet_etth.yaml --order seed
echo "ltsf queue finished $(date -u +%FT%TZ)"
