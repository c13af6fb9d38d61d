"""Training: the jitted PEFT train step (step.py); the full trainer builds on it."""
