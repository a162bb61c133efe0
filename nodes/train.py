"""Train N steps, sample, save and apply: each a call into trainer.session."""

from __future__ import annotations

import os

import torch
from comfy_api.latest import io, ui

from ..trainer.session import TrainingSession, job_from_parts
from .types import CATEGORY, EriDatasets, EriModel, EriNetworkT, EriSettings, EriState


def _default_folder() -> str:
    import folder_paths

    return os.path.join(folder_paths.get_output_directory(), "eridiffusion")


def _comfy_model(model_part: dict):
    if "comfy" not in model_part:
        return None
    from ..trainer.models.comfy import ComfyModel

    model, clip, vae = model_part["comfy"]
    return ComfyModel(model, clip, vae, clip_vision=model_part.get("clip_vision"))


def _send(unique_id, step: int, total: int, loss: float) -> None:
    try:
        from server import PromptServer

        PromptServer.instance.send_sync("eridiffusion.loss", {"node": unique_id, "step": step, "total": total,
                                                              "loss": loss})
    except Exception:  # no server (tests, headless): nothing to show
        pass


class EriTrain(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EriTrain", display_name="Train LoRA (N steps)", category=CATEGORY,
            description="Trains N steps. Connect `state` from another Train node to continue that run.",
            is_output_node=True,  # training writes saves: a graph ending here still runs
            inputs=[
                EriModel.Input("training_model"),
                EriDatasets.Input("datasets"),
                EriNetworkT.Input("network"),
                EriSettings.Input("settings"),
                io.Int.Input("steps", default=500, min=1, max=1000000),
                EriState.Input("state", optional=True, tooltip="continue this run instead of starting one"),
            ],
            outputs=[EriState.Output(display_name="state"), io.String.Output(display_name="summary")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, training_model, datasets, network, settings, steps, state=None) -> io.NodeOutput:
        import comfy.model_management as mm
        import comfy.utils

        uid = cls.hidden.unique_id
        notes = []
        with torch.inference_mode(False), torch.enable_grad():
            if state is None:
                job = job_from_parts(training_model, datasets, network, settings, steps, _default_folder())
                state = TrainingSession(job, model=_comfy_model(training_model))
                if state.resumed_from:
                    notes.append(f"continued the earlier run in {state.trainer.run.root} from step"
                                 f" {state.resumed_from} (a new name in Training Settings starts a new run)")
            start = state.step
            pbar = comfy.utils.ProgressBar(steps, node_id=uid)

            def on_step(step: int, loss: float) -> None:
                pbar.update_absolute(step - start, steps)
                _send(uid, step, start + steps, loss)
                mm.throw_exception_if_processing_interrupted()  # Cancel: the loop saves, then stops

            state.advance(steps, on_step)
        last = state.losses[-1][1] if state.losses else float("nan")
        summary = "\n".join(notes + [f"step {state.step}, loss {last:.4f}, saves in {state.trainer.run.root}"])
        return io.NodeOutput(state, summary, ui=ui.PreviewText(summary))


class EriSample(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EriSample", display_name="Sample (training LoRA)", category=CATEGORY,
            inputs=[
                EriState.Input("state"),
                io.String.Input("prompt", default="", multiline=True),
                io.String.Input("negative", default="", multiline=True),
                io.Int.Input("width", default=1024, min=64, max=4096, step=16),
                io.Int.Input("height", default=1024, min=64, max=4096, step=16),
                io.Int.Input("steps", default=20, min=1, max=200),
                io.Float.Input("guidance", default=4.0, min=0.0, max=30.0, step=0.1),
                io.Int.Input("seed", default=42, min=0, max=2**31 - 1),
                io.Int.Input("frames", default=1, min=1, max=1025, optional=True,
                             tooltip="video models: frames of the clip (snapped to the model's rule, e.g. 4k+1)"),
                io.Image.Input("control_image", optional=True,
                               tooltip="the image the model is conditioned on: Flex.2's control, Wan I2V's start image"),
                io.Image.Input("reference_image", optional=True,
                               tooltip="VACE: a reference image the clip keeps (WanVaceToVideo's reference_image)"),
            ],
            outputs=[io.Image.Output(display_name="image", tooltip="the image, or a clip's frames as a batch")],
        )

    @classmethod
    def execute(cls, state, prompt, negative, width, height, steps, guidance, seed, frames=1,
                control_image=None, reference_image=None) -> io.NodeOutput:
        control = None if control_image is None else control_image[0, ..., :3].permute(2, 0, 1) * 2 - 1
        reference = None if reference_image is None else reference_image[0, ..., :3].permute(2, 0, 1) * 2 - 1
        img = state.sample(prompt, width, height, steps, guidance, seed, negative, frames=frames, control=control,
                           reference=reference)
        if img.dim() == 3:  # (3, h, w) -> one image
            img = img[:, None]
        image = ((img + 1) / 2).clamp(0, 1).permute(1, 2, 3, 0).contiguous()  # (frames, h, w, 3) in [0, 1]
        return io.NodeOutput(image, ui=ui.PreviewImage(image, cls=cls))


class EriSaveLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EriSaveLoRA", display_name="Save LoRA (to models/loras)", category=CATEGORY,
            is_output_node=True,
            inputs=[
                EriState.Input("state"),
                io.String.Input("filename", default="my_lora"),
                io.String.Input("subfolder", default="eridiffusion"),
                io.Combo.Input("dtype", options=["float16", "bf16", "float32"], default="float16"),
            ],
            outputs=[io.String.Output(display_name="path")],
        )

    @classmethod
    def execute(cls, state, filename, subfolder, dtype) -> io.NodeOutput:
        import folder_paths

        from ..trainer.fileio import save_safetensors_atomic
        from ..trainer.paths import contained_file

        root = folder_paths.get_folder_paths("loras")[0]
        path = contained_file(root, subfolder, filename, (".safetensors",), "Save LoRA")
        tensors, metadata = state.export(dtype)
        save_safetensors_atomic(tensors, path, metadata)
        return io.NodeOutput(path, ui=ui.PreviewText(f"saved {path}"))


class EriApplyLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EriApplyLoRA", display_name="Apply training LoRA to MODEL", category=CATEGORY,
            description="ComfyUI's own LoRA loader applies what was trained, for KSampler and friends.",
            inputs=[EriState.Input("state"), io.Model.Input("model"),
                    io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01)],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, state, model, strength) -> io.NodeOutput:
        import comfy.sd

        tensors, _ = state.export("float32")
        patched, _ = comfy.sd.load_lora_for_models(model, None, tensors, strength, 0)
        return io.NodeOutput(patched)
