"""The cascade: level-2 data from level-1 decoder rows (rows.py), joint CSAE (joint.py),
and the concept hierarchy read off the level-2 encoder (hierarchy.py)."""
