"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class EffVisionError(Exception):
    """Bad input the user can fix (recipe, model name, dataset, checkpoint, ...)."""

    def __str__(self) -> str:
        # One printable line whatever the message quotes: a key, file name or value read from a corrupt
        # file may hold line breaks or other control characters; they are shown escaped ("\n").
        text = super().__str__()
        return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class ConfigError(EffVisionError):
    """A recipe or override that does not fit the schema."""


class TrainingDiverged(EffVisionError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""
