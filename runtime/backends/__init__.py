"""``nezha.runtime.backends``: one module per inference library (ONNX Runtime, TensorRT), each imported
only when an artifact is loaded with it; ``base`` holds the runner contract they share."""
