"""User-facing errors: one clear sentence naming the problem and the fix.

The CLI prints these without a traceback; everything else is a bug and keeps its traceback.
"""


class LlmpressError(Exception):
    """A problem with what the user asked for (bad path, wrong model, bad option)."""


class ModelLoadError(LlmpressError):
    """A model could not be found, read or understood."""


class UnsupportedModelError(ModelLoadError):
    """The checkpoint is valid but not an architecture llmpress runs."""
