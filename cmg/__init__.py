"""CMG-Triton core: tensor contract, configs, frames and data. Imports no torch."""

__version__ = "0.1.0"
