"""Thin ComfyUI nodes: each calls one engine stage (trainer/session.py); no training logic here."""

from comfy_api.latest import ComfyExtension, io

from .flex2 import EriFlex2Conditioning
from .model import EriComfyModel, EriModelByArch
from .parts import EriDataset, EriImageDataset, EriNetwork, EriTrainSettings
from .train import EriApplyLoRA, EriSample, EriSaveLoRA, EriTrain
from .yaml_bridge import EriExportJob, EriLoadJob

NODES: list[type[io.ComfyNode]] = [
    EriComfyModel, EriModelByArch, EriDataset, EriImageDataset, EriNetwork, EriTrainSettings,
    EriTrain, EriSample, EriSaveLoRA, EriApplyLoRA, EriLoadJob, EriExportJob, EriFlex2Conditioning,
]


class EriDiffusionExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES
