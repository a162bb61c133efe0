"""The ai-toolkit job format (YAML) -> typed config.

Every error names the key path (`config.process[0].train.lr: expected a number, got 'fast'`);
unknown keys become warnings; `--set train.steps=10` overrides apply to process[0].
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .errors import ConfigError
from .schema import SchemaContext, build, spec

DTYPES = ("fp32", "float32", "fp16", "float16", "bf16", "bfloat16")


@dataclass
class NetworkConfig:
    type: str = spec("lora", choices=("lora", "locon", "lokr", "loha", "dora"))
    linear: int = spec(16, ge=1, aliases=("rank",))
    linear_alpha: Optional[float] = spec(None, gt=0, aliases=("alpha",))
    conv: Optional[int] = spec(None, ge=1, aliases=("conv_rank",))
    conv_alpha: Optional[float] = spec(None, gt=0)
    lokr_factor: int = spec(-1)
    lokr_full_rank: bool = spec(False)
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
    dtype: str = spec("float16", choices=DTYPES)
    save_every: int = spec(250, ge=1)
    max_step_saves_to_keep: int = spec(4, ge=0)
    push_to_hub: bool = spec(False)


@dataclass
class DatasetConfig:
    folder_path: str = spec(required=True)
    caption_ext: str = spec("txt")
    default_caption: Optional[str] = spec(None)
    caption_dropout_rate: float = spec(0.0, ge=0, le=1)
    shuffle_tokens: bool = spec(False)
    keep_tokens: int = spec(0, ge=0)
    cache_latents: bool = spec(True)
    cache_latents_to_disk: bool = spec(False)
    resolution: list[int] = spec(default_factory=lambda: [512])
    num_repeats: int = spec(1, ge=1)
    flip_x: bool = spec(False)
    # a folder of control images (depth, lines, pose ...) named like the training images (same stem), for
    # families whose model takes a control image (flex2); control_dropout: chance an item trains without it
    control_path: Optional[str] = spec(None)
    control_dropout: float = spec(0.0, ge=0, le=1)


@dataclass
class TrainConfig:
    batch_size: int = spec(1, ge=1)
    steps: int = spec(1000, ge=1)
    lr: float = spec(1e-4, gt=0)
    optimizer: str = spec("adamw", choices=("adamw", "adamw8bit", "prodigy", "adafactor"))
    optimizer_params: dict = spec(default_factory=dict)
    lr_scheduler: str = spec("constant", choices=("constant", "cosine", "linear"))
    lr_scheduler_params: dict = spec(default_factory=dict)
    lr_warmup_steps: int = spec(0, ge=0)
    gradient_accumulation: int = spec(1, ge=1, aliases=("gradient_accumulation_steps",))
    max_grad_norm: float = spec(1.0, ge=0)
    dtype: str = spec("bf16", choices=DTYPES)
    # true / false, or the fraction of blocks to checkpoint (memory for speed: 0.5 is about half of each)
    gradient_checkpointing: Union[bool, float] = spec(True)
    compile: bool = spec(False)
    noise_scheduler: str = spec("flowmatch")
    # unset: the family's own default (flow families: sigmoid; SDXL: uniform discrete timesteps)
    timestep_type: Optional[str] = spec(None, choices=("sigmoid", "linear", "shift", "flux_shift"))
    linear_timesteps: bool = spec(False)
    snr_gamma: Optional[float] = spec(None, gt=0, aliases=("min_snr_gamma",))
    noise_offset: float = spec(0.0, ge=0)
    seed: int = spec(42, ge=0)
    train_unet: bool = spec(True)
    # LoRA on the text encoders too (families that support it: sdxl); captions are then encoded every step
    train_text_encoder: bool = spec(False)
    # their own optimizer param group (ai-toolkit's and kohya's name); unset: train.lr
    text_encoder_lr: Optional[float] = spec(None, gt=0)
    cache_text_embeddings: bool = spec(False)
    skip_first_sample: bool = spec(False)
    disable_sampling: bool = spec(False)


@dataclass
class ModelConfig:
    name_or_path: str = spec(required=True)
    arch: Optional[str] = spec(None)
    is_flux: bool = spec(False)
    is_v3: bool = spec(False)
    is_xl: bool = spec(False)
    text_encoder_paths: list[str] = spec(default_factory=list, aliases=("text_encoder_path",))
    vae_path: Optional[str] = spec(None)
    tokenizer_paths: list[str] = spec(default_factory=list, aliases=("tokenizer_path",))
    t5_max_length: Optional[int] = spec(None, ge=1)
    # v-prediction checkpoints without a marker (SDXL); None: from the checkpoint's own markers
    is_v_pred: Optional[bool] = spec(None, aliases=("v_pred",))
    bypass_guidance_embedding: Optional[bool] = spec(None)
    quantize: bool = spec(False)
    low_vram: bool = spec(False)


@dataclass
class SampleItem:
    prompt: str = spec(required=True)
    width: Optional[int] = spec(None, ge=16)
    height: Optional[int] = spec(None, ge=16)
    seed: Optional[int] = spec(None, ge=0)
    neg: Optional[str] = spec(None)
    guidance_scale: Optional[float] = spec(None, ge=0)
    # an image the model is conditioned on (families that take control images: flex2)
    control_image: Optional[str] = spec(None, aliases=("ctrl_img",))


@dataclass
class SampleConfig:
    sampler: str = spec("flowmatch")
    sample_every: int = spec(250, ge=1)
    width: int = spec(1024, ge=16)
    height: int = spec(1024, ge=16)
    prompts: list[str] = spec(default_factory=list)
    samples: list[SampleItem] = spec(default_factory=list)
    neg: str = spec("")
    seed: int = spec(42, ge=0)
    walk_seed: bool = spec(True)
    guidance_scale: float = spec(4.0, ge=0)
    sample_steps: int = spec(20, ge=1)

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
    logging: dict = spec(default_factory=dict)
    performance_log_every: Optional[int] = spec(None)


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


def load_job_file(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: job file not found")
    data = parse_yaml_text(p.read_text(encoding="utf-8"), str(p))
    return load_job_dict(data, overrides, source=str(p))


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
        node = tree.setdefault("config", {}).setdefault("process", [{}])[0]
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


def load_job_dict(data: Any, overrides: list[str] | None = None, source: str = "job") -> JobConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with `job` and `config` at the top")
    data = copy.deepcopy(data)
    for o in overrides or []:
        apply_override(data, o)
    ctx = SchemaContext()
    for key in data:
        if key not in ("job", "config", "meta"):
            ctx.warnings.append(f"{key}: unknown key, ignored")
    if data.get("job", "extension") not in ("extension", "train"):
        ctx.warnings.append(f"job: {data.get('job')!r} is not 'extension'; treated as a training job")
    cfg = data.get("config")
    if not isinstance(cfg, dict):
        raise ConfigError("config: is required (a mapping with `name` and `process`)")
    name = cfg.get("name")
    if not isinstance(name, str) or not name.strip():
        ctx.error("config.name", "is required (the run's name, used for its folder and files)")
    elif any(c in name for c in "/\\") or name in (".", ".."):
        ctx.error("config.name", f"must be a plain name without path separators, got {name!r}")
    for key in cfg:
        if key not in ("name", "process"):
            ctx.warnings.append(f"config.{key}: unknown key, ignored")
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
    if not proc.datasets:
        ctx.error("config.process[0].datasets", "needs at least one dataset (a `folder_path` of images)")
    if proc.save.push_to_hub:
        ctx.warnings.append("config.process[0].save.push_to_hub: this trainer never uploads; ignored")
    tc = proc.train
    if tc.train_text_encoder and tc.cache_text_embeddings:
        ctx.error("config.process[0].train.cache_text_embeddings",
                  "cannot be true with train.train_text_encoder: true (the text encoders change every step, so"
                  " captions are encoded anew each step); set it to false")
    if tc.text_encoder_lr is not None and not tc.train_text_encoder:
        ctx.warnings.append("config.process[0].train.text_encoder_lr: ignored without train.train_text_encoder: true")
    ctx.raise_if_errors()
    job = JobConfig(name=name.strip(), process=proc, raw=data, warnings=ctx.warnings)
    job.arch = resolve_arch(proc.model)
    if tc.train_text_encoder:
        from .models import registry

        if not registry.get_family(job.arch).text_encoder_training:
            raise ConfigError(
                f"config.process[0].train.train_text_encoder: not supported for model.arch {job.arch!r} (only the"
                " denoiser is trained; sdxl trains its text encoders); set it to false"
            )
    return job


def resolve_arch(model: ModelConfig) -> str:
    from .models import registry

    arch = model.arch
    if arch is None:
        for flag, name in LEGACY_ARCH_FLAGS:
            if getattr(model, flag):
                arch = name
                break
    if arch is None:
        raise ConfigError(
            "config.process[0].model.arch: is required (one of: " + ", ".join(registry.known_arches()) + ")"
        )
    arch = arch.strip().lower()
    if arch not in registry.known_arches():
        raise ConfigError(
            f"config.process[0].model.arch: unknown arch {arch!r}; known: " + ", ".join(registry.known_arches())
        )
    return arch


def dump_job_yaml(job: JobConfig) -> str:
    return yaml.safe_dump(job.raw, sort_keys=False, allow_unicode=True)
