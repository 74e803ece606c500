"""The one dispatcher: `run(config, workdir)` sends `config.mode` to its entry point.

    staged, joint -> csae_jax.pipeline   (the CSAE pipeline)
    compare       -> csae_jax.compare    (CSAE against its baselines)
    sweep         -> csae_jax.sweep      (a vmapped grid of level-1 SAEs)
    stage=report  -> csae_jax.reports.html (re-renders a finished run's report; no training)

Nothing below imports this module, so there is no import circle: the modes build on
`stages`, `cascade/` and `pipeline`, never on each other's dispatch.
"""

from __future__ import annotations

import os
import time

from csae_jax import compare, pipeline, stages, sweep
from csae_jax.reports import html as report_html


def run(cd_or_cfg, workdir: str, *, hooks=()) -> dict:
  """Runs `config.mode` in `workdir`; returns its metrics (the CLI prints their summary).
  A report config (stage='report') re-renders the report of its workdir_in instead."""
  t_start = time.perf_counter()
  if _stage(cd_or_cfg) == 'report':
    return report_html.run(cd_or_cfg)
  workdir = os.path.abspath(workdir)
  cfg, source, mesh = stages.setup(cd_or_cfg, workdir)
  if cfg.mode == 'compare':
    return compare.run(cfg, source, mesh, workdir)
  if cfg.mode == 'sweep':
    out = sweep.run(cfg, source, mesh, workdir, hooks=hooks)
  else:
    out = pipeline.fit(cfg, source, mesh, workdir, hooks=hooks).metrics
  out['wall_s'] = round(time.perf_counter() - t_start, 2)
  return out


def _stage(cd_or_cfg) -> str:
  if hasattr(cd_or_cfg, 'stage'):  # ReportConfig / ConfigDict with a stage field
    return getattr(cd_or_cfg, 'stage')
  return cd_or_cfg.get('stage', '') if isinstance(cd_or_cfg, dict) else ''
