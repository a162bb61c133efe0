"""Where the model comes from: ComfyUI's own loaders, or the engine's loaders by arch."""

from comfy_api.latest import io

from ..trainer.graph_parts import (HOST_MODEL_WIDGETS, MODEL_OPTIONAL_WIDGETS, MODEL_WIDGETS, host_model_keys,
                                    model_section)
from ..trainer.models import registry
from .types import CATEGORY, EriModel
from .widgets import widget_inputs


class EriComfyModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EriComfyModel", display_name="Training Model (from ComfyUI)", category=CATEGORY,
            description="Train on the MODEL / CLIP / VAE that ComfyUI's loaders already hold: no second copy.",
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip", optional=True, tooltip="encodes the captions; needed unless embeddings are cached"),
                io.Vae.Input("vae", optional=True, tooltip="encodes the dataset images and decodes samples"),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="Wan 2.1 I2V: CLIP vision H (clip_vision_h), which encodes the start images"),
                *widget_inputs(HOST_MODEL_WIDGETS, optional=True),
            ],
            outputs=[EriModel.Output(display_name="training_model")],
        )

    @classmethod
    def execute(cls, model, clip=None, vae=None, clip_vision=None, **values) -> io.NodeOutput:
        return io.NodeOutput({"comfy": (model, clip, vae), "clip_vision": clip_vision,
                              "model_keys": host_model_keys(values)})


class EriModelByArch(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EriModelByArch", display_name="Training Model (by arch, from files)", category=CATEGORY,
            description="The engine's own loaders, exactly as `python -m trainer` loads `model:`.",
            inputs=[
                io.Combo.Input("arch", options=registry.known_arches(), default="flux"),
                *widget_inputs(MODEL_WIDGETS),
                *widget_inputs(MODEL_OPTIONAL_WIDGETS, optional=True),
            ],
            outputs=[EriModel.Output(display_name="training_model")],
        )

    @classmethod
    def execute(cls, arch, **values) -> io.NodeOutput:
        return io.NodeOutput({"model": model_section(arch, values)})
