"""The top of every command line: a user's mistake ends in one line on stderr, `PROG: error: <what is wrong>`,
and a non-zero exit; an unexpected internal error keeps its traceback. A command adopts it in one line:

    if __name__ == "__main__":
        run(main)  # main(argv=None) parses sys.argv itself; main stays callable (and raising) from Python

A user's mistake is: the project's own errors, whose messages name the file or setting (InputError and the
family built on it, llava_min/errors.py), `SystemExit("message")` from a script, and the operating system's
errors about a file (missing, a file where a directory belongs, no permission, a read-only disk, ...). Ctrl-C
ends in one line too. Argparse's own errors keep their form (exit status 2). This is the one place that turns
errors into a line: library code raises them and never exits the process.

Argparse types shared by the command lines: `positive`, `fraction`, `below_one` (a probability such as a
dropout), `device` (one this machine has), `existing` (a file or directory that must be there) and
`writable` (an output path): a bad value is an argparse error naming the flag, before any
model is loaded.
"""
import argparse
import sys
import tempfile
from pathlib import Path

from .errors import InputError

def user_message(e: BaseException):
    """The one line a user's mistake is reported with; None for anything else (a bug: its traceback is shown)."""
    if isinstance(e, InputError):
        return worker_message(e)
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.filename}: {e.strerror}" + (f" ({e.filename2})" if e.filename2 else "")
    return None


def worker_message(e: InputError) -> str:
    """A DataLoader worker's error comes back with the worker's traceback as its message (torch's
    ExceptionWrapper.reraise): the original message is what follows its type on the traceback's last line."""
    text = str(e)
    if text.startswith(f"Caught {type(e).__name__} in DataLoader worker") and "\nOriginal Traceback" in text:
        return text.rpartition(f"{type(e).__name__}: ")[2]
    return text


def program_name() -> str:
    """`train.py` for a script; `python -m llava_min.eval` for a package run with -m (argv[0] is its __main__.py)."""
    path = Path(sys.argv[0])
    if path.name != "__main__.py":
        return path.name
    parts = [path.parent]
    while (parts[-1].parent / "__init__.py").is_file():
        parts.append(parts[-1].parent)
    return "python -m " + ".".join(p.name for p in reversed(parts))


def run(main) -> None:
    """Calls `main()`; a user's mistake -> `PROG: error: ...` and exit status 1 (see the module docstring)."""
    prog = program_name()
    try:
        main()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)  # the shell's code for a Ctrl-C
    except SystemExit as e:
        if isinstance(e.code, str):
            sys.exit(f"{prog}: error: " + " ".join(e.code.split()))
        raise
    except (InputError, OSError) as e:
        text = user_message(e)
        if text is None:  # an OSError about no file of the user's: a bug until shown otherwise
            raise
        sys.exit(f"{prog}: error: " + " ".join(text.split()))


# ---------------------------------------------------------------- argparse types


def positive(kind=int, zero_ok: bool = False):
    """A number above zero (or at least zero), never a silent stand-in for a default."""
    def parse(text: str):
        value = kind(text)
        if not (value >= 0 if zero_ok else value > 0):
            raise argparse.ArgumentTypeError(f"must be {'at least' if zero_ok else 'above'} 0, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in "invalid int value"
    return parse


def fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def below_one(text: str) -> float:
    """A probability in [0, 1): a dropout of 1 would drop everything."""
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def default_device() -> str:
    return "cuda" if cuda_count() else "cpu"


def cuda_count() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def device(text: str) -> str:
    """A device this machine has (cpu, cuda, cuda:N below the GPU count, mps), checked before a model loads."""
    import torch
    count = cuda_count()
    here = "cpu" + (f", cuda (cuda:0 to cuda:{count - 1})" if count else "") + \
        (", mps" if torch.backends.mps.is_available() else "")
    try:
        dev = torch.device(text)
    except RuntimeError:  # torch's own parse of the name: "Expected one of cpu, cuda, ... device type"
        raise argparse.ArgumentTypeError(f"{text!r} is not a device name (this machine has: {here})") from None
    if dev.type == "cuda" and (count == 0 or (dev.index or 0) >= count):
        raise argparse.ArgumentTypeError(f"{text}: " + (f"this machine has {count} CUDA device(s)" if count else
                                                        "CUDA is not available on this machine")
                                         + f" (it has: {here})")
    if dev.type not in ("cpu", "cuda", "mps") or (dev.type == "mps" and not torch.backends.mps.is_available()):
        raise argparse.ArgumentTypeError(f"{text}: not a device llava-min can run on here (this machine has: {here})")
    return text


def existing(kind: str = "file"):
    """A path that must be there: a "file", a "dir" (directory) or "any"."""
    def parse(text: str) -> Path:
        path = Path(text)
        if not path.exists():
            raise argparse.ArgumentTypeError(f"{path} does not exist")
        if kind == "file" and path.is_dir():
            raise argparse.ArgumentTypeError(f"{path} is a directory, expected a file")
        if kind == "dir" and not path.is_dir():
            raise argparse.ArgumentTypeError(f"{path} is a file, expected a directory")
        return path
    return parse


def writable(kind: str = "file"):
    """An output path (a "file" or a "dir"): not the other kind, and inside a directory this process can write
    in (checked by making a temporary file there), so a long run never ends failing to save."""
    def parse(text: str) -> Path:
        path = Path(text)
        if kind == "file" and path.is_dir():
            raise argparse.ArgumentTypeError(f"{path} is a directory, expected a file")
        if kind == "dir" and path.exists() and not path.is_dir():
            raise argparse.ArgumentTypeError(f"{path} is a file, expected a directory")
        there = next(p for p in [path] * (kind == "dir") + list(path.absolute().parents) if p.exists())
        if not there.is_dir():
            raise argparse.ArgumentTypeError(f"{there} is a file, {path} cannot be made inside it")
        try:
            tempfile.TemporaryFile(dir=there).close()
        except OSError as e:
            raise argparse.ArgumentTypeError(f"cannot write in {there} ({e.strerror})") from e
        return path
    return parse
