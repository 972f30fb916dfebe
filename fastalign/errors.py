"""Errors a user can act on. The CLI prints them as one line (exit code 2), without a traceback
(FASTALIGN_DEBUG=1 shows it); torch-free, so the CLI catches them without importing the trainers."""


class RunLockedError(RuntimeError):
    """Another live process holds the run folder."""


class ResumeRefusedError(ValueError):
    """The checkpoint to resume was written by a run with other settings, weights or data."""


class CheckpointFormatError(ValueError):
    """A checkpoint this version cannot resume (another layout or another world size)."""


class DivergenceError(FloatingPointError):
    """Training produced a non-finite or exploded loss, gradient or weights."""


USER_ERRORS = (ValueError, OSError, RunLockedError, DivergenceError)
"""What the CLI reports in one line: bad input (ValueError: config, data, resume), the file system
(OSError: missing paths, full disk, permissions), a busy run folder, a diverged run."""
