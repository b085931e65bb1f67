"""Shared set-up of the command-line tests."""

import logging

import pytest

import netlite
from netlite.data import catalog
from netlite.tools import logs


@pytest.fixture(autouse=True)
def _restore_logging():
    # main() installs a stdout handler on the "netlite" logger; take it
    # away again so later tests (and caplog) see the usual set-up, and
    # undo --data and --gpu.
    netlite_logger = logging.getLogger("netlite")
    level, propagate = netlite_logger.level, netlite_logger.propagate
    handlers = list(netlite_logger.handlers)
    yield
    if logs._handler is not None:
        netlite_logger.removeHandler(logs._handler)
        logs._handler = None
    netlite_logger.handlers[:] = handlers
    netlite_logger.setLevel(level)
    netlite_logger.propagate = propagate
    netlite.set_mode_cpu()
    catalog.set_data_dir(None)
