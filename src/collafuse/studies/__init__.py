"""Studies: many runs of one question, and their reports (the cut-point study, the privacy study)."""
