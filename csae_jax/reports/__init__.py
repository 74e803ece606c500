"""Pictures and pages of a run: plots.py (training curves, density, sweep Pareto), html.py (the
self-contained run report, WD/report/index.html, and the report mode), patches.py (top images
and patch heat maps from a harvest)."""
