"""CMG-Triton core: tensor contract, configs, frames and data. Imports no torch."""

import os

__version__ = "0.1.0"

# ONNX Runtime (1.32) writes a device id under ~/.cache and, where HOME cannot be written, says
# so in a coloured warning before our one-line errors; nothing of ours wants its telemetry. Set
# before anything imports it (the servers' Python stubs inherit it); a user's own value stays.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
