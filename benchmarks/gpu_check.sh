#!/usr/bin/env bash
# One prepared accelerator check (run through the session's device tool; see benchmarks/README.md):
# the 4B vision tower's harvest throughput and the level-1 train step at the paper's scale.
# Results land in $OUT (or benchmarks/results when OUT is unset).
set -uo pipefail
OUT="${OUT:-benchmarks/results}"
nvidia-smi -L || true
# Uses the machine's own jax/flax (measured on the H200 image: jax 0.11.2, flax 0.12.10; our
# pinned flax 0.12.8 does not import with jax 0.11.2). Only csae_jax.vlms/saes/train are needed.
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
timeout 240 python3 -m benchmarks.vision_throughput --batch 32 --iters 5 --out "$OUT"
timeout 200 python3 -m benchmarks.train_step_throughput --batch 4096 --iters 50 --out "$OUT"
