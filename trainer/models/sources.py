"""Where a family's parts come from, resolved the same way for every family.

In order: the files the config names (`model.text_encoder_paths`, `model.vae_path`, `model.tokenizer_paths`:
ComfyUI's single files or diffusers component folders), then the components of a diffusers pipeline folder
(`model.name_or_path` with a model_index.json), then the parts inside a full single-file checkpoint (SDXL and
SD3 checkpoints carry their encoders and VAE), then, for tokenizers, the ComfyUI install around the files.
A part that is found nowhere is one error naming the key to set and the file users keep for it.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelFileError
from .files import is_diffusers_folder, local_path, safetensors_shapes
from .text_encoders import EncoderFile, find_tokenizer, identify_text_encoder, load_tokenizer


class ModelSources:
    def __init__(self, mc, family: str) -> None:
        self.family = family
        self.root = local_path(mc.name_or_path, "model.name_or_path")
        self.folder = self.root if is_diffusers_folder(self.root) else None
        self.text_encoder_paths = [local_path(p, f"model.text_encoder_paths[{i}]")
                                   for i, p in enumerate(mc.text_encoder_paths)]
        self.tokenizer_paths = [local_path(p, f"model.tokenizer_paths[{i}]") for i, p in enumerate(mc.tokenizer_paths)]
        self.vae_path = local_path(mc.vae_path, "model.vae_path") if mc.vae_path else None
        self._root_shapes: dict | None = None

    @property
    def near(self) -> list[Path]:
        """Files whose surroundings may hold a ComfyUI install (tokenizers)."""
        return [self.root, *self.text_encoder_paths]

    def component(self, sub: str) -> Path | None:
        """A component folder of the diffusers pipeline folder (`text_encoder_2`, `vae` ...), if there is one."""
        if self.folder is not None and (self.folder / sub).is_dir():
            return self.folder / sub
        return None

    def in_checkpoint(self, key: str) -> bool:
        """Whether the single-file checkpoint holds tensor `key` (a part inside a full checkpoint)."""
        if self.root.is_dir():
            return False
        if self._root_shapes is None:
            self._root_shapes = safetensors_shapes(self.root)
        return key in self._root_shapes

    # --- text encoders ---------------------------------------------------------------------------
    def encoders_by_kind(self, components: dict[str, str]) -> dict[str, EncoderFile]:
        """The configured text encoders told apart by their keys (CLIP or T5; the first of each kind), then the
        pipeline folder's `components` ({kind: sub-folder}) for kinds not given."""
        found: dict[str, EncoderFile] = {}
        for p in self.text_encoder_paths:
            ef = identify_text_encoder(p)
            found.setdefault(ef.kind, ef)
        for kind, sub in components.items():
            folder = self.component(sub)
            if kind not in found and folder is not None:
                found[kind] = identify_text_encoder(folder)
        return found

    def require(self, found: dict, needed: dict[str, str], hint: str) -> None:
        missing = [k for k in needed if k not in found]
        if missing:
            raise ModelFileError(f"model.text_encoder_paths: {self.family} needs "
                                 + " and ".join(needed[k] for k in missing) + f"; {hint}")

    # --- tokenizers ------------------------------------------------------------------------------
    def tokenizer(self, kind: str, explicit: Path | None, component: str | None):
        """A tokenizer: the explicit path, the pipeline folder's `component`, or a ComfyUI install's."""
        return load_tokenizer(self.tokenizer_folder(kind, explicit, component))

    def tokenizer_folder(self, kind: str, explicit: Path | None, component: str | None) -> Path:
        """Where `tokenizer` reads from (found without reading it: the check before anything loads)."""
        candidates = [self.folder / component] if self.folder is not None and component else []
        return find_tokenizer(kind, explicit, candidates, self.near)

    def tokenizer_path(self, index: int) -> Path | None:
        return self.tokenizer_paths[index] if -len(self.tokenizer_paths) <= index < len(self.tokenizer_paths) else None

    # --- VAE -------------------------------------------------------------------------------------
    def vae(self, what: str, checkpoint_key: str | None = None) -> Path:
        """`model.vae_path`, else the full checkpoint (when it holds `checkpoint_key`), else the folder's `vae`."""
        if self.vae_path is not None:
            return self.vae_path
        if checkpoint_key is not None and self.in_checkpoint(checkpoint_key):
            return self.root
        folder = self.component("vae")
        if folder is not None:
            return folder
        raise ModelFileError(f"model.vae_path: {self.family} needs its VAE ({what}, in ComfyUI's models/vae)")
