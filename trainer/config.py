"""The ai-toolkit job format (YAML) -> typed config.

Every error names the key path (`config.process[0].train.lr: expected a number, got 'fast'`);
unknown keys become warnings (errors one edit away from a known key); `--set train.steps=10` overrides apply to process[0].
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .errors import ConfigError
from .paths import HUB_ID, plain_name
from .schema import SchemaContext, build, spec

DTYPES = ("fp32", "float32", "fp16", "float16", "bf16", "bfloat16")
NETWORK_TYPES = ("lora", "locon", "lokr", "loha", "dora")
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "adafactor")
TIMESTEP_TYPES = ("sigmoid", "linear", "shift", "flux_shift")


@dataclass
class NetworkConfig:
    type: str = spec("lora", choices=NETWORK_TYPES, help="lora, locon (+ conv layers), lokr, loha, dora")
    linear: int = spec(16, ge=1, le=4096, aliases=("rank",), help="rank of the update")
    linear_alpha: Optional[float] = spec(None, gt=0, le=1e6, aliases=("alpha",), help="scale = alpha / rank")
    conv: Optional[int] = spec(None, ge=1, le=4096, aliases=("conv_rank",), help="conv layers' rank (none: no conv)")
    conv_alpha: Optional[float] = spec(None, gt=0, le=1e6)
    lokr_factor: int = spec(-1, ge=-1, le=4096, help="LoKr: w1's size; -1: the most balanced split")
    lokr_full_rank: bool = spec(False, help="LoKr: w2 full rank instead of low-rank")
    dropout: float = spec(0.0, ge=0, le=1)
    network_kwargs: dict = spec(default_factory=dict)
    pretrained_lora_path: Optional[str] = spec(None)

    @property
    def alpha(self) -> float:
        return float(self.linear if self.linear_alpha is None else self.linear_alpha)

    @property
    def only_if_contains(self) -> list[str]:
        return _str_list(self.network_kwargs.get("only_if_contains"))

    @property
    def ignore_if_contains(self) -> list[str]:
        return _str_list(self.network_kwargs.get("ignore_if_contains"))


def _str_list(v: Any) -> list[str]:
    if v is None:
        return []
    return [str(x) for x in (v if isinstance(v, list) else [v])]


@dataclass
class SaveConfig:
    dtype: str = spec("float16", choices=DTYPES, help="dtype of the saved LoRA")
    save_every: int = spec(250, ge=1, le=10**8, help="steps between saves")
    max_step_saves_to_keep: int = spec(4, ge=0, le=10**6, help="older step saves are deleted (0: keep all)")
    push_to_hub: bool = spec(False, ignored="this trainer never uploads")


@dataclass
class DatasetConfig:
    folder_path: str = spec(required=True, help="a folder of images (and videos) with same-stem caption files")
    caption_ext: str = spec("txt", help="caption file extension")
    default_caption: Optional[str] = spec(None, help="caption for images without a caption file")
    caption_dropout_rate: float = spec(0.0, ge=0, le=1, help="chance a step trains with an empty caption")
    shuffle_tokens: bool = spec(False, help="shuffle comma-separated tags")
    keep_tokens: int = spec(0, ge=0, le=1000, help="tags kept in place when shuffling")
    cache_latents: bool = spec(True)
    cache_latents_to_disk: bool = spec(False, help="keep encoded latents on disk for the next run")
    resolution: list[int] = spec(default_factory=lambda: [512], ge=16, le=8192, help="one or several sizes")
    num_repeats: int = spec(1, ge=1, le=10000, help="times each item is seen per epoch")
    flip_x: bool = spec(False, help="also train mirrored copies")
    # a folder of control images (depth, lines, pose ...) named like the training images (same stem), for
    # families whose model takes a control image (flex2); control_dropout: chance an item trains without it
    # video: frames per clip (1: images), or several frame buckets; snapped to the family's rule (Wan: 4k+1)
    num_frames: int = spec(1, ge=1, le=1025, help="frames per training clip (1: images); snapped to the model's rule")
    frames: list[int] = spec(default_factory=list, ge=1, le=1025, help="several frame buckets (overrides num_frames)")
    shrink_video_to_frames: bool = spec(True, help="spread the clip's frames over the whole video; false: windows")
    fps: Optional[float] = spec(None, gt=0, le=240, help="resample videos to this rate first; unset: the model's native")
    clips_per_video: int = spec(1, ge=1, le=64, help="windows taken from each video (shrink_video_to_frames: false)")
    do_i2v: bool = spec(False, help="image-to-video models: the clip's first frame is the image condition")
    max_pixels_per_frame: Optional[int] = spec(None, ge=256, le=8192 * 8192, help="cap on a frame's pixel count")
    control_path: Optional[str] = spec(None, help="control images (or videos: VACE) with the items' file names")
    # VACE: masks (1 where the model generates) with the items' names; items without one: the whole frame
    mask_path: Optional[str] = spec(None, help="VACE: mask images or videos with the items' file names")
    # VACE: a reference image per item (the subject or look to keep), trained as a latent frame before the clip's
    reference_path: Optional[str] = spec(None, help="VACE: reference images with the items' file names")
    control_dropout: float = spec(0.0, ge=0, le=1, help="chance an item trains without its control image")
    background_color: str = spec("white", help="under transparent pixels (RGBA images): a colour name or #rrggbb")


@dataclass
class TrainConfig:
    batch_size: int = spec(1, ge=1, le=1024, help="images per step (per GPU)")
    steps: int = spec(1000, ge=1, le=10**8, help="optimizer steps of the whole run")
    lr: float = spec(1e-4, gt=0, le=10, help="learning rate")
    optimizer: str = spec("adamw", choices=OPTIMIZERS, help="adamw8bit needs CUDA and bitsandbytes")
    optimizer_params: dict = spec(default_factory=dict)
    lr_scheduler: str = spec("constant", choices=("constant", "cosine", "linear"), help="lr over the run")
    lr_scheduler_params: dict = spec(default_factory=dict)
    lr_warmup_steps: int = spec(0, ge=0, le=10**8, help="steps of linear warm-up")
    gradient_accumulation: int = spec(1, ge=1, le=1024, aliases=("gradient_accumulation_steps",),
                                      help="micro-batches per optimizer step")
    max_grad_norm: float = spec(1.0, ge=0, le=1e6, help="gradient clipping (0: off)")
    dtype: str = spec("bf16", choices=DTYPES, help="compute dtype of the base model")
    # true / false, the fraction of blocks to checkpoint (memory for speed: 0.5 is about half of each), or auto: the
    # blocks the card has no room for (train/auto_checkpointing.py measures the step before the first one)
    gradient_checkpointing: Union[bool, float, str] = spec(True, ge=0, le=1,
                                                           help="recompute activations: less memory, slower steps;"
                                                           " auto: only the blocks the card has no room for")
    compile: bool = spec(False, help="torch.compile the blocks (CUDA; the first steps of each size take longer)")
    # with compile: the share of a compiled block's activations its backward keeps (inductor's partitioner recomputes
    # the cheapest rest); unset: torch's default, 1 (all). Instead of whole-block checkpointing: Flux 1024^2 fp8 at
    # 0.15 with no block checkpointed ran 0.493 s/step in 19.9 GiB against 0.541 s in 21.9 GiB with 85% of the blocks
    # checkpointed (H100, 2026-12-06, bench/speed_rows_h100_2026-12-06.jsonl)
    compile_memory_budget: Optional[float] = spec(None, gt=0, le=1, help="with train.compile: the share of each"
                                                  " compiled block's activations kept for backward (the rest"
                                                  " recomputed); lower: less memory, more recompute")
    # each micro-step's forward and backward replayed from a CUDA graph per bucket shape (train/cuda_graphs.py):
    # launch-bound steps (SDXL, small images) get faster; each captured shape keeps its activations' memory reserved
    cuda_graphs: bool = spec(False, help="replay each step from a CUDA graph per bucket shape (CUDA; faster"
                             " launch-bound steps, e.g. SDXL; the first steps of each shape run without)")
    # unset: tested on the card at start (trainer/attention.py) and used where correct and faster; false: off
    cudnn_attention: Optional[bool] = spec(None, help="cuDNN attention: unset tests it on the card first;"
                                           " false: off; true: on, untested")
    # blocks whose weights stay in host memory, streamed to the card per block (big models on 24 GB); "auto" picks
    # the number from the card's free memory
    blocks_to_swap: Union[int, str] = spec(0, ge=0, le=1000, help="blocks kept in RAM and streamed to the card;"
                                           " auto: from the free memory")
    # what the forward pass saves for backward (with checkpointing: the blocks' inputs) kept in host memory
    offload_activations: bool = spec(False, aliases=("activation_cpu_offload",),
                                     help="keep the activations saved for backward in RAM (big clips on 24 GB)")
    noise_scheduler: str = spec("flowmatch", ignored="each family trains with its own noise schedule")
    # unset: the family's own default (flow families: sigmoid; SDXL: uniform discrete timesteps)
    timestep_type: Optional[str] = spec(None, choices=TIMESTEP_TYPES,
                                        help="noise levels drawn for training; unset: the family's default")
    linear_timesteps: bool = spec(False, help="weight the loss toward mid noise levels")
    snr_gamma: Optional[float] = spec(None, gt=0, le=1e6, aliases=("min_snr_gamma",))
    noise_offset: float = spec(0.0, ge=0, le=10)
    seed: int = spec(42, ge=0, le=2**63 - 1, help="every random choice of the run derives from it")
    # false (with train_text_encoder: true): only the text encoders train
    train_unet: bool = spec(True, help="train the denoiser (UNet / transformer)")
    # LoRA on the text encoders too (families that support it: sdxl); captions are then encoded every step
    train_text_encoder: bool = spec(False)
    # their own optimizer param group (ai-toolkit's and kohya's name); unset: train.lr
    text_encoder_lr: Optional[float] = spec(None, gt=0, le=10)
    cache_text_embeddings: bool = spec(False, help="encode captions once; the text encoders then leave the card")
    skip_first_sample: bool = spec(False)
    disable_sampling: bool = spec(False)
    # several processes (`torchrun --nproc_per_node N -m trainer job.yaml`): batch_size is per rank; fsdp also
    # shards the frozen base's blocks over the ranks (train/sharding.py), for models one card cannot hold
    distributed: str = spec("auto", choices=("auto", "ddp", "fsdp"),
                            help="data-parallel over a torchrun launch's processes; auto: when launched so, ddp: only"
                                 " so, fsdp: the base model's blocks sharded over the ranks too")
    distributed_timeout: int = spec(300, ge=5, le=86400,
                                    help="seconds a rank waits for the others in a step before the run stops")


EXPERTS = ("high_noise", "low_noise")
# ComfyUI nodes that encode a caption with its images (model.text_image_node)
TEXT_IMAGE_NODE_NAMES = ("TextEncodeQwenImageEditPlus", "TextEncodeQwenImageEdit")
# where Wan 2.2 A14B's experts meet (its boundary ratio on the 0..1 schedule) when model.expert_boundary is unset:
# on ComfyUI's MODEL, whose detection cannot tell A14B from Wan 2.1 14B (same blocks), the text-to-video one
DEFAULT_EXPERT_BOUNDARY = 0.875


@dataclass
class ModelConfig:
    name_or_path: str = spec(required=True)
    arch: Optional[str] = spec(None)
    # diffusers: the engine's own family loaders; comfyui: ComfyUI's loaders (a MODEL from the graph, or headless
    # with model.comfyui_path / $COMFYUI_PATH)
    backend: str = spec("diffusers", choices=("diffusers", "comfyui"))
    comfyui_path: Optional[str] = spec(None)
    # comfyui backend: the type of ComfyUI's CLIP loader for text_encoder_paths (default: from the detected model)
    clip_type: Optional[str] = spec(None)
    # comfyui backend: a LoRA merged into the base for training only, never saved into the trained LoRA (ai-toolkit's
    # name): a de-distill training adapter for a step-distilled model (Z-Image Turbo)
    assistant_lora_path: Optional[str] = spec(None, help="a training adapter merged into the base while training,"
                                              " never saved (Z-Image Turbo's de-distill adapter)")
    is_flux: bool = spec(False)
    is_v3: bool = spec(False)
    is_xl: bool = spec(False)
    text_encoder_paths: list[str] = spec(default_factory=list, aliases=("text_encoder_path",),
                                         help="text encoder files (ComfyUI's models/text_encoders), one per line")
    vae_path: Optional[str] = spec(None, help="the VAE file (ComfyUI's models/vae)")
    tokenizer_paths: list[str] = spec(default_factory=list, aliases=("tokenizer_path",),
                                      help="tokenizer folders; empty: from the model folder or the ComfyUI install")
    t5_max_length: Optional[int] = spec(None, ge=1, le=4096)
    # v-prediction checkpoints without a marker (SDXL); None: from the checkpoint's own markers
    is_v_pred: Optional[bool] = spec(None, aliases=("v_pred",))
    bypass_guidance_embedding: Optional[bool] = spec(None)
    quantize: bool = spec(False, help="store the block weights in fp8 (half of bf16): Flux in 24 GB")
    # opt-in, never the default: the fp8 layers' matmuls (forward and input gradient) in fp8 with torch._scaled_mm,
    # activations quantized per token; needs model.quantize and a card with fp8 tensor cores
    fp8_matmul: bool = spec(False, help="with model.quantize: run the fp8 layers' matmuls in fp8 too (activations"
                            " quantized per token; a card of compute capability 8.9+: RTX 40xx, H100 / H200); opt-in")
    # Wan I2V: CLIP vision H (ComfyUI's models/clip_vision/clip_vision_h.safetensors)
    clip_vision_path: Optional[str] = spec(None, help="CLIP vision file for image-to-video models")
    # flow shifts of the families that have them (Wan): previews, and train.timestep_type: shift
    sample_shift: Optional[float] = spec(None, gt=0, le=100, help="sampling shift of the previews (Wan: 5)")
    train_shift: Optional[float] = spec(None, gt=0, le=100, help="shift of timestep_type: shift (Wan: 3)")
    # guidance-distilled video models (HunyuanVideo): the guidance embedding's value in training steps
    train_guidance: Optional[float] = spec(None, ge=0, le=100, help="guidance embedding while training (HunyuanVideo: 1)")
    # which variant of the family a checkpoint is, where its file name does not say (HiDream-I1: full, dev, fast)
    variant: Optional[str] = spec(None, help="the variant where the file name does not say (HiDream: full, dev, fast)")
    # Wan 2.2 A14B: the expert this run trains (each expert is its own model file and gets its own LoRA): high_noise
    # the noise levels at and above expert_boundary, low_noise those below; the run's name takes the expert's suffix
    expert: Optional[str] = spec(None, choices=EXPERTS, help="Wan 2.2 A14B: the expert this run trains; its LoRA is"
                                 " saved as <name>_high_noise / <name>_low_noise")
    expert_boundary: Optional[float] = spec(None, gt=0, le=0.999, help="where the experts meet on the schedule"
                                            " (Wan 2.2 T2V: 0.875, I2V: 0.9)")
    # ComfyUI's MODEL: the node that reads a caption with its reference image (Qwen-Image-Edit 2509 / 2511 through
    # TextEncodeQwenImageEditPlus, the first Qwen-Image-Edit through TextEncodeQwenImageEdit: their prompts differ)
    text_image_node: Optional[str] = spec(None, choices=TEXT_IMAGE_NODE_NAMES, help="ComfyUI's MODEL: the node that"
                                          " encodes a caption with its reference image (Qwen-Image-Edit:"
                                          " TextEncodeQwenImageEditPlus for 2509 / 2511, the default;"
                                          " TextEncodeQwenImageEdit for the first release)")
    low_vram: bool = spec(False, ignored="memory is set by model.quantize, train.blocks_to_swap and"
                          " train.gradient_checkpointing")
    # ai-toolkit's names for block swap: true = train.blocks_to_swap auto, or the fraction of blocks swapped
    layer_offloading: bool = spec(False)
    layer_offloading_transformer_percent: Optional[float] = spec(None, ge=0, le=1)


@dataclass
class SampleItem:
    prompt: str = spec(required=True)
    width: Optional[int] = spec(None, ge=16, le=8192)
    height: Optional[int] = spec(None, ge=16, le=8192)
    seed: Optional[int] = spec(None, ge=0, le=2**63 - 1)
    neg: Optional[str] = spec(None)
    guidance_scale: Optional[float] = spec(None, ge=0, le=100)
    # an image the model is conditioned on (families that take control images: flex2; the start image: wan21_i2v)
    control_image: Optional[str] = spec(None, aliases=("ctrl_img",))
    # VACE: a reference image the preview keeps (ComfyUI's WanVaceToVideo reference_image)
    reference_image: Optional[str] = spec(None)
    # Flex.2: an image to inpaint and its mask (white: paint), and the control's weight and share of the steps
    inpaint_image: Optional[str] = spec(None)
    inpaint_mask: Optional[str] = spec(None)
    control_strength: Optional[float] = spec(None, ge=0, le=10)
    control_stop: Optional[float] = spec(None, ge=0, le=1)
    # video families: frames of the preview clip (snapped to the model's rule); unset: sample.num_frames
    num_frames: Optional[int] = spec(None, ge=1, le=1025)


@dataclass
class SampleConfig:
    sampler: str = spec("flowmatch", ignored="previews use the family's own Euler sampler")
    sample_every: int = spec(250, ge=1, le=10**8, help="steps between previews")
    width: int = spec(1024, ge=16, le=8192, help="preview width (rounded to the family's multiple)")
    height: int = spec(1024, ge=16, le=8192, help="preview height (rounded to the family's multiple)")
    prompts: list[str] = spec(default_factory=list, help="one prompt per line; [trigger] is the trigger word")
    samples: list[SampleItem] = spec(default_factory=list)
    neg: str = spec("")
    seed: int = spec(42, ge=0, le=2**63 - 1)
    walk_seed: bool = spec(True)
    guidance_scale: float = spec(4.0, ge=0, le=100, help="guidance of the previews (distilled or CFG, per family)")
    num_frames: int = spec(1, ge=1, le=1025, help="video models: frames of each preview clip (1: an image)")
    fps: Optional[float] = spec(None, gt=0, le=240, help="frame rate of the preview videos; unset: the model's native")
    sample_steps: int = spec(20, ge=1, le=1000, help="sampling steps of a preview")

    def items(self) -> list[SampleItem]:
        """Prompts as sample items, with the defaults filled in and seeds walked when asked."""
        raw = list(self.samples) or [SampleItem(prompt=p) for p in self.prompts]
        out = []
        for i, it in enumerate(raw):
            seed = it.seed if it.seed is not None else self.seed + (i if self.walk_seed else 0)
            out.append(
                SampleItem(
                    prompt=it.prompt,
                    width=it.width or self.width,
                    height=it.height or self.height,
                    seed=seed,
                    neg=self.neg if it.neg is None else it.neg,
                    guidance_scale=self.guidance_scale if it.guidance_scale is None else it.guidance_scale,
                    control_image=it.control_image,
                    reference_image=it.reference_image,
                    inpaint_image=it.inpaint_image,
                    inpaint_mask=it.inpaint_mask,
                    control_strength=it.control_strength,
                    control_stop=it.control_stop,
                    num_frames=it.num_frames or self.num_frames,
                )
            )
        return out


@dataclass
class ProcessConfig:
    type: str = spec("sd_trainer")
    training_folder: str = spec("output")
    device: Optional[str] = spec(None)
    trigger_word: Optional[str] = spec(None)
    network: NetworkConfig = spec(default_factory=NetworkConfig)
    save: SaveConfig = spec(default_factory=SaveConfig)
    datasets: list[DatasetConfig] = spec(default_factory=list)
    train: TrainConfig = spec(default_factory=TrainConfig)
    model: ModelConfig = spec(required=True)
    sample: SampleConfig = spec(default_factory=SampleConfig)
    logging: dict = spec(default_factory=dict, ignored="metrics go to metrics.jsonl in the run folder")
    performance_log_every: Optional[int] = spec(None, ignored="every step's time and memory are in metrics.jsonl")


@dataclass
class JobConfig:
    name: str
    process: ProcessConfig
    raw: dict  # the resolved YAML tree, written into the run folder
    warnings: list[str] = dataclasses.field(default_factory=list)
    arch: str = ""

    @property
    def run_dir(self) -> Path:
        return Path(self.process.training_folder) / self.name


LEGACY_ARCH_FLAGS = (("is_flux", "flux"), ("is_v3", "sd3"), ("is_xl", "sdxl"))


def parse_yaml_text(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{source}: YAML syntax error{where}: {problem}") from None


def load_job_file(path: str | Path, overrides: list[str] | None = None, allow_unknown_keys: bool = False) -> JobConfig:
    """A job from its YAML file; relative paths in it are read from the file's folder."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: job file not found")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}); save the job file as UTF-8") from None
    data = parse_yaml_text(text, str(p))
    # the folder as named (not through links): a pack linked into custom_nodes reads ../ from where it is linked
    return load_job_dict(data, overrides, source=str(p), base_dir=Path(os.path.abspath(p)).parent,
                         allow_unknown_keys=allow_unknown_keys)


