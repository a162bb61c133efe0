"""The comfyui backend headless: `model.backend: comfyui` loads the job's files with ComfyUI's own loaders (from
a ComfyUI checkout: `model.comfyui_path` or $COMFYUI_PATH) and trains through the same ComfyUI backend the nodes
use, so every family ComfyUI loads also trains from YAML, outside the UI."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import torch

from ..errors import ConfigError, ModelFileError
from .files import local_path

# ComfyUI's model config class -> its CLIPType for separate text-encoder files (the loader node's `type`);
# the MRO is walked, so variants (WAN21_I2V, FluxSchnell ...) take their base's
CLIP_TYPES = {
    "SD15": "stable_diffusion", "SD20": "stable_diffusion", "SDXL": "stable_diffusion", "SD3": "sd3",
    "Flux": "flux", "Chroma": "chroma", "LTXV": "ltxv", "HunyuanVideo": "hunyuan_video",
    "HunyuanVideo15": "hunyuan_video_15", "HunyuanImage21": "hunyuan_image", "Lumina2": "lumina2", "WAN21_T2V": "wan",
    "HiDream": "hidream", "Omnigen2": "omnigen2", "QwenImage": "qwen_image", "Kandinsky5": "kandinsky5",
}


def comfyui_checkout(mc) -> Path:
    """The ComfyUI checkout to load with: model.comfyui_path, else $COMFYUI_PATH; it must hold comfy/sd.py."""
    raw = mc.comfyui_path or os.environ.get("COMFYUI_PATH")
    key = "model.comfyui_path" if mc.comfyui_path else "COMFYUI_PATH"
    if not raw:
        raise ConfigError("model.backend comfyui: set model.comfyui_path (or the COMFYUI_PATH environment variable)"
                          " to a ComfyUI checkout whose loaders read the model files")
    root = Path(raw).expanduser()
    if not (root / "comfy" / "sd.py").is_file() or not (root / "folder_paths.py").is_file():
        raise ConfigError(f"{key}: {str(root)!r} is not a ComfyUI checkout (no comfy/sd.py and folder_paths.py)")
    return root.resolve()


def import_comfy(root: Path, device: torch.device) -> None:
    """Make ComfyUI importable from `root` as its main.py would run it (CPU mode when training on the CPU)."""
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import comfy.cli_args

    if device.type == "cpu":
        comfy.cli_args.args.cpu = True  # read when comfy.model_management is first imported


def clip_type_of(patcher, configured: str | None):
    import comfy.sd

    if configured:
        try:
            return comfy.sd.CLIPType[configured.upper()]
        except KeyError:
            names = ", ".join(t.name.lower() for t in comfy.sd.CLIPType)
            raise ConfigError(f"model.clip_type: {configured!r} is not one of ComfyUI's: {names}") from None
    for cls in type(patcher.model.model_config).__mro__:
        if cls.__name__ in CLIP_TYPES:
            return comfy.sd.CLIPType[CLIP_TYPES[cls.__name__].upper()]
    raise ConfigError(f"model.clip_type: ComfyUI detected {type(patcher.model.model_config).__name__}, whose text"
                      " encoder type this trainer does not know; set model.clip_type (the type of ComfyUI's CLIP loader)")


def load_with_comfyui(mc, device: torch.device, dtype: torch.dtype):
    """(MODEL, CLIP, VAE) from ComfyUI's loaders, as a ComfyModel: a full checkpoint (`models/checkpoints`) with its
    encoders inside, or a diffusion model with `text_encoder_paths` and `vae_path`."""
    root = comfyui_checkout(mc)
    path = local_path(mc.name_or_path, "model.name_or_path")
    te_paths = [str(local_path(p, f"model.text_encoder_paths[{i}]")) for i, p in enumerate(mc.text_encoder_paths)]
    vae_path = str(local_path(mc.vae_path, "model.vae_path")) if mc.vae_path else None
    import_comfy(root, device)
    import comfy.sd
    import comfy.utils

    from .comfy import ComfyModel

    options = {"dtype": dtype} if dtype != torch.float32 else {}
    try:
        if not te_paths and vae_path is None:
            patcher, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True,
                                                                          model_options=options)
        else:
            patcher = comfy.sd.load_diffusion_model(str(path), model_options=options)
            clip = comfy.sd.load_clip(te_paths, clip_type=clip_type_of(patcher, mc.clip_type)) \
                if te_paths else None
            vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(vae_path)) if vae_path else None
    except RuntimeError as e:  # ComfyUI's "could not detect model type"
        raise ModelFileError(f"{path}: ComfyUI cannot load it ({str(e).splitlines()[0]})") from None
    if mc.assistant_lora_path:
        patcher = with_assistant_lora(patcher, str(local_path(mc.assistant_lora_path, "model.assistant_lora_path")))
    return ComfyModel(patcher, clip, vae, arch=mc.arch, clip_vision=load_clip_vision(mc))


def load_clip_vision(mc):
    """model.clip_vision_path through ComfyUI's own CLIP vision loader (what Load CLIP Vision calls), or None."""
    if not mc.clip_vision_path:
        return None
    import comfy.clip_vision

    path = local_path(mc.clip_vision_path, "model.clip_vision_path")
    vision = comfy.clip_vision.load(str(path))
    if vision is None:
        raise ModelFileError(f"model.clip_vision_path: {path}: ComfyUI does not recognise it as a CLIP vision model")
    return vision


class UnloadedKeys(logging.Handler):
    """The keys ComfyUI's LoRA loader logs as not loaded (it reports them only in its log)."""

    def __init__(self) -> None:
        super().__init__()
        self.keys: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if "lora key not loaded" in msg:
            self.keys.append(msg.split(":", 1)[-1].strip())


def with_assistant_lora(patcher, path: str):
    """The MODEL with a training adapter merged by ComfyUI's own LoRA loader (what LoraLoaderModelOnly does, at
    strength 1): the trained network sits on top of it and is saved without it. Keys of the adapter ComfyUI does not
    load are an error: a half-applied adapter would train a LoRA for another model."""
    import comfy.sd
    import comfy.utils

    sd = comfy.utils.load_torch_file(path, safe_load=True)
    watch = UnloadedKeys()
    root = logging.getLogger()
    root.addHandler(watch)
    try:
        with torch.inference_mode():
            patched, _ = comfy.sd.load_lora_for_models(patcher, None, sd, 1.0, 0)
    finally:
        root.removeHandler(watch)
    if watch.keys or not patched.patches:
        what = f"{len(watch.keys)} keys it cannot place (first: {watch.keys[0]})" if watch.keys else "no key it can place"
        raise ModelFileError(f"model.assistant_lora_path: {path}: ComfyUI finds {what} on this model; is it the adapter"
                             " for this model?")
    return patched
