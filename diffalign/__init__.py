"""diffalign: preference alignment for text-to-image diffusion models.

Every objective is a function of per-sample denoising errors; see docs/architecture.md.
"""

__version__ = "0.1.0.dev0"
