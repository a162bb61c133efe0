"""EriDiffusion for ComfyUI: LoRA training nodes over the headless engine in `trainer/`."""

WEB_DIRECTORY = "./web/js"


async def comfy_entrypoint():
    from .nodes import EriDiffusionExtension

    return EriDiffusionExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
