"""Logging of the daemon: where its lines go and how loud third-party libraries may be."""

from __future__ import annotations

import logging
import os
import sys

from .config import Settings

QUIET_LOGGERS = ("httpx", "httpcore", "botocore", "boto3", "urllib3", "s3transfer", "hpack", "filelock")


def configure_logging(settings: Settings) -> None:
    """Root logger at ``settings.log_level`` to ``settings.log_file`` (else stderr); third-party loggers
    at WARNING unless debugging. Idempotent."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    if settings.log_file:
        os.makedirs(os.path.dirname(os.path.abspath(settings.log_file)), exist_ok=True)
        handler: logging.Handler = logging.FileHandler(settings.log_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    under_journal = bool(os.environ.get("JOURNAL_STREAM")) and not settings.log_file
    fmt = "%(levelname)s %(name)s: %(message)s" if under_journal else \
        "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if settings.log_level == "DEBUG" else logging.WARNING)
    logging.getLogger("pyfuse3").setLevel(logging.INFO if settings.log_level == "DEBUG" else logging.WARNING)
