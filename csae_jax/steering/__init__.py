"""Group-level concept steering: interventions from an exported level-1 SAE applied at a VLM
port's named site through its edits (no hooks), the paper's clamp value, steered greedy
captions, the protocol (arms, judges, appeared / removed %) and a synthetic benchmark.

Modules: interventions (pure, jit-compatible edits), value (the scale u), rows (harvest rows by
image), arms, generate, judge, results, protocol (stage 'steer'), synthetic (stage
'steer_synthetic').
"""
