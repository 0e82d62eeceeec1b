"""The project's own errors: one family, raised where the fault is found and caught only by type.

    InputError          a user's file, directory or setting that cannot be used as it is
      OptionError       a command-line option, or a setting recorded beside earlier outputs
      DataError         a record (training, evaluation, the teacher's annotations) that cannot be used
      ImageError        an image that cannot be found, decoded or preprocessed
      TokenizerError    a tokenizer file that cannot be used
      TeacherError      a request to the teacher's endpoint that failed for good (data/teacher.py)
      CheckpointError   a checkpoint that cannot be loaded (checkpoint/weights.py)
      SnapshotError     a resumable snapshot that is missing, or not this run's (train/snapshots.py)
      DiskFullError     a file that does not fit on its disk: its name, the space needed and free (files.py)

The messages name the file, record or flag; the command lines print them as one line (cli.run). Anything
else, a plain ValueError or TypeError included, is a bug and keeps its traceback: no code catches
ValueError or Exception to sort input from bugs, which is how a bug passes for a bad record.
"""


class InputError(ValueError):
    """A user's mistake (a ValueError too, so a caller of the Python API may catch either)."""


class OptionError(InputError):
    """An option that cannot be used as given; the message names the flag or setting."""


class DataError(InputError):
    """A record that cannot be used; the message names the record id (and the file)."""


class ImageError(InputError):
    """An image that cannot be used; the message names the file."""


class TokenizerError(InputError):
    """A tokenizer file that cannot be used; the message names it."""


class TeacherError(InputError):
    """A request that failed for good (its message never holds the API key)."""
