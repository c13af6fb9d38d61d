"""Training: one loop (loop.py) driven by classification (trainer.py) and text-to-image (t2i.py).

The jitted step (step.py), the runtime LR schedule (optim.py), compiled-program reuse (programs.py),
placement rules (sharding.py), finite-only checkpoints (checkpoints.py), runs trained together (runs.py)
and the linear probe on cached features (linear_probe.py) are its parts.
"""
