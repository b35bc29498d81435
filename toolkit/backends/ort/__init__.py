"""ONNX Runtime backend (CPU and CUDA): session loader and runner."""
