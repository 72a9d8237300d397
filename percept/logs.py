"""Log lines for every deployable: one configuration (the gateway, `percept` commands and the workers call
`configure_logging`), as text for people or as one JSON object a line for a log pipeline
(PERCEPT_LOG_FORMAT), and each line a job causes marked with the job it belongs to.

Inside `job_context(...)` every record carries `job_id`, `tenant_id` and `kind`. For a micro-batch (one
predict() call for several jobs) each field holds the batch's distinct values comma-joined, in the order the
jobs came: a field is always a string, the same in both formats, and a search for one job id finds the lines
of every batch it ran in.
"""

import logging
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import IO, Any

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

from percept.config import Settings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The JSON fields every line has, renamed as log pipelines name them; the job fields and whatever a logger
# passed as `extra` (Celery's `data`) follow, then `exc_info` for a record with an exception.
JSON_FIELDS = ("levelname", "name", "message", "process")
JSON_NAMES = {"levelname": "level", "name": "logger"}
JOB_FIELDS = ("job_id", "tenant_id", "kind")
# Record attributes left out of a JSON line: the standard ones not in JSON_FIELDS, and uvicorn's copy of its
# message with terminal colours.
JSON_LEFT_OUT = (*RESERVED_ATTRS, "color_message")
HANDLER_NAME = "percept"  # the root handler configure_logging owns (and replaces when called again)


@dataclass
class JobFields:
    """What the lines of a job context carry; `update` fills in what is known later (a worker claims first)."""

    job_id: str = ""
    tenant_id: str = ""
    kind: str = ""

    def update(self, *, job_ids: Iterable[str] | None = None, tenant_ids: Iterable[str] | None = None,
               kinds: Iterable[str] | None = None) -> None:
        if job_ids is not None:
            self.job_id = _joined(job_ids)
        if tenant_ids is not None:
            self.tenant_id = _joined(tenant_ids)
        if kinds is not None:
            self.kind = _joined(kinds)

    def items(self) -> list[tuple[str, str]]:
        return [(name, value) for name, value in zip(JOB_FIELDS, (self.job_id, self.tenant_id, self.kind),
                                                     strict=True) if value]


def _joined(values: Iterable[str]) -> str:
    return ",".join(dict.fromkeys(value for value in values if value))


_current: ContextVar[JobFields | None] = ContextVar("percept_job_log_fields", default=None)
# Job contexts opened with `whole_process`: their fields also mark the lines of threads that did not inherit
# a context (a worker's heartbeat thread), as long as exactly one such context is open in the process.
_process_wide: list[JobFields] = []
_process_wide_lock = threading.Lock()


@contextmanager
def job_context(job_ids: Iterable[str] = (), tenant_ids: Iterable[str] = (), kinds: Iterable[str] = (), *,
                whole_process: bool = False) -> Iterator[JobFields]:
    """Mark every line logged inside with these jobs (contexts nest: the innermost wins).

    `whole_process`: also the lines of threads started inside, which a contextvar does not reach; for processes
    that run one job run at a time (a Celery pool process), never for a server handling many requests at once.
    """
    fields = JobFields()
    fields.update(job_ids=job_ids, tenant_ids=tenant_ids, kinds=kinds)
    token = _current.set(fields)
    if whole_process:
        with _process_wide_lock:
            _process_wide.append(fields)
    try:
        yield fields
    finally:
        _current.reset(token)
        if whole_process:
            with _process_wide_lock:
                _process_wide.remove(fields)


def current_job_fields() -> JobFields | None:
    """The job context of this thread or task, or the one job run of the process (see `whole_process`)."""
    fields = _current.get()
    if fields is None and len(_process_wide) == 1:
        fields = _process_wide[0]
    return fields


class JobContextFilter(logging.Filter):
    """Adds `job_id`, `tenant_id` and `kind` to each record logged inside a job context (a handler filter: it
    sees the records of every logger, not only one's own). Fields a record already has are kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = current_job_fields()
        if fields is not None:
            for name, value in fields.items():
                if not hasattr(record, name):
                    setattr(record, name, value)
        return True


class TextFormatter(logging.Formatter):
    """The classic line, with ` [job=... tenant=... kind=...]` after the message of a job's line."""

    labels = {"job_id": "job", "tenant_id": "tenant", "kind": "kind"}

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        marks = [f"{label}={value}" for name, label in self.labels.items() if (value := getattr(record, name, None))]
        return f"{line} [{' '.join(marks)}]" if marks else line


class JsonLineFormatter(JsonFormatter):
    """One JSON object a line: timestamp (UTC, ISO 8601), level, logger, message, process, the job fields,
    the record's extras, exc_info (the formatted traceback)."""

    def __init__(self) -> None:
        super().__init__(list(JSON_FIELDS), rename_fields=JSON_NAMES, reserved_attrs=JSON_LEFT_OUT, timestamp=True)

    def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
        return {"timestamp": log_data.pop("timestamp"), **log_data}  # first, where a reader looks


def log_handler(stream: IO[str], log_format: str = "json") -> logging.Handler:
    """A handler writing to `stream` in `log_format` (`json` or `text`), with the job context filter."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLineFormatter() if log_format == "json" else TextFormatter(TEXT_FORMAT))
    handler.addFilter(JobContextFilter())
    return handler


def configure_logging(settings: Settings, *filters: logging.Filter) -> logging.Handler:
    """The root logger's one handler (stderr), in PERCEPT_LOG_FORMAT at PERCEPT_LOG_LEVEL, with the job context
    filter and `filters`; Python warnings go through it too. Called again, it replaces its own handler and leaves
    any other alone."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if h.get_name() == HANDLER_NAME]:
        root.removeHandler(handler)
    handler = log_handler(sys.stderr, settings.log_format)
    handler.set_name(HANDLER_NAME)
    for extra in filters:
        handler.addFilter(extra)
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    logging.captureWarnings(True)  # warnings.warn() as log lines too (logger py.warnings), not raw stderr text
    return handler
