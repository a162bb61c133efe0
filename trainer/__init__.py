"""EriDiffusion training engine: importable without ComfyUI."""

__version__ = "0.1.0"
