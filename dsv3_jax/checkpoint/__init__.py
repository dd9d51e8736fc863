"""Checkpoint I/O: safetensors reading/writing and weight conversion."""
