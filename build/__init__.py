"""`cmg_build`: exported ONNX graphs -> Triton model repository (cpu, onnxruntime, tensorrt targets)."""
