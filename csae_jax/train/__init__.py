"""Training: state (state.py), optimiser (optim.py), the jitted step (step.py), the loop (loop.py)."""
