"""One preparation for every model, whatever its backend and whoever loaded it (the CLI's loaders or a host
such as ComfyUI handing over its own MODEL): the same job gives the same prepared model.

Two phases, around the encoding of the dataset:
  before: fp8 storage of the block weights (`model.quantize`; their matmuls in fp8 with `model.fp8_matmul`), the
          attention backend, gradient checkpointing, and the encoders (text, VAE) on the training device, alone
          there;
  after:  the text encoders leave the card (released, or parked on the CPU when a session will encode new
          prompts later), the denoiser moves onto it, the network is attached, and the blocks are compiled.
"""

from __future__ import annotations

import math

import logging
from typing import Callable

import torch

from .config import JobConfig, ProcessConfig
from .errors import ConfigError
from .models.base import TrainingModel
from .models.offload import BlockSwap, offload_activations
from .models.quantize import fp8_matmul_problem, set_fp8_matmul

log = logging.getLogger("trainer")


def checkpoint_fraction(setting: bool | float | str | None) -> float:
    """train.gradient_checkpointing as the fraction of blocks to checkpoint (auto: all of them until the trainer's
    plan, train/auto_checkpointing.py, leaves some unchecked)."""
    if setting is True or setting == "auto":
        return 1.0
    return float(setting or 0.0)


def configure_attention(device: torch.device) -> None:
    # cuDNN's SDPA backward failed on Flux-sized attention on the H100 / H200 with torch 2.11 (illegal memory access
    # or NaN; see docs/architecture.md): off until choose_attention's self-test says it works for this model
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)


# why an unset train.cudnn_attention stays off without train.compile, whatever the self-test says
EAGER_CUDNN = ("eager Flux training (fp8, 1024²) with the self-test's verdict went NaN at step 2 on an H200 with"
               " torch 2.11, and ran with cuDNN off (2026-12-03, bench/flux_eager_cudnn_h200.jsonl); compiled steps"
               " ran finite with it on")


def cudnn_setting(setting: bool | None, compiled: bool) -> bool | None:
    """What decides cuDNN attention: True / False (train.cudnn_attention, or off for an eager step), None (the
    self-test). The self-test's verdict is trusted for compiled blocks only (EAGER_CUDNN)."""
    if setting is None and not compiled:
        return False
    return setting


def choose_attention(model: TrainingModel, job: JobConfig, sizes: list[tuple[int, int, int]],
                     report: Callable[[str], None]) -> None:
    """train.cudnn_attention: unset, cuDNN attention is turned on where the self-test at the model's attention
    shapes (the training sizes) finds it correct and faster on this card, for compiled blocks (train.compile);
    false: off; true: on, untested."""
    from . import attention

    if model.device.type != "cuda":
        return
    tc = job.process.train
    setting = cudnn_setting(tc.cudnn_attention, tc.compile)
    if setting is not None:
        attention.use_cudnn(setting)
        if tc.cudnn_attention is None:
            if model.attention_shapes(sizes, tc.batch_size):  # a family the self-test would have run for
                report(f"cuDNN attention off without train.compile: {EAGER_CUDNN}")
        else:
            report(f"train.cudnn_attention: {'on (untested)' if setting else 'off'}")
        return
    shapes = model.attention_shapes(sizes, job.process.train.batch_size)
    if not shapes:
        return  # not declared for this family: cuDNN stays off, as configure_attention left it
    v = attention.self_test(shapes, model.dtype, model.device)
    attention.use_cudnn(v["cudnn"])
    cached = ", cached" if v.get("cached") else ""
    report(f"attention self-test ({len(shapes)} shapes{cached}): cuDNN attention {'on' if v['cudnn'] else 'off'}"
           f" ({v['why']})")


def require_fp8_matmul(model: TrainingModel) -> None:
    """model.fp8_matmul is refused where it cannot run: a backend that keeps its host's layers (ComfyUI's MODEL), or a
    training device that is no CUDA card with fp8 tensor cores (compute capability 8.9+)."""
    if model.fp8_matmul_refusal:
        raise ConfigError(f"config.process[0].model.fp8_matmul: {model.fp8_matmul_refusal}")
    problem = fp8_matmul_problem(model.device)
    if problem:
        raise ConfigError(f"config.process[0].model.fp8_matmul: needs a CUDA card with fp8 tensor cores (compute"
                          f" capability 8.9 or newer: RTX 40xx / Ada, H100 / H200, Blackwell); {problem}. Set it to"
                          " false: model.quantize alone keeps the fp8 weights and dequantizes them per matmul")


