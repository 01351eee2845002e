"""Model architectures, checkpoint loading and the default models."""
