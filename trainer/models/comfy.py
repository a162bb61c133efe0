"""The ComfyUI backend: train on the MODEL / CLIP / VAE that ComfyUI already loaded.

Any family ComfyUI can load trains through this one path: the network is hooked into ComfyUI's own
modules (whose names are the keys ComfyUI loads LoRAs by), noise, sigmas and the target come from the
model's own `model_sampling`, and conditioning from ComfyUI's CLIP encode. Imported only inside
ComfyUI (it imports `comfy`).
"""

from __future__ import annotations

import inspect
import logging
import math
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..config import TEXT_IMAGE_NODE_NAMES
from ..errors import ConfigError
from .base import Conditioning, Target, TargetMember, TrainingModel, ragged_batch, sample_of
from .fingerprint import module_fingerprint
from .objectives import EpsObjective, FlowObjective
from .schedules import linear_mu

log = logging.getLogger("trainer")

# Layers left out of the default targets, by ComfyUI's diffusion-model class (its MRO is walked), as the peers train
# these families: HiDream's routed MoE experts (the router is a bare weight, never a target)
EXCLUDED = {"HiDreamImageTransformer2DModel": (".experts.",)}


def is_linear(module: nn.Module) -> bool:
    """A linear layer of ComfyUI's: torch's Linear (ComfyUI's ops derive from it), or the Linear of ComfyUI's
    mixed-precision ops (a scaled-fp8 checkpoint's layers: a bare Module holding a QuantizedTensor weight, which
    isinstance(nn.Linear) misses, so its blocks would have no targets)."""
    return isinstance(module, nn.Linear) or (hasattr(module, "weight_function") and hasattr(module, "in_features")
                                             and hasattr(module, "out_features"))


def _linear_count(module: nn.Module) -> int:
    return sum(is_linear(m) or isinstance(m, nn.Conv2d) for m in module.modules())


