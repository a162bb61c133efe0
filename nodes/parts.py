"""Dataset, network and training settings: each node emits the YAML section it stands for; every widget is a
config key (trainer/graph_parts.py), so its default and choices are the YAML's."""

from comfy_api.latest import io

from ..trainer.graph_parts import (DATASET_OPTIONAL_WIDGETS, DATASET_WIDGETS, NETWORK_WIDGETS,
                                   SETTINGS_OPTIONAL_WIDGETS, SETTINGS_WIDGETS, dataset_section, network_section,
                                   settings_section)
from .types import CATEGORY, EriDatasets, EriNetworkT, EriSettings
from .widgets import widget_inputs


class EriDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EriDataset", display_name="Training Dataset", category=CATEGORY,
            inputs=[
                *widget_inputs(DATASET_WIDGETS),
                EriDatasets.Input("datasets", optional=True, tooltip="chain datasets: this one is added"),
                *widget_inputs(DATASET_OPTIONAL_WIDGETS, optional=True),
            ],
            outputs=[EriDatasets.Output(display_name="datasets")],
        )

    @classmethod
    def execute(cls, datasets=None, **values) -> io.NodeOutput:
        return io.NodeOutput(list(datasets or []) + [dataset_section(values)])


class EriNetwork(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EriNetwork", display_name="Training Network", category=CATEGORY,
            inputs=[
                *widget_inputs(NETWORK_WIDGETS),
                io.String.Input("only_if_contains", default="", tooltip="comma-separated layer name parts"),
                io.String.Input("ignore_if_contains", default=""),
            ],
            outputs=[EriNetworkT.Output(display_name="network")],
        )

    @classmethod
    def execute(cls, **values) -> io.NodeOutput:
        return io.NodeOutput(network_section(values))


class EriTrainSettings(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EriTrainSettings", display_name="Training Settings", category=CATEGORY,
            inputs=[
                io.String.Input("name", default="my_lora", tooltip="the run's name: its folder and files"),
                io.String.Input("training_folder", default="", tooltip="empty: ComfyUI's output/eridiffusion"),
                *widget_inputs(SETTINGS_WIDGETS),
                *widget_inputs(SETTINGS_OPTIONAL_WIDGETS, optional=True),
            ],
            outputs=[EriSettings.Output(display_name="settings")],
        )

    @classmethod
    def execute(cls, **values) -> io.NodeOutput:
        return io.NodeOutput(settings_section(values))
