"""Graph passes over exported tower ONNX (each ONNX -> ONNX) and the manager that runs them in order."""
