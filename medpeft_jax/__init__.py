"""medpeft-jax: parameter-efficient fine-tuning of vision foundation models on medical images."""

__version__ = "0.1.0"