# keys of process[0] that hold paths: (section, key names); a section ending in [] is a list of mappings
PATH_KEYS = (
    ("", ("training_folder",)),
    ("model", ("name_or_path", "comfyui_path", "text_encoder_paths", "text_encoder_path", "vae_path",
               "tokenizer_paths", "tokenizer_path", "clip_vision_path")),
    ("network", ("pretrained_lora_path",)),
    ("datasets[]", ("folder_path", "control_path", "mask_path", "reference_path")),
    ("sample.samples[]", ("control_image", "ctrl_img", "reference_image", "inpaint_image", "inpaint_mask")),
)
OUTPUT_KEYS = ("training_folder",)
MODEL_SUFFIXES = (".safetensors", ".sft", ".gguf", ".ckpt", ".pt", ".pth", ".bin")


def resolve_job_paths(proc: dict, base: Path, warnings: list[str]) -> None:
    """Relative paths of a job file made absolute against the file's folder (so the job runs the same from any
    folder, and the copy in the run folder names the same files). A relative input that exists only from the
    current folder is taken from there, with one warning naming the keys; outputs always go beside the job file."""
    proc.setdefault("training_folder", "output")
    from_cwd: list[str] = []

    def fix(value: Any, key: str) -> Any:
        if isinstance(value, list):
            return [fix(v, f"{key}[{i}]") for i, v in enumerate(value)]
        if not isinstance(value, str) or not value.strip():
            return value
        p = Path(value).expanduser()
        if p.is_absolute():
            return str(p)
        beside = os.path.normpath(base / p)
        if key.endswith(OUTPUT_KEYS) or Path(beside).exists():
            return beside
        if p.exists():
            from_cwd.append(key.removeprefix("config.process[0]."))
            return str(p.resolve())
        if key.endswith("model.name_or_path") and HUB_ID.match(value) and p.suffix.lower() not in MODEL_SUFFIXES:
            return value  # left as written: a hub id, which the loader explains (nothing is downloaded)
        return beside

    for section, keys in PATH_KEYS:
        nodes: list[tuple[dict, str]] = [(proc, "config.process[0]")]
        for part in [x for x in section.split(".") if x]:
            nxt = []
            for node, where in nodes:
                name = part.rstrip("[]")
                child = node.get(name)
                if part.endswith("[]") and isinstance(child, list):
                    nxt += [(c, f"{where}.{name}[{i}]") for i, c in enumerate(child) if isinstance(c, dict)]
                elif not part.endswith("[]") and isinstance(child, dict):
                    nxt.append((child, f"{where}.{name}"))
            nodes = nxt
        for node, where in nodes:
            for k in keys:
                if k in node:
                    node[k] = fix(node[k], f"{where}.{k}")
    if from_cwd and base != Path.cwd():
        warnings.append(f"{', '.join(from_cwd)}: not found beside the job file ({base}), read from the current folder"
                        f" ({Path.cwd()}); relative paths in a job file are read from its folder")


