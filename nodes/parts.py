"""Dataset, network and training settings: each node emits the YAML section it stands for."""

from comfy_api.latest import io

from ..trainer.networks.network import NETWORK_TYPES
from .types import CATEGORY, EriDatasets, EriNetworkT, EriSettings


def _resolutions(text: str) -> list[int]:
    return [int(x) for x in text.replace(",", " ").split() if x.strip()]


class EriDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EriDataset", display_name="Training Dataset", category=CATEGORY,
            inputs=[
                io.String.Input("folder_path", default=""),
                io.String.Input("trigger_word", default=""),
                io.String.Input("caption_ext", default="txt"),
                io.String.Input("default_caption", default=""),
                io.String.Input("resolution", default="512", tooltip="one or several, e.g. 512, 768, 1024"),
                io.Float.Input("caption_dropout_rate", default=0.05, min=0.0, max=1.0, step=0.01),
                io.Int.Input("num_repeats", default=1, min=1, max=1000),
                io.Boolean.Input("flip_x", default=False),
                io.Boolean.Input("shuffle_tokens", default=False),
                io.Int.Input("keep_tokens", default=0, min=0, max=100),
                io.Boolean.Input("cache_latents_to_disk", default=True),
                EriDatasets.Input("datasets", optional=True, tooltip="chain datasets: this one is added"),
                io.String.Input("control_path", default="", optional=True,
                                tooltip="control images with the images' file names (Flex.2); empty: none"),
                io.Float.Input("control_dropout", default=0.0, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="chance an item trains without its control image"),
            ],
            outputs=[EriDatasets.Output(display_name="datasets")],
        )

    @classmethod
    def execute(cls, folder_path, trigger_word, caption_ext, default_caption, resolution, caption_dropout_rate,
                num_repeats, flip_x, shuffle_tokens, keep_tokens, cache_latents_to_disk, datasets=None,
                control_path="", control_dropout=0.0) -> io.NodeOutput:
        d = {"folder_path": folder_path.strip(), "caption_ext": caption_ext, "resolution": _resolutions(resolution),
             "caption_dropout_rate": caption_dropout_rate, "num_repeats": num_repeats, "flip_x": flip_x,
             "shuffle_tokens": shuffle_tokens, "keep_tokens": keep_tokens,
             "cache_latents_to_disk": cache_latents_to_disk}
        if default_caption:
            d["default_caption"] = default_caption
        if trigger_word.strip():
            d["trigger_word"] = trigger_word.strip()
        if (control_path or "").strip():
            d["control_path"] = control_path.strip()
            d["control_dropout"] = control_dropout
        return io.NodeOutput(list(datasets or []) + [d])


class EriNetwork(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EriNetwork", display_name="Training Network", category=CATEGORY,
            inputs=[
                io.Combo.Input("type", options=list(NETWORK_TYPES), default="lora"),
                io.Int.Input("rank", default=16, min=1, max=1024),
                io.Float.Input("alpha", default=16.0, min=0.01, max=4096.0, step=0.01),
                io.Int.Input("conv_rank", default=0, min=0, max=1024, tooltip="0: no conv layers (LoCon: = rank)"),
                io.Float.Input("conv_alpha", default=0.0, min=0.0, max=4096.0, step=0.01, tooltip="0: = conv_rank"),
                io.Int.Input("lokr_factor", default=-1, min=-1, max=1024),
                io.Boolean.Input("lokr_full_rank", default=False),
                io.String.Input("only_if_contains", default="", tooltip="comma-separated layer name parts"),
                io.String.Input("ignore_if_contains", default=""),
            ],
            outputs=[EriNetworkT.Output(display_name="network")],
        )

    @classmethod
    def execute(cls, type, rank, alpha, conv_rank, conv_alpha, lokr_factor, lokr_full_rank, only_if_contains,
                ignore_if_contains) -> io.NodeOutput:
        n = {"type": type, "linear": rank, "linear_alpha": alpha, "lokr_factor": lokr_factor,
             "lokr_full_rank": lokr_full_rank}
        if conv_rank:
            n["conv"] = conv_rank
            n["conv_alpha"] = conv_alpha or conv_rank
        kw = {}
        for key, text in (("only_if_contains", only_if_contains), ("ignore_if_contains", ignore_if_contains)):
            parts = [p.strip() for p in text.split(",") if p.strip()]
            if parts:
                kw[key] = parts
        if kw:
            n["network_kwargs"] = kw
        return io.NodeOutput(n)


