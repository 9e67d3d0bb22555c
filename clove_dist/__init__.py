"""clove-dist: distributed CLoVe training (compositional fine-tuning of CLIP with hard negatives, then patching)."""
__version__ = "0.1.0"