def prepare_for_encoding(model: TrainingModel, job: JobConfig, report: Callable[[str], None]) -> None:
    tc, mc = job.process.train, job.process.model
    if mc.fp8_matmul:
        require_fp8_matmul(model)  # refused before any of the work below
    if mc.quantize:
        # the loaders leave the denoiser on the CPU: quantized there, it moves to the card at fp8 size
        n, saved = model.quantize()
        report(f"model.quantize: {n} block linears stored in float8 e4m3 ({saved / 1e9:.1f} GB less)")
    if mc.fp8_matmul:
        n = set_fp8_matmul(model.denoiser)
        report(f"model.fp8_matmul: {n} of the denoiser's fp8 linears run their matmuls in fp8 (torch._scaled_mm,"
               " activations quantized per token; shapes it cannot take are dequantized as before)")
    if mc.text_image_node:
        model.use_text_image_node(mc.text_image_node)
    configure_attention(model.device)
    model.set_gradient_checkpointing(checkpoint_fraction(tc.gradient_checkpointing))
    model.place_text_encoders(model.device)
    if isinstance(model.vae, torch.nn.Module):
        model.vae.to(model.device)


def prepare_for_training(model: TrainingModel, job: JobConfig, texts_cached: bool, keep_text_encoders: bool,
                         report: Callable[[str], None], largest: tuple[int, int, int] | None = None,
                         place: bool = True) -> BlockSwap | None:
    """Everything after the dataset is encoded, before the network is attached. `largest`: the biggest training
    size (width, height, frames), which block swap's auto setting leaves room for. `place`: false when the
    denoiser is placed by sharding it over several ranks (train/sharding.py) instead of moved whole."""
    tc = job.process.train
    if texts_cached and not tc.train_text_encoder:
        if keep_text_encoders:
            model.place_text_encoders("cpu")  # back on the card only while a new prompt is encoded
        else:
            model.release_text_encoders()
    swap = install_block_swap(model, job, report, largest)  # before placement: swapped weights never reach the card at once
    if place:
        model.place_denoiser()  # after the encoders had the card to themselves
    if tc.offload_activations:
        offload_activations(model.denoiser)
        report("train.offload_activations: the activations saved for backward are kept in host memory")
    return swap


def swap_setting(process: ProcessConfig) -> int | str:
    """train.blocks_to_swap, or ai-toolkit's model.layer_offloading (true: auto; a percent: that share of blocks)."""
    tc, mc = process.train, process.model
    if tc.blocks_to_swap not in (0, "0"):
        return tc.blocks_to_swap if isinstance(tc.blocks_to_swap, int) else "auto"
    if mc.layer_offloading:
        return f"fraction:{mc.layer_offloading_transformer_percent}" if mc.layer_offloading_transformer_percent \
            is not None else "auto"
    return 0


def install_block_swap(model: TrainingModel, job: JobConfig, report: Callable[[str], None],
                       largest: tuple[int, int, int] | None = None) -> BlockSwap | None:
    setting = swap_setting(job.process)
    if setting == 0:
        return None
    blocks = model.repeated_blocks()
    if model.host_places_weights:
        reserve_for_partial_load(model, job, report, blocks, setting, largest)
        return None
    if isinstance(setting, str) and setting.startswith("fraction:"):
        n = round(float(setting.split(":", 1)[1]) * len(blocks))
    elif setting == "auto":
        tc = job.process.train
        n = auto_blocks_to_swap(model, blocks, largest and activation_bytes(model, blocks, largest, tc.batch_size,
                                                                             tc.offload_activations))
    else:
        n = int(setting)
    n = min(n, len(blocks))
    if n == 0:
        report("train.blocks_to_swap auto: every block fits on the card; none swapped")
        return None
    if model.checkpointed_blocks() != blocks:
        # a swapped block's weights leave the card after its forward: nothing may keep them for backward
        report("train.blocks_to_swap: gradient checkpointing turned on for every block (swapped blocks need it)")
        model.set_gradient_checkpointing(1.0)
    swap = BlockSwap(blocks, n, model.device)
    model.block_swap = swap
    report(f"block swap: {n} of {len(blocks)} blocks ({swap.swapped_bytes / 2**30:.1f} GiB) kept in host memory")
    return swap


def reserve_for_partial_load(model: TrainingModel, job: JobConfig, report: Callable[[str], None], blocks: list,
                             setting: int | str, largest: tuple[int, int, int] | None) -> None:
    """Block swap on a model whose host places the weights (ComfyUI's MODEL): the host loads what fits beside the
    step's memory and streams the rest per layer; every block checkpointed, so a streamed weight is held only while
    its block runs (forward, and its recompute in backward)."""
    if setting != "auto":
        raise ConfigError(f"train.blocks_to_swap: {setting!r} on ComfyUI's MODEL, whose own model management loads"
                          " what fits by memory, not by block: use auto")
    tc = job.process.train
    need = activation_bytes(model, blocks, largest, tc.batch_size, tc.offload_activations) if largest else 0
    reserve = max(4 * 2**30, need) + HEADROOM_BYTES
    if model.checkpointed_blocks() != blocks:
        report("train.blocks_to_swap: gradient checkpointing turned on for every block (streamed weights need it)")
        model.set_gradient_checkpointing(1.0)
    model.reserve_memory(reserve)
    report(f"train.blocks_to_swap auto: ComfyUI loads the weights that fit beside {reserve / 2**30:.1f} GiB for the"
           " step and streams the rest from host memory")


