"""Exception classes a user can catch.

Every class also derives from the built-in exception that describes the problem (``ValueError``),
so existing ``except ValueError`` code keeps working.
"""

from __future__ import annotations


class InfluenceError(Exception):
    """Base class of the errors infl_plugin raises on purpose."""


class ConfigurationError(InfluenceError, ValueError):
    """An invalid setting; the message names the field and the allowed values."""


class FactorsFileError(InfluenceError, ValueError):
    """A factors file that cannot be read (empty, truncated, not a factors file, missing entries)."""


class BatchFormatError(InfluenceError, ValueError):
    """A batch whose layout does not match what the task expects; the message names that layout."""


class InputOrderError(InfluenceError, ValueError):
    """Training candidates whose order is not fixed (a shuffling loader): score columns would not
    follow the data set."""


class StateFileError(InfluenceError, ValueError):
    """A saved influence state (a checkpoint's ``influence_state.safetensors`` + ``.json``) that cannot
    be read: a file of the pair missing, truncated, not JSON/safetensors, or the two not matching."""


__all__ = ["BatchFormatError", "ConfigurationError", "FactorsFileError", "InfluenceError", "InputOrderError",
           "StateFileError"]
