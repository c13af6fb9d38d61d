"""Converters between our adapters and other libraries' adapter formats.

`hf_peft` reads Hugging Face PEFT LoRA folders onto our models' parameter paths; `diffusers` writes
a U-Net LoRA in the naming diffusers' `load_lora_weights` reads. They map names through the base
checkpoints' key maps (`medpeft_jax.models.weights`) and the model specs (`medpeft_jax.models.zoo`),
never through model classes; `medpeft_jax.peft` does not import this package, so importing the PEFT
core stays free of model code.
"""
