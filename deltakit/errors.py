"""The exceptions deltakit raises.

Every error derives from :class:`DeltaError`, so ``except deltakit.DeltaError`` catches all of them. Messages say
what went wrong, where (module name, shape, type, file) and how to fix it.
"""

from __future__ import annotations


class DeltaError(Exception):
    """Base class of every deltakit error."""


class ModuleMatchError(DeltaError, ValueError):
    """A name pattern matched nothing, or matched a module of a type the method cannot handle."""


class UnsupportedModuleError(ModuleMatchError, TypeError):
    """A matched module has a type the delta method cannot modify."""


class DeltaStateError(DeltaError, RuntimeError):
    """An illegal lifecycle transition, such as attaching a delta twice or detaching a merged one."""


class CheckpointError(DeltaError, OSError):
    """A delta checkpoint is missing, corrupt, or does not fit the backbone it is loaded into."""


class DeltaConfigError(DeltaError, ValueError):
    """A delta configuration holds an unknown delta type or an invalid hyper-parameter."""
