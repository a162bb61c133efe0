"""The custom socket types the nodes pass around (plain dicts of YAML sections, or a session)."""

from comfy_api.latest import io

CATEGORY = "EriDiffusion"

EriModel = io.Custom("ERI_MODEL")  # {"model": {...model section...}} or {"comfy": (MODEL, CLIP, VAE)}
EriDatasets = io.Custom("ERI_DATASETS")  # [dataset entry, ...]
EriNetworkT = io.Custom("ERI_NETWORK")  # network section
EriSettings = io.Custom("ERI_SETTINGS")  # {"name", "training_folder", "train", "save", "sample"}
EriState = io.Custom("ERI_STATE")  # trainer.session.TrainingSession
