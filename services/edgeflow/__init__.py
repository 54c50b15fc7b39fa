"""edgeflow: Kubernetes-native serving for edge recommendations."""

__version__ = "0.1.0"