# bytes a training step holds per token and hidden unit beside the resident weights (a checkpointed block's recompute:
# norms, q/k/v, attention, the 4x MLP; swap slots, gradients), fitted to Wan 14B at 832x480x81 with fp8 blocks and
# offloaded activations (26 of 40 blocks swapped peaked at 17.4 GiB: ~12.5 GiB beside the resident blocks), plus ~2 GiB
ACTIVATION_BYTES_PER_TOKEN_UNIT = 96
# kept free under the cap for the allocator's fragmentation and the CUDA context's growth (HunyuanVideo 13B fp8, no
# swap, peaked at 23.25 of a 24 GiB cap without it)
HEADROOM_BYTES = 2**30


def activation_bytes(model: TrainingModel, blocks: list, largest: tuple[int, int, int], batch: int = 1,
                     offloaded: bool = False) -> int:
    """What a training step at the largest size needs beside the weights: one block's recompute (tokens x hidden x
    a fitted constant) times the batch, plus the blocks' saved inputs unless they are `offloaded` to host memory."""
    shape = model.latent_shape(*largest)
    tokens = math.prod(shape[2:]) // max(1, model.patch) ** 2
    mats = [tuple(p.shape) for p in blocks[0].parameters() if p.dim() == 2]
    if not mats:
        return 0
    hidden = min(max(mats, key=lambda s: s[0] * s[1]))  # the MLP's widest matrix: (4 x hidden, hidden)
    need = batch * tokens * hidden * ACTIVATION_BYTES_PER_TOKEN_UNIT
    if not offloaded:
        need += batch * tokens * hidden * 2 * len(blocks)  # each block's input, kept for its recompute
    return need


def card(device: torch.device) -> torch.device:
    """A CUDA device with its index ("cuda" is the current card; the per-process cap is read per index)."""
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def memory_limit(device: torch.device) -> int:
    """Bytes this process may allocate on the card: its per-process cap, and no more than is free beside what its
    allocator already holds."""
    device = card(device)
    free, total = torch.cuda.mem_get_info(device)
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda d: 1.0)(device)
    return int(min(fraction * total, free + torch.cuda.memory_reserved(device)))


def auto_blocks_to_swap(model: TrainingModel, blocks: list, activations: int | None = None) -> int:
    """How many blocks to swap so the rest fits the card's free memory (within its per-process cap), leaving
    room for the activations (`activations` bytes, at least max(4 GiB, a quarter of the budget)): a heuristic; set a
    number where it guesses wrong."""
    if model.device.type != "cuda":
        return 0
    device = card(model.device)
    # the model's own weights already on this card are counted below, not as used memory
    here = sum(t.numel() * t.element_size() for t in model.denoiser.parameters() if t.device == device)
    budget = memory_limit(device) - torch.cuda.memory_reserved(device) + here
    sizes = [sum(t.numel() * t.element_size() for t in b.parameters()) for b in blocks]
    rest = sum(t.numel() * t.element_size() for t in model.denoiser.parameters()) - sum(sizes)
    room = budget - rest - max(4 * 2**30, budget / 4, activations or 0) - HEADROOM_BYTES
    n, resident = 0, sum(sizes)
    while resident > room and n < len(blocks):
        n += 1
        resident -= sizes[-n]
    return n


def compile_model(model: TrainingModel, job: JobConfig, report: Callable[[str], None]) -> None:
    """Regional compile, after the network's hooks are attached (they are traced into the blocks)."""
    if not job.process.train.compile:
        return
    if model.device.type != "cuda":
        log.warning("train.compile: needs a CUDA device; ignored on %s", model.device.type)
        return
    set_memory_budget(job.process.train.compile_memory_budget, report)
    where = persistent_compile_cache()
    report(f"compiling the model's blocks (the first steps of each new size take longer; compiled kernels are"
           f" kept in {where} for the next run)")
    model.compile_blocks()


def set_memory_budget(budget: float | None, report: Callable[[str], None]) -> None:
    """train.compile_memory_budget: inductor's partitioner keeps this share of a compiled graph's activations for
    backward and recomputes the rest; None restores torch's default (1: keep all), so an earlier job of the same
    process (a ComfyUI session) does not leak its budget into the next."""
    import torch._functorch.config as functorch_config

    functorch_config.activation_memory_budget = 1.0 if budget is None else float(budget)
    if budget is not None:
        report(f"train.compile_memory_budget {budget:g}: the compiled blocks keep that share of their activations"
               " for backward and recompute the rest")


def persistent_compile_cache() -> str:
    """Inductor's cache (FX graphs, autotuning, Triton kernels) in the user's cache folder, so a second run of the
    same model and sizes loads its compiled blocks instead of compiling them again; torch's own default is a
    folder under /tmp, lost on reboot where /tmp is cleared. A TORCHINDUCTOR_CACHE_DIR the user set is kept."""
    import os

    from .paths import user_cache_dir

    if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(user_cache_dir() / "inductor")
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]
