"""Distillation: a small student in the teacher's embedding space, trained on public inputs only."""
