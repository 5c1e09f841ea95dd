"""CMER, cross-modal entropy reduction: which pixels does the caption care about?

model.py: the keep rule, the fill, the one-pass scorer and the exact-mode graph (exported);
fit.py: the teacher's occlusion relevance and the scorer's distillation; report.py: metrics.
"""
