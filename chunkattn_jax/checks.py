"""Argument checks for the public API: a named error for a bad value, before anything changes.

Python's `bool` is an `int`, and `1.0 == 1` hashes like `1`, so plain `isinstance(x, int)` or
`x == int(x)` let `True` or `1.0` through where an integer is meant (as a count, a token or an id);
these helpers do not. Messages name the field and the value.
"""

from __future__ import annotations

import math

import numpy as np


def is_int(x) -> bool:
  """A Python or NumPy integer that is not a bool."""
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def is_real(x) -> bool:
  """A Python or NumPy int or float that is not a bool."""
  return (isinstance(x, (int, float, np.integer, np.floating))
          and not isinstance(x, (bool, np.bool_)))


def check_int(value, what: str, *, min_value: int | None = None,
              max_value: int | None = None) -> int:
  """Returns `value` as an int; ValueError unless it is an integer in `[min_value, max_value]`."""
  if not is_int(value):
    raise ValueError(f"{what} must be an integer, got {value!r} ({type(value).__name__})")
  if (min_value is not None and value < min_value) or (max_value is not None and value > max_value):
    lo = "-inf" if min_value is None else min_value
    hi = "inf" if max_value is None else max_value
    raise ValueError(f"{what} must be in [{lo}, {hi}], got {value!r}")
  return int(value)


def check_power_of_two(value, what: str) -> int:
  """Returns `value` as an int; ValueError unless it is a power of two (>= 1)."""
  n = check_int(value, what, min_value=1)
  if n & (n - 1):
    raise ValueError(f"{what} must be a power of two, got {value!r}")
  return n


def check_real(value, what: str) -> float:
  """Returns `value` as a float; ValueError unless it is a finite real number."""
  if not is_real(value) or not math.isfinite(float(value)):
    raise ValueError(f"{what} must be a finite number, got {value!r} ({type(value).__name__})")
  return float(value)


def check_bool(value, what: str) -> bool:
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{what} must be a bool, got {value!r} ({type(value).__name__})")
  return bool(value)


def check_callable(value, what: str, *, optional: bool = True):
  """Returns `value`; TypeError unless it is callable (or None when `optional`)."""
  if (value is None and not optional) or (value is not None and not callable(value)):
    raise TypeError(f"{what} must be callable{' or None' if optional else ''}, got {value!r}")
  return value