def apply_override(tree: dict, assignment: str) -> None:
    """`train.steps=10` sets config.process[0].train.steps; a path starting with `config.` is absolute."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. train.steps=10")
    key, raw_value = assignment.split("=", 1)
    value = parse_yaml_text(raw_value, f"--set {key}") if raw_value.strip() else ""
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {assignment!r}: empty key")
    if parts[0] == "config":
        node: Any = tree
    else:
        cfg = tree.setdefault("config", {})
        procs = cfg.setdefault("process", [{}]) if isinstance(cfg, dict) else None
        if not isinstance(procs, list) or not procs or not isinstance(procs[0], dict):
            raise ConfigError(f"--set {key}: config.process must be a list holding a mapping to set keys in")
        node = procs[0]
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            try:
                idx = int(part)
            except ValueError:
                raise ConfigError(f"--set {key}: {part!r} must be a list index") from None
            if idx >= len(node):
                raise ConfigError(f"--set {key}: index {idx} out of range")
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError(f"--set {key}: {part!r} is inside a value that is not a mapping")


def load_job_dict(data: Any, overrides: list[str] | None = None, source: str = "job", base_dir: Path | None = None,
                  allow_unknown_keys: bool = False) -> JobConfig:
    """A job from its YAML tree. `base_dir`: the folder relative paths are read from (the job file's); None:
    paths are used as given. Unknown keys are warnings, with the closest known key; one a single edit away from a
    known key (`stpes`) is an error unless `allow_unknown_keys`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with `job` and `config` at the top")
    data = copy.deepcopy(data)
    for o in overrides or []:
        apply_override(data, o)
    ctx = SchemaContext(allow_unknown_keys)
    if base_dir is not None:
        procs = data.get("config", {}).get("process") if isinstance(data.get("config"), dict) else None
        if isinstance(procs, list) and procs and isinstance(procs[0], dict):
            resolve_job_paths(procs[0], base_dir, ctx.warnings)
    for key in data:
        if key not in ("job", "config", "meta"):
            ctx.unknown(key, "", ("job", "config", "meta"))
    if data.get("job", "extension") not in ("extension", "train"):
        ctx.warnings.append(f"job: {data.get('job')!r} is not 'extension'; treated as a training job")
    cfg = data.get("config")
    if not isinstance(cfg, dict):
        raise ConfigError("config: is required (a mapping with `name` and `process`)")
    name = cfg.get("name")
    if name is None or (isinstance(name, str) and not name.strip()):
        ctx.error("config.name", "is required (the run's name, used for its folder and files)")
    else:
        try:
            name = plain_name(name, "config.name", max_length=120)
        except ConfigError as e:
            ctx.errors.append(str(e))
    for key in cfg:
        if key not in ("name", "process"):
            ctx.unknown(key, "config", ("name", "process"))
    procs = cfg.get("process")
    if not isinstance(procs, list) or not procs:
        ctx.error("config.process", "is required (a list with one training process)")
        ctx.raise_if_errors()
    if len(procs) > 1:
        ctx.warnings.append("config.process: only the first process is run; the others are ignored")
    if not isinstance(procs[0], dict):
        ctx.error("config.process[0]", "expected a mapping")
        ctx.raise_if_errors()
    proc = build(ProcessConfig, procs[0], "config.process[0]", ctx)
    ctx.raise_if_errors()
    from .data.media import color_rgb

    for i, d in enumerate(proc.datasets):
        try:
            color_rgb(d.background_color, f"config.process[0].datasets[{i}].background_color")
        except ConfigError as e:
            ctx.errors.append(str(e))
    if not proc.datasets:
        ctx.error("config.process[0].datasets", "needs at least one dataset (a `folder_path` of images)")
    tc = proc.train
    if tc.train_text_encoder and tc.cache_text_embeddings:
        ctx.error("config.process[0].train.cache_text_embeddings",
                  "cannot be true with train.train_text_encoder: true (the text encoders change every step, so"
                  " captions are encoded anew each step); set it to false")
    if tc.text_encoder_lr is not None and not tc.train_text_encoder:
        ctx.warnings.append("config.process[0].train.text_encoder_lr: ignored without train.train_text_encoder: true")
    if isinstance(tc.gradient_checkpointing, str):
        if tc.gradient_checkpointing.strip().lower() != "auto":
            ctx.error("config.process[0].train.gradient_checkpointing",
                      f"expected true, false, a fraction of the blocks (0 to 1) or auto, got"
                      f" {tc.gradient_checkpointing!r}")
        tc.gradient_checkpointing = "auto"
    if isinstance(tc.blocks_to_swap, str) and tc.blocks_to_swap.strip().lower() != "auto":
        ctx.error("config.process[0].train.blocks_to_swap", f"expected a number of blocks or auto, got {tc.blocks_to_swap!r}")
    if tc.compile_memory_budget is not None and not tc.compile:
        ctx.warnings.append("config.process[0].train.compile_memory_budget: ignored without train.compile: true")
    if tc.compile_memory_budget is not None and tc.gradient_checkpointing == "auto":
        ctx.error("config.process[0].train.compile_memory_budget",
                  "not with train.gradient_checkpointing auto, whose plan is measured on uncompiled blocks that the"
                  " budget does not change; give a fraction of blocks to checkpoint (0: none) instead")
    if proc.model.fp8_matmul and not proc.model.quantize:
        ctx.error("config.process[0].model.fp8_matmul", "needs model.quantize: true (the fp8 matmuls run on the"
                  " weights model.quantize stores in fp8); set both, or fp8_matmul to false")
    if not tc.train_unet and not tc.train_text_encoder:
        ctx.error("config.process[0].train.train_unet", "false with train.train_text_encoder false: nothing would train")
    ctx.raise_if_errors()
    job = JobConfig(name=name, process=proc, raw=data, warnings=ctx.warnings)
    job.arch = resolve_arch(proc.model)
    check_family_keys(job)
    resolve_expert(job)
    return job


def check_distilled(job: JobConfig) -> None:
    """A step-distilled (Turbo) model trained without a de-distill adapter: said before the run, since its few-step
    sampling breaks within a few hundred steps of plain training."""
    mc = job.process.model
    if "turbo" in Path(mc.name_or_path).name.lower() and not mc.assistant_lora_path:
        job.warnings.append(
            f"config.process[0].model.name_or_path: {Path(mc.name_or_path).name} looks step-distilled (Turbo); without"
            " a de-distill training adapter (model.assistant_lora_path, e.g. the Z-Image Turbo training adapter) the"
            " LoRA soon undoes its few-step sampling")


def resolve_expert(job: JobConfig) -> None:
    """model.expert: the boundary set (the family's default where unset) and the run named after the expert, so the
    two experts' runs, files and resume states never mix."""
    mc = job.process.model
    if mc.expert is None:
        if mc.expert_boundary is not None:
            raise ConfigError("config.process[0].model.expert_boundary: set model.expert (high_noise or low_noise)"
                              " too; without it the whole schedule trains")
        return
    if mc.expert_boundary is None:
        defaults = {}
        if mc.backend == "diffusers":
            from .models import registry

            defaults = registry.get_family(job.arch).model_defaults
        mc.expert_boundary = defaults.get("expert_boundary", DEFAULT_EXPERT_BOUNDARY)
    job.name = f"{job.name}_{mc.expert}"


def resolve_arch(model: ModelConfig) -> str:
    """The family `model.arch` (or a legacy is_flux / is_v3 / is_xl flag) names. On the comfyui backend the
    family is ComfyUI's own detection of the checkpoint: arch may be left out there."""
    from .models import registry

    arch = model.arch
    if arch is None:
        for flag, name in LEGACY_ARCH_FLAGS:
            if getattr(model, flag):
                arch = name
                break
    if arch is None and model.backend == "comfyui":
        return "comfyui"
    if arch is None:
        raise ConfigError(
            "config.process[0].model.arch: is required (one of: " + ", ".join(registry.known_arches()) + ")"
        )
    found = registry.canonical_arch(arch)
    if found is None and model.backend == "comfyui":
        return arch.strip().lower()  # a label for the run; ComfyUI's detection decides the family
    if found is None:
        raise ConfigError(
            f"config.process[0].model.arch: unknown arch {arch!r}; known: " + ", ".join(registry.known_arches())
        )
    return found


def check_family_keys(job: JobConfig) -> None:
    """Keys a family cannot honour are refused before anything loads (seconds, not after a 23 GB read)."""
    if job.process.model.backend != "diffusers":
        check_distilled(job)
        return
    if job.process.model.assistant_lora_path:
        raise ConfigError("config.process[0].model.assistant_lora_path: only on model.backend comfyui (ComfyUI's own"
                          " LoRA loader merges it); the engine's loaders do not take a training adapter")
    from .models import registry

    fam = registry.get_family(job.arch)
    tc = job.process.train
    if tc.train_text_encoder and not fam.text_encoder_training:
        raise ConfigError(
            f"config.process[0].train.train_text_encoder: not supported for model.arch {job.arch!r} (only the"
            " denoiser is trained; sdxl trains its text encoders); set it to false"
        )
    mc = job.process.model
    for key in ("sample_shift", "train_shift", "train_guidance", "clip_vision_path", "variant", "expert",
                "expert_boundary", "text_image_node"):
        if getattr(mc, key) is not None and key not in fam.model_defaults and not (key == "clip_vision_path"
                                                                                 and fam.takes_control and fam.video):
            raise ConfigError(f"config.process[0].model.{key}: not used by model.arch {job.arch!r}; remove it")
    if not fam.video:
        for i, d in enumerate(job.process.datasets):
            if d.num_frames > 1 or any(f > 1 for f in d.frames) or d.do_i2v:
                key = "do_i2v" if d.do_i2v else "num_frames" if d.num_frames > 1 else "frames"
                raise ConfigError(f"config.process[0].datasets[{i}].{key}: model.arch {job.arch!r} trains images;"
                                  " clips need a video family (wan21 ...)")
    for i, d in enumerate(job.process.datasets):
        if d.mask_path is not None and not fam.takes_masks:
            raise ConfigError(f"config.process[0].datasets[{i}].mask_path: model.arch {job.arch!r} takes no masks"
                              " (flex2, wan21_vace do)")
        if d.reference_path is not None and not fam.takes_references:
            raise ConfigError(f"config.process[0].datasets[{i}].reference_path: model.arch {job.arch!r} takes no"
                              " reference images (wan21_vace does)")
        if fam.requires_control and d.control_path is None and not d.do_i2v and d.reference_path is None:
            raise ConfigError(f"config.process[0].datasets[{i}]: {fam.requires_control}")
    for i, it in enumerate(job.process.sample.samples):
        key = f"config.process[0].sample.samples[{i}]"
        for name in ("inpaint_image", "inpaint_mask", "control_strength", "control_stop"):
            if getattr(it, name) is not None and not fam.takes_inpaint:
                raise ConfigError(f"{key}.{name}: model.arch {job.arch!r} takes no {name} (flex2 does); remove it")
        if (it.inpaint_image is None) != (it.inpaint_mask is None):
            have, need = ("inpaint_image", "inpaint_mask") if it.inpaint_mask is None else ("inpaint_mask",
                                                                                              "inpaint_image")
            raise ConfigError(f"{key}.{need}: {have} needs {need} beside it (the image to inpaint and its mask,"
                              " white where the model paints)")
        if it.reference_image and not fam.takes_references:
            raise ConfigError(f"config.process[0].sample.samples[{i}].reference_image: model.arch {job.arch!r}"
                              " takes no reference image (wan21_vace does)")
    if not fam.takes_control:
        for i, d in enumerate(job.process.datasets):
            if d.control_path is not None:
                raise ConfigError(
                    f"config.process[0].datasets[{i}].control_path: model.arch {job.arch!r} takes no control images"
                    " (flex2 does); remove control_path or use a family that takes them"
                )
        for i, it in enumerate(job.process.sample.samples):
            if it.control_image:
                raise ConfigError(f"config.process[0].sample.samples[{i}].control_image: model.arch {job.arch!r}"
                                  " takes no control image (flex2 does)")


def dump_job_yaml(job: JobConfig) -> str:
    return yaml.safe_dump(job.raw, sort_keys=False, allow_unicode=True)
