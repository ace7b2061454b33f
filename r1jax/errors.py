"""Errors worded for the user, and the optional packages ("extras") a few input formats need.

`UserError` marks a problem with what the user gave: a config value, a data file, a path that does
not exist, an optional package that is not installed. `python -m r1jax.main` prints its message and
exits with status 2, without a traceback; any other exception is a bug and keeps its traceback.
The subclasses are also the built-in type callers already catch (ValueError, FileNotFoundError,
ImportError), so `except ValueError` still sees bad input.

An optional package is imported where its format is read, and a missing one names its extra:

    try:
      import pyarrow.parquet as pq  # Lazy: only Parquet inputs need pyarrow (the [parquet] extra).
    except ImportError as e:
      raise errors.missing_extra(e, extra="parquet", what=f"Parquet input {path}") from e
"""

EXIT_CODE = 2  # absl's usage errors exit 1; configuration and input problems exit 2


class UserError(Exception):
  """A problem with the user's config, data, paths or installation; the message says the fix."""


class BadInput(UserError, ValueError):
  """Input data (a file's content, a task split, a corpus) that cannot be used as given."""


class InputNotFound(UserError, FileNotFoundError):
  """A file or directory the user named does not exist (or holds nothing usable)."""


class MissingExtra(UserError, ImportError):
  """An optional package is not installed; the message names the extra that installs it."""


def missing_extra(error: ImportError, *, extra: str, what: str) -> MissingExtra:
  """The MissingExtra for `error` (raised by importing an optional package) when `what` needs it."""
  package = (error.name or "").split(".")[0] or "an optional package"
  return MissingExtra(f'{what} needs {package}, which is not installed: pip install '
                      f'"r1jax[{extra}]" (in a clone: pip install -e ".[{extra}]").')
