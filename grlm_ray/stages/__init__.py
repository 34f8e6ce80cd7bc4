"""The pipeline's stages, one module each (their order and what each reads: core/registry.py). Stages import the libraries and the platform, never each other."""
