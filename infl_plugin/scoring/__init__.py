"""Scores from factors: preconditioned queries, the contraction kernel, `Attributor`, streaming, analysis."""
