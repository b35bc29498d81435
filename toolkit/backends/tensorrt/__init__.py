"""TensorRT backend: strongly typed network from ONNX, builder config, engine loader and runner (tensorrt imported lazily)."""
