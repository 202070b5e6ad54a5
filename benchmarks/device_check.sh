#!/usr/bin/env bash
# The GPU learner on a machine with CUDA, in about 8 minutes (one H200, 16 cores): picks a python
# whose torch has CUDA ($PYTHON, .venv/bin/python, python3), installs flowrl into it if needed
# (editable with the atari and mujoco extras; where no package index is reachable, flowrl alone
# with --no-deps, over what is installed), then runs benchmarks/device_check.py: the learner's
# gradient steps/s on cuda and on cpu (PPO's Nature CNN on Breakout frames, SAC 256x256), and PPO
# ALE/Breakout-v5 and SAC HalfCheetah-v5 (Pendulum-v1 without mujoco) end to end with
# learner_device: cuda. Without CUDA it runs the same on the CPU at SCALE (default 0.02 x the
# budgets): a smoke test of the code path.
#     benchmarks/device_check.sh            # SCALE=1 with CUDA; TIMEOUT_S=540; REINSTALL=1 forces pip
set -euo pipefail
cd "$(dirname "$0")/.."

has_cuda() { "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }
PY=""
for candidate in ${PYTHON:-} .venv/bin/python python3; do
    if command -v "$candidate" >/dev/null 2>&1 && has_cuda "$candidate"; then PY=$candidate; break; fi
done
if [ -n "$PY" ]; then
    DEVICES=cuda,cpu; SCALE=${SCALE:-1}
else
    PY=${PYTHON:-.venv/bin/python}; [ -x "$PY" ] || PY=python3
    DEVICES=cpu; SCALE=${SCALE:-0.02}
    echo "device_check: no python here has a CUDA torch; the CPU path at SCALE=$SCALE"
fi

if [ "${REINSTALL:-0}" = 1 ] || ! "$PY" -c 'import flowrl.operators' 2>/dev/null; then
    "$PY" -m pip install -q -e '.[atari,mujoco]' || "$PY" -m pip install -q --no-deps --no-build-isolation -e .
fi
"$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "(none)", "threads", torch.get_num_threads())'
exec timeout "${TIMEOUT_S:-540}" "$PY" benchmarks/device_check.py --devices "$DEVICES" --scale "$SCALE"
