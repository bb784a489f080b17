"""Training: the trainer (the step), schedule and clock, inputs, distributed, launch.

The package is also callable, so that `lipkit.train(config_or_path, **overrides)` (the Python API)
works whether or not this package has been imported: `lipkit.train` is this module either way, and
calling it forwards to `lipkit.api.fit` (imported on the call, so that importing the package stays cheap).
"""

from __future__ import annotations

import sys
import types
from typing import Any


class _CallablePackage(types.ModuleType):
    def __call__(self, config: Any, **overrides: Any) -> Any:
        """`lipkit.train(config, **overrides)`: train and return the final checkpoint directory (see
        `lipkit.api.fit` for what `config` and `overrides` may be)."""
        from lipkit.api import fit

        return fit(config, **overrides)


sys.modules[__name__].__class__ = _CallablePackage
