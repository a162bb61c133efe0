"""Dataset, network and training settings: each node emits the YAML section it stands for; every widget is a
config key (trainer/graph_parts.py), so its default and choices are the YAML's."""

import os

from comfy_api.latest import io

from ..trainer.data.from_tensors import split_captions, write_image_dataset
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


# what the in-graph dataset's inputs replace: the folders it writes and the caption files it writes
_WRITTEN = ("folder_path", "caption_ext", "default_caption", "control_path", "mask_path")
_IMAGE_OPTIONAL = ("control_dropout",)


class EriImageDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EriImageDataset", display_name="Training Dataset (from images)", category=CATEGORY,
            description="Images and captions from the graph, written once to output/eridiffusion/datasets (named by"
                        " their content) and trained as a folder dataset.",
            inputs=[
                io.Image.Input("images", tooltip="the training images (one batch)"),
                io.String.Input("captions", multiline=True, default="",
                                tooltip="one caption per line, one line per image; a single line captions them all"),
                *widget_inputs([w for w in DATASET_WIDGETS if w.name not in _WRITTEN]),
                EriDatasets.Input("datasets", optional=True, tooltip="chain datasets: this one is added"),
                io.Image.Input("control_images", optional=True,
                               tooltip="control / reference images by index (Flex.2 control, OmniGen2 references)"),
                io.Mask.Input("masks", optional=True, tooltip="masks by index (Flex.2 inpaint, VACE): 1 = masked"),
                *widget_inputs([w for w in DATASET_OPTIONAL_WIDGETS if w.name in _IMAGE_OPTIONAL], optional=True),
            ],
            outputs=[EriDatasets.Output(display_name="datasets")],
        )

    @classmethod
    def execute(cls, images, captions, datasets=None, control_images=None, masks=None, **values) -> io.NodeOutput:
        import folder_paths

        root = os.path.join(folder_paths.get_output_directory(), "eridiffusion", "datasets")
        written = write_image_dataset(root, images, split_captions(captions, images.shape[0]), control_images, masks)
        return io.NodeOutput(list(datasets or []) + [{**dataset_section(values), **written}])


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
