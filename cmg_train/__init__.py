"""PyTorch side of CMG: teacher, CMER, CMLE, memory banks, training, evaluation, ONNX export."""
