"""One error family whose message is shown to users as is: one line, no traceback."""


class ExoError(Exception):
  """A failure the user can act on; the CLI prints str(e) and exits 2."""


class ModelError(ExoError):
  """The model file, format, architecture or tensor set is missing or unsupported."""
