#!/usr/bin/env bash
# Reproduces the README's result tables on the default synthetic data (about 15 min on 2 cores).
#   bash experiments/sweeps/pipeline_figures.sh [OUT_DIR]
set -euo pipefail
OUT="${1:-runs/figures}"
mkdir -p "$OUT"
run() {  # name, overrides...
  local name="$1"; shift
  python -m experiments.run --workdir="$OUT/$name" "$@" > "$OUT/$name.log" 2>&1
  echo "$name" >> "$OUT/runs.txt"
}
: > "$OUT/runs.txt"
run staged_seed0
run staged_seed1 --config.train.seed=1
run staged_seed2 --config.train.seed=2
run reference_recipe --config.level1.recipe=reference
run batch_topk_level1 --config.level1.arch=batch_topk
run paper_level2_rule --config.level2.oversplit=1.0 --config.level2.merge_ratio=0.0 --config.level2.refine=False
run joint_default --config.mode=joint
run joint_paper_alpha1 --config.mode=joint --config.joint.alpha=1.0
for n2 in 16 24 32 64; do
  cp -r "$OUT/staged_seed0" "$OUT/staged_n2_$n2"   # reuses the finished level-1 stage
  run "staged_n2_$n2" --config.level2.n_latents=$n2 --config.overwrite=True
done
python - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
names = open(os.path.join(out, 'runs.txt')).read().split()
keys = ['level1/variance_explained', 'level1/l0', 'level1/alive', 'synthetic/child_mcc',
        'synthetic/children_recovered', 'synthetic/parent_ari', 'synthetic/parent_ari_recovered',
        'level2/concepts', 'level2/effective_concepts', 'level2/merges',
        'level2/intra_concept_cos', 'level2/collapsed']
print('| run | pipeline s | ' + ' | '.join(k for k in keys) + ' |')
print('|' + '---|' * (len(keys) + 2))
for name in names:
  m = json.load(open(os.path.join(out, name, 'export', 'metrics.json')))
  cells = [f'{m[k]:.3f}' if isinstance(m.get(k), float) else str(m.get(k, '—')) for k in keys]
  print(f'| {name} | {m["wall_s"]:.1f} | ' + ' | '.join(cells) + ' |')
PY
