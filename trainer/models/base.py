"""The seam: what the loop, the caches, the sampler, the session and the nodes need from a model.

A `TrainingModel` is a denoiser to adapt (its trainable targets named by ComfyUI's own keys), text and pixel
encoders, an objective, `predict` and the sampling schedule. Every member anything outside a family uses is
declared here, with a default where one makes sense, so nothing reads a family's attributes by name. Family
differences live in the family modules; backends (diffusers families, ComfyUI's MODEL) implement the same
members. `trainer.prepare` applies the same preparation to every model, whoever loaded it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.utils.checkpoint
from torch import nn

from ..errors import ConfigError
from .blocks import BlockForwards, checkpointed, spread_over_depth
from .fingerprint import module_fingerprint
from .objectives import FlowObjective
from .quantize import quantize_blocks
from .schedules import sample_flow_sigmas
from .vae import decode_latents, encode_latents

# Conditioning for a batch: family-defined tensors, batch dimension first.
Conditioning = dict[str, torch.Tensor]


def split_conditioning(cond: Conditioning) -> list[Conditioning]:
    n = next(iter(cond.values())).shape[0]
    return [{k: v[i] for k, v in cond.items()} for i in range(n)]


# `<name>__shape` (b, ndim): the true shape of each sample's `<name>`, for conditioning whose length varies by caption
# (ComfyUI's encodes: each prompt at its own length); the batch holds them zero-padded to the longest. A record of
# zeros marks an entry the sample does not have (HunyuanVideo 1.5's byT5 conditioning: only captions with quoted text
# have one, as ComfyUI's encoder gives it)
SHAPE_SUFFIX = "__shape"


def _absent_like(t: torch.Tensor) -> torch.Tensor:
    """A sample's stand-in for an entry it does not have: empty, of the entry's rank (its shape record all zeros)."""
    return t.new_zeros((0,) * t.dim())


def _union_keys(items: list[dict]) -> list[str]:
    return list(dict.fromkeys(k for it in items for k in it))


def pad_stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Tensors of one rank stacked, each zero-padded at the end of every dimension to the largest."""
    size = [max(t.shape[d] for t in tensors) for d in range(tensors[0].dim())]
    out = tensors[0].new_zeros((len(tensors), *size))
    for i, t in enumerate(tensors):
        out[(i, *[slice(0, n) for n in t.shape])] = t
    return out


def ragged_batch(per_sample: list[dict[str, torch.Tensor]]) -> Conditioning:
    """Per-sample tensors of varying shapes as one batch: each name zero-padded, with its `<name>__shape`; a name
    some samples lack is kept for those that have it (the others' shape records are zeros)."""
    out: Conditioning = {}
    for k in _union_keys(per_sample):
        present = next(d[k] for d in per_sample if k in d)
        ts = [d[k] if k in d else _absent_like(present) for d in per_sample]
        out[k] = pad_stack(ts)
        out[k + SHAPE_SUFFIX] = torch.tensor([list(t.shape) for t in ts], dtype=torch.long)
    return out


def sample_of(cond: Conditioning, i: int) -> dict[str, torch.Tensor]:
    """Sample i's tensors of a batch, cut back to their true shapes where the batch records them; the entries it
    does not have (a record of zeros) left out."""
    out = {}
    for k, v in cond.items():
        if k.endswith(SHAPE_SUFFIX):
            continue
        shape = cond.get(k + SHAPE_SUFFIX)
        t = v[i]
        if shape is not None and not bool(shape[i].any()):
            continue
        out[k] = t[tuple(slice(0, int(n)) for n in shape[i])] if shape is not None else t
    return out


