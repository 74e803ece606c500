"""Two robustness-suite outputs side by side: CSAE's children recovered, ARI and level-1
variance explained per family / seed / n2, on the runs both hold, with the summary lines.

    python -m benchmarks.compare_suites OLD_OUT NEW_OUT [NEW_OUT ...]

(each an --out of benchmarks.robustness; several NEW outs are pooled, e.g. runs split over
processes). Prints a markdown table.
"""
import glob, json, os, sys
import numpy as np
OLD, NEW = sys.argv[1], sys.argv[2:]
def load(root):
  out = {}
  for f in glob.glob(os.path.join(root, 'runs/*/seed_*/n2_*/compare.json')):
    p = f.split('/'); c = json.load(open(f))['csae']
    out[(p[-4], p[-3], p[-2])] = (c['synthetic/children_recovered'], c['synthetic/parent_ari_recovered'],
                                 c['level1/variance_explained'])
  return out
old = load(OLD); new = {}
for r in NEW: new.update(load(r))
keys = sorted(new)
print('| family | seed | n2 | recovered old -> new | ARI old -> new | VE old -> new |')
print('|---|---|---|---|---|---|')
for k in keys:
  o, n = old.get(k), new[k]
  if o is None: continue
  print(f'| {k[0]} | {k[1][5:]} | {k[2][3:].replace("_", "/")} | {o[0]:.2f} -> {n[0]:.2f} | {o[1]:.3f} -> {n[1]:.3f} | {o[2]:.4f} -> {n[2]:.4f} |')
both = [k for k in keys if k in old]
for lab in ('2K', 'K', 'n1_8'):
  ks = [k for k in both if k[2] == 'n2_' + lab]
  if not ks: continue
  a_o = np.array([old[k][1] for k in ks]); a_n = np.array([new[k][1] for k in ks])
  print(f'n2={lab}: {len(ks)} family-seeds; mean ARI {a_o.mean():.3f} -> {a_n.mean():.3f}; '
        f'< 0.9: {(a_o < 0.9).sum()} -> {(a_n < 0.9).sum()}; min {a_o.min():.3f} -> {a_n.min():.3f}')
ks = [k for k in both if k[2] == 'n2_2K']
r_o = np.array([old[k][0] for k in ks]); r_n = np.array([new[k][0] for k in ks])
v_o = np.array([old[k][2] for k in ks]); v_n = np.array([new[k][2] for k in ks])
print(f'level 1 ({len(ks)}): recovered mean {r_o.mean():.3f} -> {r_n.mean():.3f}, min {r_o.min():.2f} -> {r_n.min():.2f}; '
      f'VE mean {v_o.mean():.4f} -> {v_n.mean():.4f}, largest drop {np.max(v_o - v_n):.4f}')
