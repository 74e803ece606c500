"""Re-render the run report of a finished run, without training.

    python -m experiments.run --config=experiments/configs/report.py --config.workdir_in=WD

writes WD/report/index.html (self-contained: open it from the file system in any browser; the
thumbnails of an image run lie beside it in WD/report/thumbs/). WD is the --workdir of a
pipeline run (staged or joint: it holds export/) or of a comparison (it holds compare.json; every
method's report is re-rendered too). Every pipeline and compare run writes its report at the end
already; this mode is for changing the options below, or for a run made before the report.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, ''):
    raise ValueError(f'unknown config variant {arg!r}; report.py has none')
  c = ml_collections.ConfigDict()
  c.stage = 'report'
  c.workdir_in = ''        # the --workdir of a finished pipeline or compare run (required)
  # Harvested data (data.path a folder of experiments/configs/harvest.py): each feature's and
  # concept's top-activating images, with the activating patches as a heat map.
  c.top_images = 8         # images per feature / concept
  c.max_images = 0         # images scanned for them (one pass of the level-1 SAE); 0 = all
  c.page_size = 100        # concepts built as DOM at a time (the JSON holds all of them)
  c.images = True          # False: no image panels, no pass over the activations
  return c
