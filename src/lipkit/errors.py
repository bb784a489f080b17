"""The one exception type for mistakes a user can make and fix."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType


class UserError(Exception):
    """A problem caused by input the user controls (config, paths, data).

    The message is one sentence that names the thing and the fix; the CLI prints it without a
    traceback and exits with status 2.
    """


EXIT_PREEMPTED = 75  # a signal stopped training after it wrote a checkpoint: resume with train.resume=auto


def import_optional(module: str, explain: Callable[[ImportError], str]) -> ModuleType:
    """`module` imported: an optional package (an extra), or a UserError saying `explain(the ImportError)`."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise UserError(explain(e)) from e
