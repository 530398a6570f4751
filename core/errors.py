"""Typed errors. Each names the file, line or setting at fault and says how to fix it.

Run scripts catch `DistillError` at the top level, print its message and exit with status 2, so a user sees one
clear sentence rather than a traceback.
"""

import contextlib
from collections.abc import Iterator


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


class ResourceError(DistillError, RuntimeError):
    """Memory or disk ran out; the message names the setting to lower or the folder that is full."""


# What torch's allocators say when they fail: CUDA and MPS raise torch.OutOfMemoryError (a RuntimeError), the CPU
# allocator a plain RuntimeError with one of these phrases.
_OOM_PHRASES = ("out of memory", "not enough memory", "can't allocate memory")


def out_of_memory(exc: BaseException, where: str, fix: str) -> ResourceError | None:
    """The one-line error for `exc` if it says that memory ran out (torch.OutOfMemoryError on CUDA and MPS, a
    RuntimeError of the CPU allocator, MemoryError), else None."""
    if not (type(exc).__name__ == "OutOfMemoryError" or isinstance(exc, MemoryError)):
        if not (isinstance(exc, RuntimeError) and any(phrase in str(exc) for phrase in _OOM_PHRASES)):
            return None
    said = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
    return ResourceError(f"out of memory {where} ({said}); {fix}")


@contextlib.contextmanager
def out_of_memory_hint(where: str, fix: str) -> Iterator[None]:
    """Turn an out-of-memory error inside the block into one line: where it ran out and which setting to lower."""
    try:
        yield
    except (RuntimeError, MemoryError) as exc:
        error = out_of_memory(exc, where, fix)
        if error is None:
            raise
        raise error from exc
