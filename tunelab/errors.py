"""Errors tunelab reports to the user as one line (exit code 2), never as a traceback."""

from tunelab.records import Status


class InputError(Exception):
    """Bad user input: a config, spec, override or data file. The message names what and where."""


class StorageFault(Exception):
    """The study's storage (or disk) failed mid-study and kept failing after retries."""


class TrialFailure(Exception):
    """A trial that cannot finish; `status` is how the study classifies it."""

    status = Status.ERROR


class UnsupportedError(TrialFailure):
    """The device cannot run this precision or option (fp16 on the CPU, hybrid engine off CUDA)."""

    status = Status.UNSUPPORTED


class DivergedError(TrialFailure):
    """A loss became NaN or infinite."""

    status = Status.DIVERGED
