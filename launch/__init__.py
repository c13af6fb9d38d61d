"""Command-line entry points (`python -m launch.<name>`), started with XLA's CPU compile flags
(medpeft_jax/cpu_flags.py) set before JAX starts its backend."""

from medpeft_jax.cpu_flags import use_cpu_compile_flags

use_cpu_compile_flags()
