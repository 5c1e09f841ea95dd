"""CMLE, cross-modal linear embedding: the caption graph W (fit.py) shapes the global
embedding z that the exported head (model.py) produces."""
