"""Parsing of config arguments: `python -m launch.X --config configs/f.py:key=value,key2=a+b`.

Syntax everywhere: comma-separated `key=value`; lists joined with `+`; booleans `True`/`False`.
Values take the type of the key's default (int, float, bool, str, or tuple of those).
Launchers define their config flag with `define_config_file`, so that a mistyped field
(`--config.learning_rate=1e-3`) is a flags error suggesting the right one ("did you mean lr?").
"""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Iterable, Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from medpeft_jax.registry import UnknownNameError


class UnknownKeyError(UnknownNameError):
  """A config argument or `--config.<field>` naming no field of the config (a KeyError and a ValueError)."""


def suggest_key(name: str, valid: Iterable[str]) -> str | None:
  """The key a mistyped `name` most likely meant: one abbreviating the other (learning_rate -> lr,
  bs -> batch_size), else the closest spelling (num_epochs -> epochs); None when nothing is close."""
  valid = list(valid)

  def initials(key: str) -> str:
    return "".join(word[0] for word in key.split("_") if word)

  for key in valid:
    if ("_" in name and initials(name) == key) or ("_" in key and initials(key) == name):
      return key
  close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
  return close[0] if close else None


def _unknown(what: str, name: str, valid: Iterable[str]) -> UnknownKeyError:
  valid = sorted(valid)
  guess = suggest_key(name, valid)
  hint = f" Did you mean {guess}?" if guess else ""
  return UnknownKeyError(f"{what} has no field {name!r}.{hint} Valid: {', '.join(valid) or 'none'}.")


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
      raise _unknown("The config argument (after ':')", key, defaults)
    out[key] = _convert(key, value, defaults[key])
  return ml_collections.ConfigDict(out)


def unknown_field(config, path: str) -> UnknownKeyError | None:
  """The error for `--config.<path>` when `path` names no field of `config` (None when it does)."""
  node, done = config, "config"
  for part in path.split("."):
    if not isinstance(node, ml_collections.ConfigDict):
      return UnknownKeyError(f"--config.{path}: {done} is a {type(node).__name__}, it has no field {part!r}.")
    if part not in node:
      return _unknown(f"--config.{path}: {done}", part, node.keys())
    node, done = node[part], f"{done}.{part}"
  return None


class UnknownFieldError(flags.IllegalFlagValueError, UnknownKeyError):
  """An unknown key on the command line: absl prints it as a flags error (no traceback)."""


def define_config_file(name: str, help_string: str, *, flag_values: flags.FlagValues = flags.FLAGS,
                       sys_argv: Sequence[str] | None = None):
  """`config_flags.DEFINE_config_file(name, lock_config=True)` whose unknown keys — a `--<name>.<field>`
  override or an argument after ':' — are flags errors naming the key and suggesting the right one
  (ml_collections raises a bare KeyError or AttributeError there, suggesting only near spellings)."""
  holder = config_flags.DEFINE_config_file(name, None, help_string, lock_config=True, flag_values=flag_values,
                                           sys_argv=sys_argv)
  flag = flag_values[name]
  parse = flag._parse  # noqa: SLF001  (the flag's one parsing hook; absl calls it from Flag.parse)

  def parse_with_suggestions(argument):
    try:
      return parse(argument)
    except flags.IllegalFlagValueError as e:  # get_config(argument) failed; its traceback is in the message
      causes, cause = [], e.__context__
      while cause is not None:
        causes, cause = causes + [cause], cause.__context__
      unknown = [c for c in causes if isinstance(c, UnknownKeyError)]
      if not unknown:
        raise
      raise UnknownFieldError(f"--{name}={argument}: {unknown[-1]}") from None
    except (KeyError, AttributeError):
      config = flag.parser.parse(argument)
      pattern = re.compile(rf"^--?(?:no)?{re.escape(name)}\.([^=]+)")
      for arg in sys.argv if sys_argv is None else sys_argv:
        match = pattern.match(arg)
        error = match and unknown_field(config, match.group(1))
        if error:
          raise UnknownFieldError(str(error)) from None
      raise

  flag._parse = parse_with_suggestions  # noqa: SLF001
  return holder