def trim_right_padding(context: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Right-padded captions (b, n, d) with their mask (b, n) cut to the batch's longest caption; the mask None when
    no padding is left (a batch of one), so attention runs unmasked (flash / compiled SDPA)."""
    n = max(1, int(mask.sum(dim=1).max()))
    mask = mask[:, :n]
    return context[:, :n], None if bool(mask.all()) else mask


def collate_conditioning(items: list[Conditioning]) -> Conditioning:
    """Per-caption conditioning (from the text cache) as a batch; tensors whose shapes vary are padded; an entry
    some captions lack (with its shape record) is kept for those that have it, the others' records zeros."""
    out: Conditioning = {}
    for k in _union_keys(items):
        present = next(it[k] for it in items if k in it)
        recorded = any(k + SHAPE_SUFFIX in it for it in items)
        if any(k not in it for it in items) and not (recorded or k.endswith(SHAPE_SUFFIX)):
            raise RuntimeError(f"conditioning {k!r} is missing for some captions, without a {k}{SHAPE_SUFFIX} record")
        ts = [it[k] if k in it else (torch.zeros_like(present) if k.endswith(SHAPE_SUFFIX) else _absent_like(present))
              for it in items]
        if len({tuple(t.shape) for t in ts}) == 1:
            out[k] = torch.stack(ts)
        elif recorded:
            out[k] = pad_stack(ts)
        else:
            raise RuntimeError(f"conditioning {k!r} varies in shape across captions without a {k}{SHAPE_SUFFIX} record")
    return out


def batch_of_one(cond: Conditioning) -> Conditioning:
    return {k: v[None] for k, v in cond.items()}


@dataclass
class TargetMember:
    """One module of the backend that computes rows `rows` of the ComfyUI weight named by the target."""

    module: nn.Module
    rows: slice


@dataclass
class Target:
    """A trainable layer as ComfyUI names it (`diffusion_model.double_blocks.0.img_attn.qkv`).

    A fused original weight (Flux qkv, linear1) may be computed by several backend modules that
    share one input; each member computes a slice of the fused output rows.
    """

    key: str
    in_features: int
    out_features: int
    members: list[TargetMember]
    kind: str = "linear"
    aliases: tuple[str, ...] = ()  # backend names of the members, also matched by target filters
    component: str = "denoiser"  # or "text_encoder": its captions must then be encoded with grad every step
    # left out of the default selection: trained only when network_kwargs.only_if_contains names it (peers leave
    # such layers out: HiDream's MoE experts, HunyuanVideo's token refiner)
    opt_in: bool = False


@dataclass
class SampleRequest:
    """One preview: conditioning for the prompt (and the negative), size, steps, guidance and seed.
    `frames` > 1 samples a clip (video families); `control` is a control latent for families that take one."""

    cond: Conditioning
    neg_cond: Conditioning | None
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    frames: int = 1
    extra: dict = field(default_factory=dict)


class TrainingModel(ABC):
    """The seam between the loop and a family or backend."""

    arch: str = ""
    backend: str = "diffusers"
    objective = FlowObjective()
    # pixels per latent cell (spatial), frames per latent frame (1 for image models), latent cells per token side
    vae_scale: int = 8
    vae_temporal: int = 1
    patch: int = 2
    # guidance distilled into the model (an embedding) rather than classifier-free guidance
    distilled_guidance: bool = False
    # the guidance a training step feeds such a model (previews use the sample's own guidance_scale)
    train_guidance: float = 1.0
    # cond["control"]: a control latent (normalized like the training latents) the family's model takes
    takes_control: bool = False
    # a caption is encoded together with its item's control image (an edit model's vision-language text encoder:
    # Qwen-Image-Edit): encode_text_with_images; cached per item
    text_takes_images: bool = False
    # datasets[].mask_path: masks beside the control (VACE) or inpaint masks (Flex.2)
    takes_masks: bool = False
    # datasets[].reference_path / samples[].reference_image: reference images (VACE)
    takes_references: bool = False
    # the conditioning key of clean latent frames the denoiser takes before the item's own (VACE's reference images):
    # training prepends them to the target (the model was trained so); previews add as many noise frames and drop
    # them after sampling, as ComfyUI's TrimVideoLatent does
    leading_frames_key: str | None = None
    # the frame rate clips are resampled to unless a dataset says otherwise (video families)
    native_fps: float | None = None
    # cond["fps"] (b,): the frame rate of each item's clip (its dataset's `fps`, else native_fps) and of each
    # preview (sample.fps), for families whose positions are in seconds (LTX-Video)
    conditions_on_fps: bool = False
    # attributes that hold the text encoders: released or moved off the card by the prepare step
    text_encoder_attrs: tuple[str, ...] = ()
    # "diffusers": checkpoint through the denoiser's own hook (outside a compiled block); "wrap": wrap block forwards
    checkpointing: str = "diffusers"
    denoiser: nn.Module
    vae: nn.Module | None = None
    # trainer.models.offload.BlockSwap over repeated_blocks() when train.blocks_to_swap is on (set by the prepare step)
    block_swap = None
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32

    # --- what the loop adapts ----------------------------------------------------------------------
    @abstractmethod
    def targets(self) -> list[Target]:
        """Trainable layers of the denoiser, named by ComfyUI's keys."""

    def text_encoder_targets(self) -> list[Target]:
        """Trainable layers of the text encoders (`component="text_encoder"`, ComfyUI's `lora_te1_...` keys),
        for train.train_text_encoder; families without it say so."""
        raise ConfigError(f"config.process[0].train.train_text_encoder: not supported for model.arch {self.arch!r}"
                          " (only the denoiser is trained); set it to false")

    def repeated_blocks(self) -> list[nn.Module]:
        """The denoiser's repeated blocks, in depth order (for checkpointing, quantizing and compiling)."""
        return []

    @abstractmethod
    def latent_channels(self) -> int: ...

    # --- shapes ------------------------------------------------------------------------------------
    @property
    def pixel_factor(self) -> int:
        """Image sides must be multiples of this: VAE downsampling x patch size."""
        return self.vae_scale * self.patch

    @property
    def is_video(self) -> bool:
        return self.vae_temporal > 1

    def snap_frames(self, frames: int) -> int:
        """The largest frame count <= `frames` the VAE takes (vae_temporal * k + 1; 1 for image models)."""
        if not self.is_video or frames <= 1:
            return 1
        t = self.vae_temporal
        return (frames - 1) // t * t + 1

    def snap_size(self, width: int, height: int) -> tuple[int, int]:
        f = self.pixel_factor
        return max(f, width // f * f), max(f, height // f * f)

    def latent_shape(self, width: int, height: int, frames: int = 1) -> tuple[int, ...]:
        """The latent of one image (1, c, h, w) or clip (1, c, f, h, w) at this size, rounded as buckets round."""
        w, h = self.snap_size(width, height)
        c, s = self.latent_channels(), self.vae_scale
        if self.is_video:
            return (1, c, (self.snap_frames(frames) - 1) // self.vae_temporal + 1, h // s, w // s)
        return (1, c, h // s, w // s)

    # --- encoders ----------------------------------------------------------------------------------
    @abstractmethod
    def encode_text(self, captions: list[str]) -> Conditioning: ...

    def encode_text_for_training(self, captions: list[str]) -> Conditioning:
        """Conditioning for a training step: as encode_text, but where the family trains text encoders, with
        gradients reaching their adapters (and left on the model's device)."""
        return self.encode_text(captions)

    def use_text_image_node(self, name: str) -> None:
        """model.text_image_node: a ComfyUI node that encodes captions with images (ComfyUI's MODEL only)."""
        raise ConfigError(f"config.process[0].model.text_image_node: {name} is a ComfyUI node; it applies to"
                          f" ComfyUI's MODEL (model.backend: comfyui, or Training Model (from ComfyUI)), not to"
                          f" model.arch {self.arch!r}")

    def encode_text_with_images(self, captions: list[str], images: list[torch.Tensor | None]) -> Conditioning:
        """Each caption encoded together with its image (3, h, w) in [-1, 1] (its item's control image), or alone
        where the image is None (as encode_text), for families whose text encoder reads images (text_takes_images)."""
        raise NotImplementedError(f"model.arch {self.arch!r}: its text encoder reads no images")

    def encode_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """images (b, 3, h, w) or clips (b, 3, f, h, w) in [-1, 1] -> normalized latents (the family's KL VAE)."""
        return encode_latents(self.vae, images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """normalized latents -> images (b, 3, h, w) or clips (b, 3, f, h, w) in [-1, 1]."""
        return decode_latents(self.vae, latents)

    def encode_conditions(self, pixels: torch.Tensor, control: torch.Tensor | None,
                          mask: torch.Tensor | None = None, reference: torch.Tensor | None = None) -> Conditioning | None:
        """Per-item conditions cached with the item's latent, for families that take more than a caption.
        `pixels`: the item (3, [f,] h, w); `control`: its condition image (3, h, w) or video (3, f, h, w) (the control
        file, or the clip's first frame with do_i2v), or None; `mask`: (1, [f,] h, w) in [0, 1] (VACE), or None;
        `reference`: a reference image (3, h, w) at the item's size (VACE), or None.
        Default: a control latent for families that take one."""
        if self.takes_control and control is not None:
            return {"control": self.encode_pixels(control[None])[0]}
        return None

    def conditions_at(self, cond: Conditioning, step: int, steps: int) -> Conditioning:
        """The conditioning a preview's `step`-th of `steps` sampling steps gives the model: by default the same at
        every step (Flex.2 drops its control after samples[].control_stop of them)."""
        return cond

    def known_latents(self, cond: Conditioning, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Latent values the conditioning gives rather than the model generates (an image-to-video start frame), for
        latents shaped like `like`: (values, given), both broadcastable to it, `given` 1 where a value is given and 0
        where the model generates; None (the default) when nothing is given. The loop puts the values into the noisy
        latents and leaves them out of the loss; the sampler keeps them at every step."""
        return None

    def requires_conditions(self) -> str | None:
        """Why items without a condition image cannot train (a message), or None when they can."""
        return None

    def text_encoder_modules(self) -> list[nn.Module]:
        return [m for m in (getattr(self, a, None) for a in self.text_encoder_attrs) if isinstance(m, nn.Module)]

    def text_encoders_loaded(self) -> bool:
        return all(getattr(self, a, None) is not None for a in self.text_encoder_attrs)

    def release_text_encoders(self) -> None:
        """Text encoders leave memory once embeddings are cached and no prompt will be encoded again."""
        for a in self.text_encoder_attrs:
            setattr(self, a, None)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def place_text_encoders(self, device: torch.device | str) -> None:
        """Move the text encoders (a session keeps them for later prompts, on the CPU between uses)."""
        for m in self.text_encoder_modules():
            m.to(device)
        if torch.device(device).type == "cpu" and self.device.type == "cuda":
            torch.cuda.empty_cache()

    @contextmanager
    def text_encoders_on_device(self) -> Iterator[None]:
        """The text encoders on the training device for the block's duration, back where they were after."""
        mods = self.text_encoder_modules()
        where = [next(m.parameters()).device for m in mods]
        for m in mods:
            m.to(self.device)
        try:
            yield
        finally:
            for m, d in zip(mods, where):
                m.to(d)

    # --- placement and preparation (called by trainer.prepare) ---------------------------------------
    def place_denoiser(self) -> None:
        """Move the denoiser onto the training device. Loaders leave it on the CPU so that the text encoders and
        the VAE encode the dataset without sharing the card with it: on 24 GB, T5-XXL next to an 8-12B
        transformer does not fit, either alone does."""
        self.denoiser.to(self.device)

    def ensure_loaded(self) -> None:
        """Before work that runs the denoiser: a backend whose host may have moved the weights (ComfyUI's model
        management) puts them back; loaded-by-us models are where the prepare step put them."""

    # whose model management places the weights (ComfyUI's): block swap is then the host's partial loading
    host_places_weights = False
    # why this backend cannot honour model.fp8_matmul (None: it can; the switch is on the layers model.quantize makes)
    fp8_matmul_refusal: str | None = None

    def reserve_memory(self, nbytes: int) -> None:
        """A host that places the weights itself (host_places_weights) loads only what fits on the card beside
        `nbytes` for the training step, and streams the rest from host memory layer by layer."""
        raise NotImplementedError(f"{type(self).__name__} places its own weights: use block swap")

    def quantize(self) -> tuple[int, int]:
        """`model.quantize`: the repeated blocks' linears stored in fp8. Returns (layers, bytes saved)."""
        return quantize_blocks(self.repeated_blocks())

    def set_gradient_checkpointing(self, fraction: float) -> None:
        """Checkpoint this fraction of the denoiser's repeated blocks (0: none, 1: all), spread over depth."""
        self.checkpoint_blocks(spread_over_depth(self.repeated_blocks(), fraction))

    def checkpoint_blocks(self, chosen: list[nn.Module]) -> None:
        """Checkpoint these of the repeated blocks, and no others."""
        self._checkpointed_ids = {id(b) for b in chosen}
        if self.checkpointing == "wrap":
            self._block_forwards().wrap(chosen, checkpointed)
            return
        # diffusers models call their blocks through `_gradient_checkpointing_func` when checkpointing is on:
        # the checkpoint stays outside a compiled block, which is what compile + checkpointing is fast with
        ids = self._checkpointed_ids

        def checkpoint(module, *args):
            if id(module) in ids:
                return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)
            return module(*args)

        if ids:
            self.denoiser.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint)
        elif getattr(self.denoiser, "gradient_checkpointing", False):
            self.denoiser.disable_gradient_checkpointing()

    def checkpointed_blocks(self) -> list[nn.Module]:
        """The blocks the last set_gradient_checkpointing chose (what the prepare step reports)."""
        ids = getattr(self, "_checkpointed_ids", set())
        return [b for b in self.repeated_blocks() if id(b) in ids]

    def _block_forwards(self) -> BlockForwards:
        if not hasattr(self, "_wrapped_forwards"):
            self._wrapped_forwards = BlockForwards()
        return self._wrapped_forwards

    def attention_shapes(self, sizes: list[tuple[int, int, int]], batch: int) -> list[tuple[int, int, int, int, int]]:
        """(batch, heads, query tokens, key tokens, head dim) of every unmasked attention call a training step makes
        at these (width, height, frames) sizes, for the attention self-test (trainer/attention.py). Empty: not
        declared, and cuDNN attention stays off for the family."""
        return []

    def compile_blocks(self) -> None:
        """Regional torch.compile of the repeated blocks (after the network's hooks are attached).

        Blocks of one class share one code object, and dynamo counts recompiles per code object: a UNet's
        resnets differ in width and resolution, so each needs its own graph. Allow one per block."""
        import torch._dynamo

        blocks = self.repeated_blocks()
        cfg = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), 2 * len(blocks)))
        for b in blocks:
            b.compile(fullgraph=True)

    def set_train_hooks(self, training: bool) -> None:
        """Family-specific switches between training and sampling (e.g. a bypassed guidance embedding)."""

    # --- the objective -----------------------------------------------------------------------------
    @abstractmethod
    def predict(self, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning,
                guidance: float | None = None) -> torch.Tensor:
        """Model output in the objective's target space, for latents (b, c, [f,] h, w) at noise levels sigmas (b,)."""

    @abstractmethod
    def sample_sigmas(self, steps: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
        """Descending noise levels for sampling, ending in 0."""

    def train_sigmas(self, kind: str | None, batch: int, gen: torch.Generator,
                     latent_shape: tuple[int, ...]) -> torch.Tensor:
        """Noise levels for a training batch (`train.timestep_type`); flow families share this one."""
        return sample_flow_sigmas(kind, batch, gen, self.train_shift_mu(latent_shape), self.train_shift())

    def train_shift(self) -> float:
        """The fixed shift `timestep_type: shift` (and `flux_shift` without a resolution shift) applies."""
        return 3.0

    def schedule_position(self, sigmas: torch.Tensor) -> torch.Tensor:
        """Where each noise level sits on the training schedule, in [0, 1] (0: clean, 1: pure noise): what
        `linear_timesteps` weights. Flow sigmas already are; DDPM families map theirs to t / 999."""
        return sigmas

    def train_shift_mu(self, latent_shape: tuple[int, ...]) -> float | None:
        """mu for resolution-dependent timestep shift, or None if the family has none."""
        return None

    # --- identity ----------------------------------------------------------------------------------
    def latent_cache_id(self) -> str:
        """Identifies the pixel encoder, so cached latents are never reused across encoders."""
        if isinstance(self.vae, nn.Module):
            return module_fingerprint(self.vae)
        return type(self).__name__

    def save_metadata(self) -> dict[str, str]:
        return {"ss_base_model_version": self.arch, "eridiffusion.arch": self.arch}