class EriTrainSettings(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EriTrainSettings", display_name="Training Settings", category=CATEGORY,
            inputs=[
                io.String.Input("name", default="my_lora"),
                io.String.Input("training_folder", default="", tooltip="empty: ComfyUI's output/eridiffusion"),
                io.Float.Input("lr", default=1e-4, min=1e-8, max=10.0, step=1e-6),
                io.Combo.Input("optimizer", options=["adamw", "adamw8bit", "prodigy", "adafactor"], default="adamw"),
                io.Combo.Input("lr_scheduler", options=["constant", "cosine", "linear"], default="constant"),
                io.Int.Input("lr_warmup_steps", default=0, min=0, max=100000),
                io.Int.Input("batch_size", default=1, min=1, max=256),
                io.Int.Input("gradient_accumulation", default=1, min=1, max=1024),
                io.Combo.Input("timestep_type", options=["sigmoid", "linear", "shift", "flux_shift"], default="sigmoid"),
                io.Combo.Input("dtype", options=["bf16", "fp16", "fp32"], default="bf16"),
                io.Boolean.Input("gradient_checkpointing", default=True),
                io.Boolean.Input("cache_text_embeddings", default=True),
                io.Int.Input("seed", default=42, min=0, max=2**31 - 1),
                io.Int.Input("save_every", default=250, min=1, max=1000000),
                io.Combo.Input("save_dtype", options=["float16", "bf16", "float32"], default="float16"),
                io.Int.Input("max_step_saves_to_keep", default=4, min=0, max=1000),
                io.Int.Input("sample_every", default=0, min=0, max=1000000, tooltip="0: no samples while training"),
                io.String.Input("sample_prompts", default="", multiline=True, tooltip="one prompt per line"),
                io.Int.Input("sample_width", default=1024, min=64, max=4096, step=16),
                io.Int.Input("sample_height", default=1024, min=64, max=4096, step=16),
                io.Int.Input("sample_steps", default=20, min=1, max=200),
                io.Float.Input("guidance_scale", default=4.0, min=0.0, max=30.0, step=0.1),
            ],
            outputs=[EriSettings.Output(display_name="settings")],
        )

    @classmethod
    def execute(cls, name, training_folder, lr, optimizer, lr_scheduler, lr_warmup_steps, batch_size,
                gradient_accumulation, timestep_type, dtype, gradient_checkpointing, cache_text_embeddings, seed,
                save_every, save_dtype, max_step_saves_to_keep, sample_every, sample_prompts, sample_width,
                sample_height, sample_steps, guidance_scale) -> io.NodeOutput:
        prompts = [p.strip() for p in sample_prompts.splitlines() if p.strip()]
        settings = {
            "name": name,
            "train": {"lr": lr, "optimizer": optimizer, "lr_scheduler": lr_scheduler,
                      "lr_warmup_steps": lr_warmup_steps, "batch_size": batch_size,
                      "gradient_accumulation": gradient_accumulation, "timestep_type": timestep_type,
                      "dtype": dtype, "gradient_checkpointing": gradient_checkpointing,
                      "cache_text_embeddings": cache_text_embeddings, "seed": seed,
                      "disable_sampling": not (sample_every and prompts)},
            "save": {"dtype": save_dtype, "save_every": save_every, "max_step_saves_to_keep": max_step_saves_to_keep},
            "sample": {"sample_every": max(1, sample_every), "prompts": prompts, "width": sample_width,
                       "height": sample_height, "sample_steps": sample_steps, "guidance_scale": guidance_scale},
        }
        if training_folder.strip():
            settings["training_folder"] = training_folder.strip()
        return io.NodeOutput(settings)
