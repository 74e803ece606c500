"""Evaluation: reconstruction statistics (recon.py), synthetic ground-truth recovery (synthetic.py)."""
