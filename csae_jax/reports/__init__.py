"""Pictures and pages of a run (training curves now; the concept-tree report later)."""
