"""The run configurations (YAML), shipped as package data `cmg_configs`."""