def block_stacks(diffusion_model: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """The model's stacks of repeated blocks, by name, in definition order: every top-level ModuleList of blocks,
    whatever it is called (double_blocks, blocks, joint_blocks, layers, noise_refiner, context_refiner ...), and a
    UNet's middle_block. A UNet's input and output blocks are stacks although some of their blocks hold no linear
    layer (the first input block is the input conv, downsamplers are convs). A list of single projections (HiDream's
    caption_projection) is not a stack of blocks, and stacks nested inside other modules (HunyuanVideo's token
    refiner in txt_in) are not the model's."""
    out = []
    for name, child in diffusion_model.named_children():
        if isinstance(child, nn.ModuleList) and len(child) and any(_linear_count(b) >= 2 for b in child):
            out.append((name, list(child)))
        elif name == "middle_block":
            out.append((name, [child]))
    return out


def excluded_patterns(diffusion_model: nn.Module) -> tuple[str, ...]:
    for cls in type(diffusion_model).__mro__:
        if cls.__name__ in EXCLUDED:
            return EXCLUDED[cls.__name__]
    return ()


def default_targets(diffusion_model: nn.Module) -> list[Target]:
    """Every Linear (and Conv2d, as a conv target) inside the model's stacks of blocks, named by ComfyUI's keys,
    less the family's exclusions."""
    out = []
    skip = excluded_patterns(diffusion_model)
    for stack, blocks in block_stacks(diffusion_model):
        prefix = stack if stack == "middle_block" else None
        for i, block in enumerate(blocks):
            base = prefix or f"{stack}.{i}"
            for name, mod in block.named_modules():
                key = f"{base}.{name}" if name else base
                if any(p in f".{key}." for p in skip):
                    continue
                if is_linear(mod):
                    out.append(Target(f"diffusion_model.{key}", mod.in_features, mod.out_features,
                                      [TargetMember(mod, slice(0, mod.out_features))]))
                elif isinstance(mod, nn.Conv2d) and mod.groups == 1:
                    out.append(Target(f"diffusion_model.{key}", mod.in_channels, mod.out_channels,
                                      [TargetMember(mod, slice(0, mod.out_channels))], kind="conv"))
    return out


# ComfyUI model configs (their class names) whose inputs beside the noisy latent this path does not build yet: training
# them here would train on the zeros ComfyUI fills in. What each needs, for the message.
# (Wan 2.1 I2V and VACE are built: CONDITIONING_NODES)
NEEDS_CONDITIONING = {
    "WAN21_FunControl2V": "a control video (Wan Fun Control)",
    "WAN21_Camera": "camera conditions", "WAN22_Camera": "camera conditions",
    "WAN21_HuMo": "audio and reference images (HuMo)", "WAN22_S2V": "audio (Wan 2.2 S2V)",
    "WAN22_Animate": "pose and face videos (Wan 2.2 Animate)",
    "FluxInpaint": "an inpaint image and mask (Flux Fill)",
    "HunyuanVideoI2V": "a start image (HunyuanVideo I2V)", "HunyuanVideoSkyreelsI2V": "a start image (SkyReels I2V)",
}


def missing_conditioning(model_config) -> str | None:
    """What a ComfyUI model needs beside its latent that this path does not build (None: nothing): the known
    image-to-video / control / inpaint configs, and UNets with more input channels than latent ones (inpainting)."""
    name = type(model_config).__name__
    if name in NEEDS_CONDITIONING:
        return NEEDS_CONDITIONING[name]
    if conditioning_node(model_config) is not None:
        return None
    cfg = getattr(model_config, "unet_config", {}) or {}
    channels = model_config.latent_format.latent_channels
    if cfg.get("in_dim", channels) > cfg.get("out_dim", channels):  # a Wan taking more than its latent
        return f"{cfg['in_dim'] - cfg.get('out_dim', channels)} input channels beside its latent"
    if "context_dim" in cfg and cfg.get("in_channels", channels) > channels:  # an LDM UNet (SD, SDXL) for inpainting
        return f"an inpaint image and mask ({cfg['in_channels']} input channels for a {channels}-channel latent)"
    return None


@dataclass(frozen=True)
class ConditioningNode:
    """One of ComfyUI's conditioning nodes that builds a model's inputs beside the noisy latent into the prompt's
    conditioning, as a graph wires it between the text encode and the sampler: (module, class), the function that
    gives it an item's inputs, and what a job must give it (the refusal's message)."""

    module: str
    name: str
    inputs: Callable[..., dict]
    needs: str
    takes_masks: bool = False
    takes_references: bool = False


def _image(pixels: torch.Tensor) -> torch.Tensor:
    """Pixels (3, h, w) or (3, f, h, w) in [-1, 1] as ComfyUI's IMAGE, (f, h, w, 3) in [0, 1]."""
    frames = pixels[:, None] if pixels.dim() == 3 else pixels
    return ((frames.float() + 1) / 2).clamp(0, 1).permute(1, 2, 3, 0).contiguous()


def i2v_inputs(model, control: torch.Tensor | None, mask, reference, frames: int) -> dict:
    """WanImageToVideo's inputs: the start image (a control video's first frame), and, for the models that read CLIP
    vision features, its output of ComfyUI's CLIPVisionEncode (crop "center", the node's first choice)."""
    if control is None:
        return {}
    start = _image(control if control.dim() == 3 else control[:, 0])
    out = {"start_image": start}
    if model.clip_vision is not None:
        import nodes

        out["clip_vision_output"] = nodes.CLIPVisionEncode().encode(model.clip_vision, start, "center")[0]
    return out


def vace_inputs(model, control: torch.Tensor | None, mask: torch.Tensor | None, reference: torch.Tensor | None,
                frames: int) -> dict:
    """WanVaceToVideo's inputs: the control video (an image: its first frame, which the node pads with gray), the
    control masks (1 where the model generates; a mask image holds for every frame; without one, a first-frame image
    is kept, VACE's image-to-video), the reference image; strength 1."""
    out: dict = {"strength": 1.0}
    if control is not None:
        out["control_video"] = _image(control)
    h, w = next(t for t in (control, mask, reference) if t is not None).shape[-2:]
    if mask is not None:
        out["control_masks"] = (mask if mask.dim() == 4 else mask[:, None].expand(-1, frames, -1, -1))[0].float()
    elif control is not None and control.dim() == 3 and frames > 1:
        keep = torch.ones(frames, h, w)
        keep[0] = 0.0
        out["control_masks"] = keep
    if reference is not None:
        out["reference_image"] = _image(reference)
    return out


WAN_I2V_NEEDS = ("a start image (ComfyUI's WanImageToVideo): set datasets[].do_i2v: true (the clip's first frame) or"
                 " datasets[].control_path (start images with the clips' names)")
WAN_VACE_NEEDS = ("control data (ComfyUI's WanVaceToVideo): set datasets[].control_path (control videos or images with"
                  " the clips' names; masks in mask_path) and / or datasets[].reference_path (reference images)")
WAN_IMAGE_TO_VIDEO = ConditioningNode("comfy_extras.nodes_wan", "WanImageToVideo", i2v_inputs, WAN_I2V_NEEDS)
WAN_VACE = ConditioningNode("comfy_extras.nodes_wan", "WanVaceToVideo", vace_inputs, WAN_VACE_NEEDS, True, True)
# ComfyUI model configs (their class names) whose inputs beside the noisy latent a conditioning node of ComfyUI's builds
CONDITIONING_NODES = {"WAN21_I2V": WAN_IMAGE_TO_VIDEO, "WAN21_Vace": WAN_VACE}
# WAN21.concat_cond's image-to-video channels: a 4-channel mask and the start image's latent
WAN_I2V_CHANNELS = 4


def conditioning_node(model_config) -> ConditioningNode | None:
    """The conditioning node that builds this model's extra inputs, or None: Wan 2.1 I2V and VACE, and the
    image-to-video Wan files ComfyUI detects as WAN21_T2V (Wan 2.2 I2V A14B: no CLIP-vision projection, so no
    "i2v" model_type) by their patch embedding's mask and image channels beside the latent's."""
    name = type(model_config).__name__
    if name in CONDITIONING_NODES:
        return CONDITIONING_NODES[name]
    cfg = getattr(model_config, "unet_config", {}) or {}
    channels = cfg.get("out_dim", model_config.latent_format.latent_channels)
    if name == "WAN21_T2V" and cfg.get("in_dim", channels) == 2 * channels + WAN_I2V_CHANNELS:
        return WAN_IMAGE_TO_VIDEO
    return None


def reads_clip_vision(model_config) -> bool:
    """Whether the model reads CLIP vision features (`clip_fea`): ComfyUI's WanModel builds its image projection
    (img_emb) exactly for model_type i2v."""
    return (getattr(model_config, "unet_config", {}) or {}).get("model_type") == "i2v"


# cached conditions an item's conditioning node wrote (node_entries), beside the caption's
NODE_PREFIX = "node."
# the clean latent frames a conditioning puts before the clip's (VACE's reference image)
LEADING_FRAMES = "leading_frames"


def node_entries(written: dict) -> dict[str, torch.Tensor]:
    """What a ComfyUI conditioning node wrote into a prompt's conditioning, as tensors to cache for one item
    (ComfyUI's batch of one dropped): tensors as they are; lists (VACE's, one entry per node applied) by index,
    `name.0`; numbers as 0-dim tensors; a CLIP vision output by the one entry ComfyUI's models read of it,
    `name.penultimate_hidden_states`."""
    out: dict[str, torch.Tensor] = {}

    def put(key: str, value) -> None:
        if isinstance(value, torch.Tensor):
            out[key] = (value[0].float() if value.is_floating_point() else value[0]).cpu().clone()
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                put(f"{key}.{i}", v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = torch.tensor(float(value))
        elif hasattr(value, "penultimate_hidden_states"):
            put(f"{key}.penultimate_hidden_states", value["penultimate_hidden_states"])
        else:
            raise TypeError(f"{key}: a conditioning entry of type {type(value).__name__} cannot be cached")

    for name, value in written.items():
        put(NODE_PREFIX + name, value)
    return out


def node_kwargs(cond: dict[str, torch.Tensor], device) -> dict:
    """The inverse of node_entries for one sample: the node's conditioning entries as ComfyUI's extra_conds take them
    (a batch of one again; lists in index order; a CLIP vision output as ComfyUI's clip_vision.Output)."""
    out: dict = {}
    for key in sorted(k for k in cond if k.startswith(NODE_PREFIX)):
        t = cond[key]
        value = t.item() if t.dim() == 0 else t[None].to(device)
        name, _, part = key[len(NODE_PREFIX):].partition(".")
        if not part:
            out[name] = value
        elif part.isdigit():
            out.setdefault(name, {})[int(part)] = value
        else:
            import comfy.clip_vision

            out.setdefault(name, comfy.clip_vision.Output())[part] = value
    return {k: [v[i] for i in sorted(v)] if isinstance(v, dict) else v for k, v in out.items()}


# ComfyUI model classes (comfy.model_base) whose extra_conds take `reference_latents` as reference images beside the
# prompt (ComfyUI's ReferenceLatent node): the dataset's control images are fed to them that way. Flux.1's Flux reads
# the key too (Kontext), but a plain Flux.1 was not trained on references, so it is left out.
REFERENCE_LATENT_MODELS = ("Omnigen2", "Flux2", "QwenImage")


def takes_reference_latents(base) -> bool:
    """Whether a ComfyUI model (comfy.model_base.BaseModel) takes reference images as `reference_latents`."""
    return any(cls.__name__ in REFERENCE_LATENT_MODELS for cls in type(base).__mro__)


# ComfyUI model classes (comfy.model_base) that take a start image (image-to-video) as ComfyUI's latent node for them
# gives it: the clip's latent with the start image's frames in it and a noise_mask, 0 on those frames, which the
# model reads as `denoise_mask` (clean frames at timestep 0: WAN22.process_timestep). (module, node class)
START_IMAGE_LATENT_NODES = {"WAN22": ("comfy_extras.nodes_wan", "Wan22ImageToVideoLatent")}


def start_image_node_name(base) -> tuple[str, str] | None:
    """ComfyUI's latent node (module, class) that builds the start-image input of this model class, or None."""
    for cls in type(base).__mro__:
        if cls.__name__ in START_IMAGE_LATENT_NODES:
            return START_IMAGE_LATENT_NODES[cls.__name__]
    return None


def start_conditions(samples: torch.Tensor, noise_mask: torch.Tensor, process_in, one_frame: bool) -> dict:
    """One item's start-image conditions from the LATENT a start-image node returned (`samples` (1, c, f, h, w) in
    the VAE's raw units, `noise_mask` (1, 1, f, h, w), 1 where the model generates): `start_latent` (c, f, h, w), the
    normalized latent (the start frames; 0 elsewhere), and `start_given` (1, f, h, w), 1 on the frames it gives.
    A one-frame item is all start image, nothing left to generate: it is marked not given (trained as without)."""
    given = (1.0 - noise_mask.float())[0]
    if one_frame:
        given = torch.zeros_like(given)
    return {"start_latent": process_in(samples.float())[0].detach().cpu().clone(), "start_given": given.cpu().clone()}


# ComfyUI model configs (exact classes) whose sampling shifts by the latent's token count (every latent cell a token):
# (base tokens, base mu, max tokens, max mu) of the node their ComfyUI workflows sample with. LTX-Video: LTXVScheduler
# and ModelSamplingLTXV's defaults (0.95 at 1024 tokens to 2.05 at 4096), not its config's fixed 2.37
TOKEN_COUNT_SHIFT = {"LTXV": (1024, 0.95, 4096, 2.05)}


def token_count_mu(model_config, latent_shape: tuple[int, ...]) -> float | None:
    """mu of a TOKEN_COUNT_SHIFT family for a latent (b, c, f, h, w) or (b, c, h, w); None for the others."""
    rule = TOKEN_COUNT_SHIFT.get(type(model_config).__name__)
    if rule is None:
        return None
    base_tokens, base_mu, max_tokens, max_mu = rule
    return linear_mu(math.prod(latent_shape[2:]), base_tokens, max_tokens, base_mu, max_mu)


# ComfyUI model classes (comfy.model_base) whose edit models read the reference image in the text encoder too, with
# the ComfyUI nodes (module, classes; the first the default) that encode a caption with its images, called as the graph
# calls them: the caption and image go in, its CONDITIONING comes out. Qwen-Image-Edit: TextEncodeQwenImageEditPlus
# (2509 / 2511; the image read at 384x384 area by the VL encoder), or model.text_image_node's TextEncodeQwenImageEdit
# (the first release: no "Picture N:" labels, the image at 1024x1024 area); vae left out: the reference latent is the
# dataset's control, at its size
TEXT_IMAGE_NODES = {"QwenImage": ("comfy_extras.nodes_qwen", TEXT_IMAGE_NODE_NAMES)}


def text_image_node(base, name: str | None = None):
    """The ComfyUI node class that encodes a caption with its reference image for a ComfyUI model (`name`: one of
    the family's nodes, else its default), or None where the model's text encoder reads no images."""
    import importlib

    for cls in type(base).__mro__:
        if cls.__name__ in TEXT_IMAGE_NODES:
            module, names = TEXT_IMAGE_NODES[cls.__name__]
            chosen = name or names[0]
            if chosen in names:
                return getattr(importlib.import_module(module), chosen)
            break
    if name is None:
        return None
    raise ConfigError(f"config.process[0].model.text_image_node: {name} does not encode captions for ComfyUI's"
                      f" {type(base).__name__} MODEL")


def comfy_image(pixels: torch.Tensor) -> torch.Tensor:
    """An image (3, h, w) in [-1, 1] as ComfyUI's IMAGE: (1, h, w, 3) in [0, 1]."""
    return ((pixels.float() + 1) / 2).clamp(0, 1).permute(1, 2, 0)[None]


# ComfyUI model configs whose training shift is Flux.1's resolution formula (exact classes: Flux2 derives from Flux)
FLUX_RESOLUTION_SHIFT = {"Flux", "FluxSchnell", "FluxInpaint", "Chroma"}

def flow_shift_mu(model_config, sampling, latent_shape: tuple[int, ...]) -> float | None:
    """The training shift (as mu) of a model on ComfyUI's Flux schedule: Flux.1's resolution formula for Flux.1 and
    Chroma, whose 2x2-patch token counts and constants it was fitted to; the scheduler node's resolution-dependent mu
    for the models ComfyUI samples through one (Flux.2: SCHEDULER_SHIFT); the shift its ComfyUI config samples with
    for the others on that schedule (LTX-Video); None for the rest (SD3, Wan ...: `flux_shift` is then the fixed
    shift 3)."""
    import comfy.model_sampling as ms

    if not isinstance(sampling, ms.ModelSamplingFlux):
        return None
    if takes_scheduler_shift(model_config):
        return scheduler_mu(latent_tokens(model_config, latent_shape), SCHEDULER_SHIFT_STEPS)
    if type(model_config).__name__ in TOKEN_COUNT_SHIFT:
        return token_count_mu(model_config, latent_shape)
    if type(model_config).__name__ not in FLUX_RESOLUTION_SHIFT:
        return float(sampling.shift)
    h, w = latent_shape[-2:]
    return linear_mu((h // 2) * (w // 2))


def sampling_shift(sampling) -> float | None:
    """The fixed shift of ComfyUI's discrete flow schedule (ModelSamplingDiscreteFlow, by class name through the
    MRO: its config's sampling_settings shift, SD3's 3.0, AuraFlow's 1.73 ...), which `timestep_type: shift` (and
    `flux_shift` where there is no resolution shift) trains with; None on its other schedules."""
    if any(cls.__name__ == "ModelSamplingDiscreteFlow" for cls in type(sampling).__mro__):
        return float(sampling.shift)
    return None


# ComfyUI model configs (their MRO is walked) that ComfyUI samples through a scheduler node of their own, whose shift
# follows the resolution (and the step count), instead of their config's fixed shift: Flux.2 through Flux2Scheduler
# (comfy_extras/nodes_flux.py, BFL's empirical mu over the image tokens), as its workflows sample it
SCHEDULER_SHIFT = ("Flux2",)
# training has no step count: the scheduler's mu at 50 steps (BFL's for Flux.2 dev), at which it gives the config's
# own fixed shift at 1024x1024 (2.02 there: 2.023)
SCHEDULER_SHIFT_STEPS = 50


def takes_scheduler_shift(model_config) -> bool:
    return any(cls.__name__ in SCHEDULER_SHIFT for cls in type(model_config).__mro__)


def latent_tokens(model_config, latent_shape: tuple[int, ...]) -> int:
    """The image tokens of a latent: its sides over the model's patch size (ComfyUI's unet_config), rounded up as
    ComfyUI pads a latent to whole patches."""
    patch = (getattr(model_config, "unet_config", {}) or {}).get("patch_size", 2)
    patch = int(patch[-1] if isinstance(patch, (tuple, list)) else patch or 1)
    h, w = latent_shape[-2:]
    return -(-h // patch) * -(-w // patch)


def scheduler_mu(tokens: int, steps: int) -> float:
    from comfy_extras.nodes_flux import compute_empirical_mu  # Flux2Scheduler's own

    return float(compute_empirical_mu(tokens, steps))


def scheduler_sigmas(tokens: int, steps: int) -> torch.Tensor:
    """What Flux2Scheduler gives for `steps` at an image of `tokens` tokens (width * height / 16²)."""
    from comfy_extras.nodes_flux import get_schedule

    return torch.as_tensor(get_schedule(steps, tokens)).float().cpu()


# the frame rate each video family was trained at, by ComfyUI's model config class (its MRO is walked)
NATIVE_FPS = {"WAN21_T2V": 16.0, "WAN22_T2V": 24.0, "LTXV": 25.0, "HunyuanVideo": 24.0, "HunyuanVideo15": 24.0}


def native_fps(model_config) -> float | None:
    for cls in type(model_config).__mro__:
        if cls.__name__ in NATIVE_FPS:
            return NATIVE_FPS[cls.__name__]
    return None


def comfy_conditioning(cond: dict[str, torch.Tensor], device: torch.device | str) -> dict:
    """One sample's cached conditioning as ComfyUI's sampling hands a prompt's conditioning to extra_conds: each
    entry a batch of one again, and `pooled_output` always there, None where the text encoder has no pooled vector
    (T5 alone: Chroma), as ComfyUI's CLIP encode returns it; Flux's extra_conds read it unconditionally, and a None
    is not cached."""
    params = {k: v[None].to(device) for k, v in cond.items()}
    params.setdefault("pooled_output", None)
    return params


def capped_away(device: torch.device) -> int:
    """The card's memory this process may not use (torch.cuda.set_per_process_memory_fraction), which ComfyUI's free
    memory (the card's) does not see."""
    if device.type != "cuda":
        return 0
    index = device.index if device.index is not None else torch.cuda.current_device()
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda d: 1.0)(index)
    return int((1.0 - fraction) * torch.cuda.get_device_properties(index).total_memory)


def takes_frame_rate(diffusion_model: nn.Module) -> bool:
    """Whether a ComfyUI diffusion model reads the clip's frame rate (LTX-Video: its token positions are in seconds):
    its forward takes `frame_rate`, which its extra_conds fill from the conditioning's (LTXVConditioning), else 25."""
    return "frame_rate" in inspect.signature(diffusion_model.forward).parameters


def latent_patch(unet_config: dict, diffusion_model: nn.Module) -> int:
    """Latent cells per token side: the config's patch_size, else the model's own patchifier's (LTX-Video's is 1),
    else 2 (Flux, SD3 and the UNets are content with even sides)."""
    patch = unet_config.get("patch_size")
    if patch is None:
        patch = getattr(getattr(diffusion_model, "patchifier", None), "patch_size", 2)
    return int(patch[-1] if isinstance(patch, (tuple, list)) else patch or 2)


def _conditioning_entries(conditioning) -> dict[str, torch.Tensor]:
    """One prompt's CONDITIONING (ComfyUI's [[cond, extras]], a batch of one) as the backend caches it: the context
    (`cross_attn`) and every tensor entry beside it (pooled_output, attention_mask, ...), on the CPU."""
    cond, extra = conditioning[0][0], conditioning[0][1]
    item = {"cross_attn": cond[0].float().cpu()}
    for k, v in extra.items():
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == 1:  # ComfyUI's batch of one
            item[k] = (v[0].float() if v.is_floating_point() else v[0]).cpu()
    return item


def _is_quantized(t) -> bool:
    return any(c.__name__ == "QuantizedTensor" for c in type(t).__mro__)


def _inference_quantized(p: torch.Tensor) -> nn.Parameter:
    """A scaled-fp8 layer's weight (ComfyUI's QuantizedTensor) as ComfyUI's loader builds it, inside inference_mode: a
    wrapper made outside it (by ComfyUI's own module.to() when it loads the model there: MixedPrecisionOps re-wraps
    its parameters) cannot be detached inside it, and ComfyUI's LoRA loader reads the model's state_dict (detach)
    under inference_mode: "Cannot set version_counter for inference tensor". Autograd never saves it (its layer
    dequantizes it into a new tensor first), so it can stay an inference tensor; its data is not copied."""
    with torch.inference_mode():
        return nn.Parameter(type(p)(p._qdata, p._layout_cls, p._params), requires_grad=False)


def _autograd_ready(module: nn.Module) -> None:
    """ComfyUI loads (and moves) weights inside torch.inference_mode(): inference tensors, which autograd
    cannot save for backward, and the LoRA's gradient flows back through every base layer. Swap in normal
    copies, frozen (ComfyUI's parameters require grad); done after every load, which may move them again."""
    with torch.inference_mode(False):
        for m in module.modules():
            for name, p in list(m._parameters.items()):
                if p is not None and _is_quantized(p):
                    if not p.is_inference():
                        m._parameters[name] = _inference_quantized(p)
                    continue
                if p is not None and (p.is_inference() or p.requires_grad):
                    m._parameters[name] = nn.Parameter(p.detach().clone() if p.is_inference() else p.detach(),
                                                       requires_grad=False)
            for name, b in list(m._buffers.items()):
                if b is not None and b.is_inference():
                    m._buffers[name] = b.clone()


# The compute-dtype copies ComfyUI's cast ops make of weights it stores in another dtype (fp8, scaled fp8), by their
# storage's address: the weight_function _RememberUpcast records each copy as the layer casts it
_UPCASTS: dict[int, tuple] = {}


class _RememberUpcast:
    """A weight_function (run by ComfyUI's cast_bias_weight after it cast a layer's stored weight to the compute
    dtype) that records the copy, so that autograd keeps the stored weight instead of the copy for backward (_pack)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = weakref.ref(module)

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        try:
            key = weight.untyped_storage().data_ptr()
        except Exception:  # a tensor subclass without a plain storage: not recorded (autograd keeps the copy)
            return weight
        _UPCASTS[key] = (weakref.ref(weight, lambda _, k=key: _UPCASTS.pop(k, None)), self.module)
        return weight


@dataclass(frozen=True)
class _Recast:
    """A saved view of a layer's upcast weight, kept as the layer (its stored fp8 weight) and the view's geometry."""

    module: weakref.ref
    dtype: torch.dtype
    device: torch.device
    size: tuple
    stride: tuple
    offset: int

    def tensor(self) -> torch.Tensor:
        import comfy.ops

        weight = comfy.ops.cast_bias_weight(self.module(), dtype=self.dtype, device=self.device)[0]
        return weight.as_strided(self.size, self.stride, self.offset)


def _pack(t: torch.Tensor):
    """What autograd keeps of a tensor it saves for backward. A tensor that requires grad is copied (ComfyUI's models
    update activations in place after saving them). A layer's weight cast from fp8 to the compute dtype (ComfyUI's
    manual_cast / scaled-fp8 ops upcast every weight in its forward, and linear saves it for the input's gradient) is
    kept as the layer, cast again in backward: otherwise every layer's upcast copy stays alive from its forward to its
    backward, which is a full-precision copy of the whole model without checkpointing (one block's with it)."""
    if t.requires_grad:
        return t.detach().clone()
    if _UPCASTS and t.is_floating_point():
        try:
            entry = _UPCASTS.get(t.untyped_storage().data_ptr())
        except Exception:
            entry = None
        if entry is not None:
            weight, module = entry[0](), entry[1]
            if weight is not None and module() is not None and weight.dtype == t.dtype and weight.device == t.device:
                return _Recast(module, t.dtype, t.device, tuple(t.size()), tuple(t.stride()), t.storage_offset())
    return t  # frozen weights and constants are never written


def _unpack(saved) -> torch.Tensor:
    return saved.tensor() if isinstance(saved, _Recast) else saved


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def stored_low_precision(module: nn.Module) -> bool:
    """Whether one of ComfyUI's cast-op layers stores its weight in fp8 (a float8 tensor, or ComfyUI's QuantizedTensor
    of a scaled-fp8 checkpoint) that its forward casts to the compute dtype."""
    weight = getattr(module, "weight", None)
    if not hasattr(module, "weight_function") or not isinstance(weight, torch.Tensor):
        return False
    return weight.dtype in FP8_DTYPES or _is_quantized(weight)


def remember_upcasts(diffusion_model: nn.Module) -> int:
    """Install _RememberUpcast on every fp8-stored layer (after every load: ComfyUI's loader wipes weight_functions);
    the lists are replaced, not appended to (ComfyUI's default list is shared by every layer class). Returns how many
    layers have it."""
    n = 0
    for m in diffusion_model.modules():
        if stored_low_precision(m):
            if not any(isinstance(f, _RememberUpcast) for f in m.weight_function):
                m.weight_function = [*m.weight_function, _RememberUpcast(m)]
            n += 1
    return n


def repeated_layers(diffusion_model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks in depth order (the stacks of block_stacks). A UNet's input/middle/output blocks
    are sequences that ComfyUI iterates itself, calling each layer (resnet, transformer, up/downsample) directly:
    their layers are the units."""
    out: list[nn.Module] = []
    for _, items in block_stacks(diffusion_model):
        for item in items:
            out.extend(item.children() if type(item).__name__ == "TimestepEmbedSequential" else [item])
    return out


def checkpointed_block(forward):
    """Activation checkpointing that ComfyUI's blocks survive: reentrant (the first forward saves nothing,
    so the in-place residual adds ComfyUI's models make cannot break it), the recompute under the same
    saved-tensor copies as predict(), inputs cloned (a block that adds into its own input would otherwise
    change what is recomputed from), and keyword arguments carried (reentrant checkpointing takes only
    positional tensors). When no input needs a gradient (the first blocks), the inputs are made to, or the
    LoRA weights inside would get none."""

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        names = list(kwargs)
        flat = [*args, *kwargs.values()]
        where = [i for i, v in enumerate(flat) if isinstance(v, torch.Tensor)]
        tensors = [flat[i] for i in where]
        if not any(t.requires_grad for t in tensors):
            tensors = [t.detach().requires_grad_() if t.is_floating_point() else t for t in tensors]

        def inner(*ts):
            vals = list(flat)
            for i, t in zip(where, ts):
                vals[i] = t.clone() if t.is_floating_point() else t
            with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
                return forward(*vals[:len(args)], **dict(zip(names, vals[len(args):])))

        return torch.utils.checkpoint.checkpoint(inner, *tensors, use_reentrant=True)

    return run


_ROPE_AUTOGRAD = False


def _rope_autograd() -> None:
    """comfy_kitchen's RoPE ops (ComfyUI >= 0.8 calls them in Flux's attention, on every backend) have no
    autograd formula: register one. RoPE rotates each pair of channels by a 2x2 matrix F (freqs_cis[..., i, :, :]),
    so the gradient is the same op with every F transposed; the op trims freqs_cis to the sequence itself."""
    global _ROPE_AUTOGRAD
    if _ROPE_AUTOGRAD:
        return
    _ROPE_AUTOGRAD = True
    try:
        import comfy.quant_ops  # noqa: F401  (loads comfy_kitchen and its ops, when installed)

        ops = torch.ops.comfy_kitchen
        names = [n for n in ("apply_rope", "apply_rope1") if hasattr(ops, n)]
    except Exception:  # no comfy_kitchen: ComfyUI's pure-torch RoPE is differentiable
        return

    def setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[-1])

    def rotate_back(ctx, g):
        return None if g is None else torch.ops.comfy_kitchen.apply_rope1(g, ctx.saved_tensors[0].transpose(-1, -2))

    for name in names:
        if name == "apply_rope":
            backward = lambda ctx, gq, gk: (rotate_back(ctx, gq), rotate_back(ctx, gk), None)  # noqa: E731
        else:
            backward = lambda ctx, g: (rotate_back(ctx, g), None)  # noqa: E731
        torch.library.register_autograd(f"comfy_kitchen::{name}", backward, setup_context=setup)


class ComfyModel(TrainingModel):
    """A TrainingModel over ComfyUI's ModelPatcher (+ CLIP and VAE objects)."""

    backend = "comfyui"

    def __init__(self, patcher, clip=None, vae=None, arch: str | None = None, clip_vision=None) -> None:
        import comfy.model_management as mm
        import comfy.model_sampling as ms

        _rope_autograd()
        self.patcher = patcher
        self.base = patcher.model  # comfy.model_base.BaseModel
        self.denoiser = self.base.diffusion_model
        self.clip = clip
        self.vae = vae
        self.arch = arch or type(self.base).__name__.lower()
        self.device = mm.get_torch_device()
        self.dtype = self.base.get_dtype()
        # the schedule ComfyUI samples this MODEL with: a ModelSamplingSD3 / ModelSamplingAuraFlow / ModelSamplingFlux
        # node before the training node patches it in (HiDream Dev at shift 6 ...), and its apply_model uses that one
        get = getattr(patcher, "get_model_object", None)
        self.sampling = get("model_sampling") if get is not None else self.base.model_sampling
        need = missing_conditioning(self.base.model_config)
        if need:
            raise ConfigError(f"{type(self.base.model_config).__name__} on ComfyUI's MODEL: it trains on {need}, which"
                              " this path does not build yet; without it, it would train on zeros")
        # reference images (the dataset's control_path, a preview's control_image) as ComfyUI's reference_latents, or
        # a start image (control_path, do_i2v's first frame) through ComfyUI's latent node for the model
        self.reference_latents = takes_reference_latents(self.base)
        self.start_image_node = start_image_node_name(self.base)
        # or the inputs beside the latent (I2V's start image, VACE's control video, masks and reference image) through
        # ComfyUI's conditioning node for the model, which writes them into the prompt's conditioning
        self.conditioning_node = conditioning_node(self.base.model_config)
        self.clip_vision = self._clip_vision_for(clip_vision)
        node = self.conditioning_node
        self.takes_control = self.reference_latents or self.start_image_node is not None or node is not None
        self._text_image_node = text_image_node(self.base) if self.reference_latents else None
        self.text_takes_images = self._text_image_node is not None
        self.takes_masks = node is not None and node.takes_masks
        self.takes_references = node is not None and node.takes_references
        # the reference image's latent frames, before the clip's (trimmed after sampling, as TrimVideoLatent does)
        self.leading_frames_key = LEADING_FRAMES if self.takes_references else None
        self.is_flow = isinstance(self.sampling, ms.CONST)
        self.objective = FlowObjective() if self.is_flow else EpsObjective()
        unet_config = getattr(getattr(self.base, "model_config", None), "unet_config", {}) or {}
        self.distilled_guidance = bool(unet_config.get("guidance_embed", False))
        fmt = self.base.latent_format
        self._channels = fmt.latent_channels
        video = getattr(fmt, "latent_dimensions", 2) == 3
        # the VAE's own compression (a video VAE's downscale_ratio is (frames rule, h, w)); without a VAE, the
        # latent format's dimensions decide
        self.vae_scale = int(vae.spacial_compression_encode()) if vae is not None else 8
        temporal = vae.temporal_compression_decode() if vae is not None else None
        self.vae_temporal = int(temporal) if temporal else (4 if video else 1)
        self.native_fps = native_fps(self.base.model_config)
        # 2x2 latent patches (Flux, SD3, Wan) need even latent sides; LTX-Video takes any
        self.patch = latent_patch(unet_config, self.denoiser)
        # cond["fps"] (each clip's frame rate) goes to the model as ComfyUI's frame_rate
        self.conditions_on_fps = takes_frame_rate(self.denoiser)

    def _clip_vision_for(self, clip_vision):
        """ComfyUI's CLIP_VISION for the models that read its features (Wan 2.1 I2V): required there, named when
        missing; not used by the others (Wan 2.2 I2V A14B, VACE)."""
        name = type(self.base.model_config).__name__
        if self.conditioning_node is None or not reads_clip_vision(self.base.model_config):
            if clip_vision is not None:
                log.warning("clip_vision: ComfyUI's %s MODEL reads no CLIP vision features; it is not used", name)
            return None
        if clip_vision is None:
            raise ConfigError(f"{name} on ComfyUI's MODEL reads CLIP vision features of the start image (ComfyUI's"
                              " CLIPVisionEncode): connect a CLIP vision model (clip_vision_h.safetensors, ComfyUI's"
                              " Load CLIP Vision) to the Training Model node's clip_vision input, or set"
                              " model.clip_vision_path headless")
        return clip_vision

    def requires_conditions(self) -> str | None:
        node = self.conditioning_node
        return None if node is None else f"ComfyUI's {type(self.base.model_config).__name__} MODEL trains on {node.needs}"

    host_places_weights = True
    fp8_matmul_refusal = ("not on ComfyUI's MODEL: its layers are ComfyUI's own ops (an fp8 checkpoint's matmuls are"
                          " ComfyUI's to run), not the ones model.quantize makes; set it to false, or train with the"
                          " engine's loaders (model.arch) and model.quantize")
    _reserve: int | None = None  # bytes kept free for the training step under partial loading; None: load it all
    fp8_layers = 0  # the layers whose fp8 weights' upcast copies autograd does not keep (remember_upcasts), once loaded

    def ensure_loaded(self) -> None:
        """ComfyUI's model management places (and may later move) the weights: load them for training, all of them,
        or (reserve_memory) what fits beside the training step's memory, the rest cast to the card per layer from
        host memory as ComfyUI's low-VRAM mode runs it."""
        import comfy.model_management as mm

        if self._reserve is None:
            mm.load_models_gpu([self.patcher], force_full_load=True)
        else:
            mm.load_models_gpu([self.patcher], memory_required=self._reserve + capped_away(self.device))
        _autograd_ready(self.denoiser)
        # fp8 weights (UNETLoader's weight_dtype fp8, scaled-fp8 checkpoints) stay fp8; the copies their layers cast
        # to the compute dtype are not kept for backward
        self.fp8_layers = remember_upcasts(self.denoiser)

    def reserve_memory(self, nbytes: int) -> None:
        self._reserve = int(nbytes)

    def place_denoiser(self) -> None:
        self.ensure_loaded()

    def quantize(self) -> tuple[int, int]:
        raise ConfigError("model.quantize: not on ComfyUI's MODEL; load an fp8 checkpoint (or set the weight dtype"
                          " to fp8 in ComfyUI's loader) instead")

    def compile_blocks(self) -> None:
        log.warning("train.compile: not used on ComfyUI's MODEL yet; training runs uncompiled")

    # --- targets ------------------------------------------------------------------------------
    def targets(self) -> list[Target]:
        return default_targets(self.denoiser)

    def latent_channels(self) -> int:
        return self._channels

    def repeated_blocks(self) -> list[nn.Module]:
        return repeated_layers(self.denoiser)

    def checkpoint_blocks(self, chosen: list[nn.Module]) -> None:
        self._checkpointed_ids = {id(b) for b in chosen}
        self._block_forwards().wrap(chosen, checkpointed_block)

    # --- encoders -----------------------------------------------------------------------------
    def text_encoders_loaded(self) -> bool:
        return self.clip is not None

    def release_text_encoders(self) -> None:
        self.clip = None

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> Conditioning:
        """ComfyUI's whole conditioning of each caption, as its CLIPTextEncode makes it: the context (`cross_attn`)
        and every tensor beside it (pooled_output, attention_mask, HiDream's conditioning_llama3, ...), each caption at
        its own length (zero-padded in the batch, with its true shape: base.ragged_batch)."""
        return self.encode_text_with_images(captions, [None] * len(captions))

    def use_text_image_node(self, name: str) -> None:
        """model.text_image_node: the ComfyUI node that reads each caption with its reference image."""
        self._text_image_node = text_image_node(self.base, name)
        self.text_takes_images = True

    @torch.no_grad()
    def encode_text_with_images(self, captions: list[str], images: list[torch.Tensor | None]) -> Conditioning:
        """As encode_text; a caption with an image is encoded as the family's ComfyUI edit node encodes a prompt with
        its image (TEXT_IMAGE_NODES: Qwen-Image-Edit's VL text encoder reads the image among the caption's tokens)."""
        if self.clip is None:
            raise RuntimeError("no CLIP: connect a CLIP to encode captions, or cache the text embeddings")
        per_sample = []
        for c, image in zip(captions, images):
            if image is None:
                out = self.clip.encode_from_tokens_scheduled(self.clip.tokenize(c), show_pbar=False)
            elif self._text_image_node is None:
                raise RuntimeError(f"ComfyUI's {type(self.base).__name__} MODEL: its text encoder reads no images")
            else:
                out = self._text_image_node.execute(self.clip, c, None, comfy_image(image)).result[0]
            per_sample.append(_conditioning_entries(out))
        # entries only some captions have (HunyuanVideo 1.5's byT5 for quoted text) stay theirs: base.ragged_batch
        return ragged_batch(per_sample)

    @torch.no_grad()
    def encode_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Images (b, 3, h, w) or clips (b, 3, f, h, w) in [-1, 1], each encoded on its own (a video VAE reads a
        batch of pixels as the frames of one clip)."""
        if self.vae is None:
            raise RuntimeError("no VAE: connect a VAE to encode the dataset images")
        out = []
        for item in images:
            frames = item if item.dim() == 4 else item[:, None]  # (3, f, h, w); an image is one frame
            pixels = ((frames.float() + 1) / 2).clamp(0, 1).permute(1, 2, 3, 0)  # (f, h, w, 3), ComfyUI's IMAGE
            lat = self.vae.encode(pixels if self.is_video else pixels[:1])
            out.append(self.base.process_latent_in(lat.float()).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(b, 3, h, w) for image latents, (b, 3, f, h, w) for video latents, in [-1, 1]."""
        if self.vae is None:
            raise RuntimeError("no VAE: connect a VAE to decode samples")
        img = self.vae.decode(self.base.process_latent_out(latents.float()))
        if latents.dim() == 5:
            img = img.reshape(latents.shape[0], -1, *img.shape[-3:])  # (b, f, h, w, 3)
            return (img.float().permute(0, 4, 1, 2, 3) * 2 - 1).clamp(-1, 1).cpu()
        img = img.reshape(-1, *img.shape[-3:])
        return (img.float().movedim(-1, 1) * 2 - 1).clamp(-1, 1).cpu()

    # --- denoising ----------------------------------------------------------------------------
    def _sample_conds(self, noisy: torch.Tensor, cond: dict[str, torch.Tensor], guidance: float | None) -> dict:
        """One sample's model inputs from ComfyUI's own extra_conds, given its whole conditioning (as ComfyUI's
        sampling passes a prompt's conditioning dict to it). A reference image (`control`, a latent as encode_pixels
        gives it) goes in as ComfyUI's ReferenceLatent node puts it: `reference_latents`, a list of raw latents that
        extra_conds runs through process_latent_in itself; an all-zero one (an item without it in a batch) is none."""
        cond = dict(cond)
        control = cond.pop("control", None)
        cond.pop("start_latent", None)  # in the noisy latent already (known_latents)
        cond.pop(LEADING_FRAMES, None)  # in the noisy latent already (the loop puts them before the clip's)
        given = cond.pop("start_given", None)
        fps = cond.pop("fps", None)
        written = node_kwargs(cond, self.device)  # what the conditioning node wrote, as it wrote it
        params = comfy_conditioning({k: v for k, v in cond.items() if not k.startswith(NODE_PREFIX)}, self.device)
        params.update(written)
        if control is not None and self.reference_latents and bool(control.abs().amax() > 0):
            params["reference_latents"] = [self.base.process_latent_out(control[None].float()).to(self.device)]
        params.update(device=self.device, noise=noisy, width=noisy.shape[-1] * self.vae_scale,
                      height=noisy.shape[-2] * self.vae_scale)
        if self.distilled_guidance:
            params["guidance"] = 1.0 if guidance is None else float(guidance)
        if given is not None and bool(given.amax() > 0):
            params["denoise_mask"] = self._denoise_mask(given, noisy.shape)
        if fps is not None and self.conditions_on_fps:  # as LTXVConditioning sets it on the conditioning
            params["frame_rate"] = float(fps)
        out = self.base.extra_conds(**params)
        return {k: v.process_cond(batch_size=1, device=self.device, area=None) for k, v in out.items()}

    def _denoise_mask(self, given: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """An item's start frames as ComfyUI's sampler hands a LATENT's noise_mask to extra_conds (`denoise_mask`, 1
        where the model generates, at the latent's shape): the model then gives the start frames' tokens timestep 0.
        Without one (text-to-video) its timestep is one per sample, as ComfyUI samples text-to-video."""
        import comfy.sampler_helpers

        return comfy.sampler_helpers.prepare_mask(1.0 - given[None].float(), shape, self.device)

    # --- start images (image-to-video) --------------------------------------------------------
    @torch.no_grad()
    def encode_conditions(self, pixels: torch.Tensor, control: torch.Tensor | None,
                          mask: torch.Tensor | None = None, reference: torch.Tensor | None = None) -> Conditioning | None:
        """A start image (control (3, h, w), or a clip's (3, f, h, w): its first frame) through ComfyUI's own latent
        node for the model (Wan22ImageToVideoLatent), at the item's size and length, as a graph builds it; reference
        images as the default does (a control latent)."""
        if self.conditioning_node is not None:
            return self._node_conditions(pixels, control, mask, reference)
        if self.start_image_node is None:
            return super().encode_conditions(pixels, control, mask, reference)
        if control is None:
            return None
        import importlib

        module, name = self.start_image_node
        node = getattr(importlib.import_module(module), name)
        frames = pixels.shape[1] if pixels.dim() == 4 else 1
        h, w = pixels.shape[-2:]
        start = control if control.dim() == 3 else control[:, 0]
        image = ((start.float() + 1) / 2).clamp(0, 1).permute(1, 2, 0)[None]  # (1, h, w, 3), ComfyUI's IMAGE
        out = node.execute(self.vae, w, h, frames, 1, start_image=image)
        latent = out.args[0] if hasattr(out, "args") else out[0]
        return start_conditions(latent["samples"], latent["noise_mask"], self.base.process_latent_in, frames == 1)

    def _node_conditions(self, pixels: torch.Tensor, control: torch.Tensor | None, mask: torch.Tensor | None,
                         reference: torch.Tensor | None) -> Conditioning | None:
        """An item's inputs through ComfyUI's conditioning node for the model (WanImageToVideo, WanVaceToVideo) at the
        item's size and length, as a graph runs it: what it writes into the conditioning, cached (node_entries); and
        the latent frames it puts before the clip's (VACE's reference image: its trim_latent), as the clean frames
        training prepends to the item's latent."""
        if control is None and reference is None:
            return None
        import importlib

        node = self.conditioning_node
        cls = getattr(importlib.import_module(node.module), node.name)
        frames = pixels.shape[1] if pixels.dim() == 4 else 1
        h, w = pixels.shape[-2:]
        empty = [[torch.zeros(1, 1, 1), {}]]  # the prompt's own entries are the caption's, cached apart
        out = cls.execute(positive=empty, negative=empty, vae=self.vae, width=w, height=h, length=frames,
                          batch_size=1, **node.inputs(self, control, mask, reference, frames))
        out = out.args if hasattr(out, "args") else out
        cond = node_entries(out[0][0][1])
        trim = int(out[3]) if len(out) > 3 else 0
        if trim:  # the node's vace_frames begin with the reference's latent (its first channels), trimmed after
            frames_key = next(k for k in cond if k.startswith(NODE_PREFIX + "vace_frames."))
            raw = cond[frames_key][None, :self._channels, :trim]
            cond[LEADING_FRAMES] = self.base.process_latent_in(raw)[0].cpu().clone()
        return cond

    def known_latents(self, cond: Conditioning, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The start image's frames (`start_latent` where `start_given`): the loop puts them into the noisy latent
        clean and leaves them out of the loss, the sampler keeps them (ComfyUI's sampler does so with the mask)."""
        if "start_given" not in cond:
            return None
        return cond["start_latent"].float(), cond["start_given"].float()  # (b, c, f, h, w), (b, 1, f, h, w)

    def predict(self, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning, guidance: float | None = None) -> torch.Tensor:
        x = noisy.to(self.device, torch.float32)
        s = sigmas.to(self.device, torch.float32).reshape(-1).expand(x.shape[0])
        per_sample = [self._sample_conds(x[i:i + 1], sample_of(cond, i), guidance) for i in range(x.shape[0])]
        # one batch where ComfyUI would batch them (same conditioning shapes); else one sample at a time, as ComfyUI
        # runs prompts whose conditioning it cannot concatenate
        first = per_sample[0]
        if all(set(d) == set(first) and all(first[k].can_concat(d[k]) for k in first) for d in per_sample[1:]):
            groups = [(slice(0, x.shape[0]), {k: first[k].concat([d[k] for d in per_sample[1:]]) if len(per_sample) > 1
                                              else first[k].cond for k in first})]
        else:
            groups = [(slice(i, i + 1), {k: v.cond for k, v in d.items()}) for i, d in enumerate(per_sample)]
        outs = []
        # ComfyUI's models add residuals in place (Flux: `x += ...` after a norm saved x), which autograd
        # refuses: the activations it saves are copied as they are saved, so later in-place updates miss them
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            for sel, conds in groups:
                denoised = self.base.apply_model(x[sel], s[sel], **conds)
                # eps for eps/v models, the velocity (noise - x0) for flow models
                outs.append((x[sel] - denoised) / s[sel].view(-1, *([1] * (x.dim() - 1))))
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def train_sigmas(self, kind: str, batch: int, gen: torch.Generator, latent_shape: tuple[int, ...]) -> torch.Tensor:
        if self.is_flow:
            return super().train_sigmas(kind, batch, gen, latent_shape)
        table = self.sampling.sigmas.float().cpu()
        idx = torch.randint(0, table.shape[0], (batch,), generator=gen)
        return table[idx]

    def schedule_position(self, sigmas: torch.Tensor) -> torch.Tensor:
        if self.is_flow:
            return sigmas
        t = self.sampling.timestep(sigmas.to(self.sampling.sigmas.device)).float().cpu().clone()  # not an inference tensor
        return t / (self.sampling.sigmas.shape[0] - 1)

    def train_shift_mu(self, latent_shape: tuple[int, ...]) -> float | None:
        return flow_shift_mu(self.base.model_config, self.sampling, latent_shape)

    def train_shift(self) -> float:
        shift = sampling_shift(self.sampling)
        return super().train_shift() if shift is None else shift

    def sample_sigmas(self, steps: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
        import comfy.samplers

        if self.is_flow and takes_scheduler_shift(self.base.model_config):  # Flux.2: as Flux2Scheduler samples it
            return scheduler_sigmas(latent_tokens(self.base.model_config, latent_shape), steps)
        sampling = self.sampling
        mu = token_count_mu(self.base.model_config, latent_shape)
        if mu is not None:  # ComfyUI's sampling with this latent's shift, as ModelSamplingLTXV patches it in
            sampling = type(self.sampling)(self.base.model_config)
            sampling.set_parameters(shift=mu)
        return comfy.samplers.calculate_sigmas(sampling, "simple", steps).float().cpu()

    def latent_cache_id(self) -> str:
        fsm = getattr(self.vae, "first_stage_model", None)
        vae = module_fingerprint(fsm) if fsm is not None else "comfy-vae"
        if self.clip_vision is not None:  # the cached conditions hold its features
            return f"{vae}-{module_fingerprint(self.clip_vision.model)}"
        return vae

    def save_metadata(self) -> dict[str, str]:
        return {"ss_base_model_version": self.arch, "eridiffusion.arch": self.arch, "eridiffusion.backend": "comfy"}
