"""jdistill: distill diffusion models into fast few-step generators, in JAX/Flax."""

__version__ = "0.1.0"
