"""Errors a user can cause. The CLI prints them as one line, never a traceback."""


class UserError(Exception):
    """Something in the user's config, files or data is wrong; the message says what and where."""


class ConfigError(UserError):
    """A config value is missing, of the wrong type or out of range; the message names the key path."""


class ModelFileError(UserError):
    """A model file is missing, unreadable or of another family than the config says."""


class DatasetError(UserError):
    """The dataset folder, its images or its captions cannot be used."""


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the last good save is kept."""


def refuse_clashes(key: str, clashes: list[tuple[object, str, str]], lead: str, advice: str) -> None:
    """A setting beside others it cannot work with: the first (clash, other key, why) whose clash is true is raised
    as `key: <lead><other>: <why>. <advice>`."""
    for clash, other, why in clashes:
        if clash:
            raise ConfigError(f"{key}: {lead}{other}: {why}. {advice}")
