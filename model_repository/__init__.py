"""The generic Python-backend model (model.py), shipped as package `cmg_model_repository`
so that `cmg build` works from a plain (non-editable) install."""
