"""Flex.2 in ComfyUI's own sampling: control and inpaint inputs for KSampler (the math is the family's)."""

from comfy_api.latest import io

from ..trainer.models.flex2 import comfy_flex2_model
from .types import CATEGORY


class EriFlex2Conditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EriFlex2Conditioning", display_name="Flex.2 Control / Inpaint (for KSampler)", category=CATEGORY,
            description="ComfyUI loads a Flex.2 file as Flux, whose extra inputs are Flux Fill's; this MODEL gives it"
                        " Flex.2's own: a control image, an image to inpaint with its mask, as Flex2Pipeline does.",
            inputs=[
                io.Model.Input("model", tooltip="a Flex.2 file from Load Diffusion Model"),
                io.Vae.Input("vae", tooltip="Flux's ae.safetensors"),
                io.Image.Input("control_image", optional=True, tooltip="depth, lines, pose ... at the latent's size"),
                io.Image.Input("inpaint_image", optional=True, tooltip="the image to inpaint, at the latent's size"),
                io.Mask.Input("inpaint_mask", optional=True, tooltip="where the model paints (1) and keeps (0)"),
                io.Float.Input("control_strength", default=1.0, min=0.0, max=10.0, step=0.01),
                io.Float.Input("control_stop", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="the share of the schedule that sees the control (as a ControlNet's end)"),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, vae, control_image=None, inpaint_image=None, inpaint_mask=None, control_strength=1.0,
                control_stop=1.0) -> io.NodeOutput:
        control = None if control_image is None else vae.encode(control_image[:1, ..., :3])
        inpaint = None if inpaint_image is None else vae.encode(inpaint_image[:1, ..., :3])
        mask = None if inpaint_mask is None else inpaint_mask[:1]
        try:
            patched = comfy_flex2_model(model, control, inpaint, mask, control_strength, control_stop)
        except ValueError as e:
            raise ValueError(f"{cls.__name__}: {e}") from None
        return io.NodeOutput(patched)
