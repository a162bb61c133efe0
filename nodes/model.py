"""Where the model comes from: ComfyUI's own loaders, or the engine's loaders by arch."""

from comfy_api.latest import io

from ..trainer.models import registry
from .types import CATEGORY, EriModel


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
            ],
            outputs=[EriModel.Output(display_name="training_model")],
        )

    @classmethod
    def execute(cls, model, clip=None, vae=None) -> io.NodeOutput:
        return io.NodeOutput({"comfy": (model, clip, vae)})


class EriModelByArch(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        arches = [a for a in registry.known_arches() if a != "comfy"]
        return io.Schema(
            node_id="EriModelByArch", display_name="Training Model (by arch, from files)", category=CATEGORY,
            description="The engine's own loaders, exactly as `python -m trainer` loads `model:`.",
            inputs=[
                io.Combo.Input("arch", options=arches, default="flux"),
                io.String.Input("name_or_path", default="", tooltip="diffusion model .safetensors or a diffusers folder"),
                io.String.Input("text_encoder_paths", default="", multiline=True, tooltip="one path per line"),
                io.String.Input("vae_path", default=""),
                io.String.Input("tokenizer_paths", default="", multiline=True, optional=True),
                io.Int.Input("t5_max_length", default=0, min=0, max=4096, optional=True,
                             tooltip="0: the family's default (Flux dev 512, schnell 256)"),
                io.Boolean.Input("quantize", default=False, optional=True,
                                 tooltip="store the block weights in fp8 (half of bf16): Flux in 24 GB"),
            ],
            outputs=[EriModel.Output(display_name="training_model")],
        )

    @classmethod
    def execute(cls, arch, name_or_path, text_encoder_paths, vae_path, tokenizer_paths="", t5_max_length=0,
                quantize=False) -> io.NodeOutput:
        model = {"arch": arch, "name_or_path": name_or_path.strip()}
        tes = [p.strip() for p in text_encoder_paths.splitlines() if p.strip()]
        toks = [p.strip() for p in (tokenizer_paths or "").splitlines() if p.strip()]
        if tes:
            model["text_encoder_paths"] = tes
        if vae_path.strip():
            model["vae_path"] = vae_path.strip()
        if toks:
            model["tokenizer_paths"] = toks
        if t5_max_length:
            model["t5_max_length"] = t5_max_length
        if quantize:
            model["quantize"] = True
        return io.NodeOutput({"model": model})
