"""Files that a crash never leaves half written, one writer per output directory, and a user's JSON files read
with errors that name them."""
import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

from .errors import InputError, OptionError

SNAPSHOT = "resume"  # a training run's resumable snapshot: OUT/resume


@contextlib.contextmanager
def atomic_dir(path, carry: Optional[Callable[[str], bool]] = None):
    """Write a directory under a temporary name beside `path` and swap it in with two renames at the end, so a
    crash leaves the complete old directory or the complete new one (`recover_dir` undoes a crash between the
    renames). `carry(name)`: which entries of the old directory the new one keeps (hard links, else copies)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{path} is a file, not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it private; the directory it becomes is not
    try:
        yield tmp
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            for entry in path.iterdir() if carry is not None else ():
                if carry(entry.name) and not (tmp / entry.name).exists():
                    link_copy(entry, tmp / entry.name)
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:  # Ctrl-C too: no half-written copy is left, and the error goes on
        shutil.rmtree(tmp, ignore_errors=True)
        recover_dir(path)  # (the old copy back at once if the second rename failed)
        raise


def link_copy(src: Path, dst: Path) -> None:
    """A hard link (a copy where links fail: another file system), a tree of them for a directory."""
    def link(a, b):
        try:
            os.link(a, b, follow_symlinks=False)
        except OSError:
            shutil.copy2(a, b, follow_symlinks=False)
    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, dst, symlinks=True, copy_function=link)
    else:
        link(src, dst)


def recover_dir(path) -> None:
    """After a crash between `atomic_dir`'s two renames only the previous copy is left, under its `.old` name:
    put it back (after the second rename it is a leftover: remove it). A crash while writing leaves a
    half-written temporary copy: remove it (one writer only)."""
    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    if not path.exists() and old.is_dir():
        os.replace(old, path)
    elif old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    for tmp in path.parent.glob(f".{path.name}.*"):
        if re.fullmatch(r"[a-z0-9_]{8}", tmp.name[len(path.name) + 2:]) and tmp.is_dir():  # mkdtemp's names only
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write(path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` a file under a temporary name beside `path`, then rename it into place: a crash
    never leaves a half-written file under the real name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # (a name of its own per process)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask())  # the usual mode: the writer may have made it private
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def only_run(out: Path):
    """One gen_data run per output directory: a second would ask (and pay) the teacher twice and write the
    same files. A lock file holds the owner's pid; one left by a killed run is taken over."""
    out.mkdir(parents=True, exist_ok=True)
    lock = out / ".gen_data.lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            pid = lock.read_text().strip()
            if not pid.isdigit() or (int(pid) != os.getpid() and alive(int(pid))):  # (ours: a container restart)
                raise InputError(f"another run (pid {pid or '?'}) is writing {out}; wait for it to end, "
                                 f"or remove {lock} if it is gone")
            lock.unlink(missing_ok=True)  # left by a run that was killed
    else:
        raise InputError(f"cannot take {lock}")
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def write_text(path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path, data) -> None:
    write_text(path, json.dumps(data, ensure_ascii=False))


def umask() -> int:
    """The process's umask (it can only be read by setting it)."""
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def read_json(path):
    """A user's JSON file; a missing or malformed one is an InputError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not valid JSON ({e})") from e


def same_settings(file: Path, ours: dict, what: str) -> None:
    """Outputs made by other settings are not reused or overwritten under this command's name: the first run
    records its settings beside them, and a later one with other values stops, naming them."""
    if file.is_file():
        theirs = read_json(file)
        diff = [f"{k} {theirs.get(k)!r} (this command: {v!r})" for k, v in ours.items() if theirs.get(k) != v]
        if diff:
            raise OptionError(f"{what} made with " + ", ".join(diff) + f" ({file}): pass another --out / "
                              "--data-dir, or remove it to make it again")
    else:
        write_text(file, json.dumps(ours, indent=2))
