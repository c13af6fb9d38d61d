"""Torch-free checkpoint readers and the key maps from each source layout to our parameter paths."""

from medpeft_jax.models.weights.readers import Checkpoint, read_checkpoint, read_safetensors
from medpeft_jax.models.weights.torch_pickle import UnsafeCheckpointError, load_torch_checkpoint

__all__ = ["Checkpoint", "UnsafeCheckpointError", "load_torch_checkpoint", "read_checkpoint",
           "read_safetensors"]
