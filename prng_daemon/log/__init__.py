"""Logging, configured once: structlog to JSON lines, a console, or the journal's native
protocol with one sentence per MESSAGE and every fact its own field."""

from .configure import SYSLOG_PRIORITY, configure_logging, get_logger, is_journal, pick_format

__all__ = ["SYSLOG_PRIORITY", "configure_logging", "get_logger", "is_journal", "pick_format"]
