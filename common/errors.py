"""The errors that end a script, each with its exit code (a contract: docs/training.md). They live in common/ so
that any module can raise them and cspresnet/console.py can report them without knowing the modules that do."""

EXIT_FAILED = 1  # anything else; its traceback says where
EXIT_BAD_INPUT = 2  # a recipe, data, checkpoint, run folder or option that cannot work: one line says which
EXIT_NONFINITE = 3  # the loss was not finite too many steps in a row


class ExitError(Exception):
    """Ends a script with `exit_code` and its message as one line, without a traceback: the
    message says what went wrong and what to do, so a traceback would only hide it."""

    exit_code = EXIT_FAILED


class BadInputError(ExitError, ValueError):
    exit_code = EXIT_BAD_INPUT


class RecipeError(BadInputError):
    """A recipe, a base file or an override is wrong; the message says where and why."""


class DataConfigError(BadInputError):
    """A data setting that cannot work with this dataset or launch; the message names the key."""


class DatasetLayoutError(BadInputError):
    """The folder is not in a layout we read; the message shows the expected one."""


class CheckpointError(BadInputError):
    """A checkpoint cannot be read or does not fit the model or the run; the message says which."""


class RunFolderError(BadInputError):
    """The run folder cannot be used for this run; the message says why and what to do."""


class OptionError(BadInputError):
    """A command-line option that cannot work, found before any work."""


class SourceChangedError(ExitError):
    """A file that the index points into (an archive, a zip, a shard) changed under a running
    job: its offsets no longer hold what was indexed. Not an OSError: no skipped sample."""

    exit_code = EXIT_BAD_INPUT


class UnreadableDataError(ExitError, RuntimeError):
    """More images could not be decoded than the recipe allows, or none at all."""

    exit_code = EXIT_BAD_INPUT


class FastJpegRequired(ExitError, RuntimeError):
    """CSPRESNET_JPEG_BOX=require, and the box decoder is unavailable."""

    exit_code = EXIT_BAD_INPUT


class NonFiniteLossError(ExitError, RuntimeError):
    """Too many non-finite losses in a row: the run stops, the last checkpoint stays as it was."""

    exit_code = EXIT_NONFINITE


class FinalCheckpointError(ExitError, RuntimeError):
    """The run trained to its end but could not write its final checkpoint (a full disk)."""


class LoaderStallError(ExitError, RuntimeError):
    """No batch within data.loader_timeout_s; the message names the workers and the files they were reading."""


class SharedMemoryError(ExitError, RuntimeError):
    """The loader's shared memory (/dev/shm) ran out."""
