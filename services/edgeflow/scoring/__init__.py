"""The scoring service: ONNX Runtime sessions over a registry of versioned models."""
