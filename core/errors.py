"""Typed errors. Each names the file, line or setting at fault and says how to fix it.

Run scripts catch `DistillError` at the top level, print its message and exit with status 2, so a user sees one
clear sentence rather than a traceback.
"""


class DistillError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(DistillError, ValueError):
    """A setting is missing, out of range, or inconsistent with another setting."""


class DataError(DistillError, ValueError):
    """A data file or split is missing, empty or malformed."""


class ModelError(DistillError, ValueError):
    """A model or tokenizer folder cannot be used as asked."""


class VocabularyMismatchError(ModelError):
    """Teacher and student do not share a vocabulary, but the method needs one."""


class CheckpointError(DistillError, RuntimeError):
    """A checkpoint is unreadable or does not match the run."""


class NonFiniteLossError(DistillError, FloatingPointError):
    """The loss became NaN or infinite; training stopped, the last good checkpoint is kept."""


class OutputDirError(DistillError, ValueError):
    """The output folder cannot be used (other configuration inside, or not writable)."""
