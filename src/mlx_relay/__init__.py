"""mlx-relay: distributed LLM inference on MLX with a monitoring system."""

__version__ = "0.1.0"
