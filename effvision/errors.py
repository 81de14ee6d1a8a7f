"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class EffVisionError(Exception):
    """Bad input the user can fix (recipe, model name, dataset, checkpoint, ...)."""


class ConfigError(EffVisionError):
    """A recipe or override that does not fit the schema."""


class TrainingDiverged(EffVisionError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""
