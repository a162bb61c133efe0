"""Trainable networks (LoRA and friends), injected into any backend's layers and saved in ComfyUI's keys."""
