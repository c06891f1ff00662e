"""The analysis' logger: ``stabwatch.analysis``, and ``deep_lyapunov`` for code configured for deep-lyapunov.

A deep-lyapunov user configured ``logging.getLogger("deep_lyapunov")`` (a level, a handler) before
switching the import. Logger names are a tree and ``stabwatch.analysis`` is not under ``deep_lyapunov``,
so `AnalysisLogger` makes each record once and delivers it to both chains:

* the ``stabwatch.analysis`` chain (its handlers, ``stabwatch``'s, the root's) when that logger is enabled
  for the level, exactly as a plain logger would;
* the ``deep_lyapunov`` chain, with ``record.name == "deep_lyapunov"``, only when the user configured that
  logger (a level or a handler other than a `logging.NullHandler`) and it is enabled for the level. Its
  handlers get the record; the root's handlers too, unless the first chain already reached them, so a
  ``logging.basicConfig`` handler prints each record once.
"""

from __future__ import annotations

import copy
import inspect
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

__all__ = ["AnalysisLogger", "analysis_logger"]

OWN_NAME = "stabwatch.analysis"
DEEP_LYAPUNOV_NAME = "deep_lyapunov"

_HERE = os.path.normcase(os.path.abspath(__file__))
_LOGGING = os.path.normcase(os.path.abspath(logging.__file__))


def _configured(logger: logging.Logger) -> bool:
    """Whether someone set this logger's level or gave it a handler that writes somewhere."""
    return logger.level != logging.NOTSET or any(not isinstance(h, logging.NullHandler) for h in logger.handlers)


def _reaches_root(logger: logging.Logger) -> bool:
    node: logging.Logger | None = logger
    while node is not None:
        if node is logging.root:
            return True
        if not node.propagate:
            return False
        node = node.parent
    return False


def _caller() -> tuple[str, int, str]:
    """File, line and function of the code that logged (the first frame outside this module and logging)."""
    frame = inspect.currentframe()
    while frame is not None:
        code = frame.f_code
        name = os.path.normcase(os.path.abspath(code.co_filename))
        if name not in (_HERE, _LOGGING):
            return code.co_filename, frame.f_lineno, code.co_name
        frame = frame.f_back
    return "(unknown file)", 0, "(unknown function)"


class AnalysisLogger(logging.LoggerAdapter[logging.Logger]):
    """``debug``/``info``/``warning``/... as on a `logging.Logger`, delivered as the module docstring says.

    Example:
        >>> AnalysisLogger().logger.name
        'stabwatch.analysis'
    """

    def __init__(self) -> None:
        super().__init__(logging.getLogger(OWN_NAME), {})

    def _deep_lyapunov(self, level: int) -> logging.Logger | None:
        dl = logging.getLogger(DEEP_LYAPUNOV_NAME)
        return dl if _configured(dl) and not dl.disabled and dl.isEnabledFor(level) else None

    def isEnabledFor(self, level: int) -> bool:
        return self.logger.isEnabledFor(level) or self._deep_lyapunov(level) is not None

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        own = self.logger.isEnabledFor(level)
        dl = self._deep_lyapunov(level)
        if not own and dl is None:
            return
        exc_info = kwargs.get("exc_info")
        if exc_info and not isinstance(exc_info, tuple):
            exc_info = sys.exc_info() if not isinstance(exc_info, BaseException) else exc_info
        if isinstance(exc_info, BaseException):
            exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
        extra = kwargs.get("extra")
        fn, lno, func = _caller()
        record = self.logger.makeRecord(
            self.logger.name,
            level,
            fn,
            lno,
            msg,
            args,
            exc_info or None,
            func,
            dict(extra) if isinstance(extra, Mapping) else None,
        )
        reached_root = False
        # With no handler anywhere on the own chain, logging's last resort would print the record to
        # stderr; skip that chain when the deep_lyapunov one delivers it.
        if own and (dl is None or self.logger.hasHandlers()):
            self.logger.handle(record)
            reached_root = _reaches_root(self.logger)
        if dl is not None:
            twin = copy.copy(record)
            twin.name = DEEP_LYAPUNOV_NAME
            if not dl.filter(twin):
                return
            node: logging.Logger | None = dl
            while node is not None and not (reached_root and node is logging.root):
                for handler in node.handlers:
                    if twin.levelno >= handler.level:
                        handler.handle(twin)
                if not node.propagate:
                    break
                node = node.parent


_LOGGER = AnalysisLogger()


def analysis_logger() -> AnalysisLogger:
    """The one `AnalysisLogger` every module of `stabwatch.analysis` logs through."""
    return _LOGGER
