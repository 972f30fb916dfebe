"""The data layer's error types (no imports: every data module uses them)."""

from __future__ import annotations


class RowError(Exception):
    """A bad row: `reason` is the counted skip reason, `detail` says what was expected."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# One raw row: (where, row, None) for a parsed row, (where, None, RowError) for an unreadable one.
RawRow = tuple[str, object, RowError | None]


class FormatUndetectedError(ValueError):
    """No row of a source fits any format of the requested kind, so nothing was kept.

    Its message is "no usable rows: <report summary>" and contains "format undetected"; `report`
    is the DataReport. A trainer can catch it to try another kind (KTO reading preference pairs).
    """

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


class DataWarning(UserWarning):
    """A source that loads but will train badly (e.g. KTO rows of one label only); the same text is
    in the DataReport's `warnings` and summary."""
