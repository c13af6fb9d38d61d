"""Parsing of config arguments: `python -m launch.X --config configs/f.py:key=value,key2=a+b`.

Syntax everywhere: comma-separated `key=value`; lists joined with `+`; booleans `True`/`False`.
Values take the type of the key's default (int, float, bool, str, or tuple of those).
"""

from __future__ import annotations

import ml_collections


def _convert(key: str, text: str, default):
  if isinstance(default, bool):
    if text not in ("True", "False"):
      raise ValueError(f"{key} takes True or False, not {text!r}.")
    return text == "True"
  if isinstance(default, tuple):
    item = default[0] if default else ""
    return tuple(_convert(key, t, item) for t in text.split("+") if t)
  if isinstance(default, (int, float)):
    try:
      return type(default)(text)
    except ValueError:
      kind = "an int" if isinstance(default, int) else "a float"
      raise ValueError(f"{key} takes {kind}, not {text!r}.") from None
  return text


def parse_arg(arg: str, **defaults) -> ml_collections.ConfigDict:
  """`parse_arg("model=vit_b16,regime=0.1", model="resnet50", regime=1.0)` -> ConfigDict."""
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"Config argument {item!r} is not key=value.")
    if key not in defaults:
      raise KeyError(f"Unknown config argument {key!r}; valid: {', '.join(sorted(defaults))}.")
    out[key] = _convert(key, value, defaults[key])
  return ml_collections.ConfigDict(out)
