"""Files that a crash never leaves half written, one writer per output directory, and a user's JSON files read
with errors that name them."""
import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

from .errors import InputError, OptionError

SNAPSHOT = "resume"  # a training run's resumable snapshot: OUT/resume
LOG = "metrics.jsonl"  # a training run's log: in OUT/resume while it runs, then with the model it made


@contextlib.contextmanager
def atomic_dir(path, carry: Optional[Callable[[str], bool]] = None):
    """Write a directory under a temporary name beside `path`, name it `.NAME.new` once complete, and swap it in
    with two renames, so a crash leaves the complete old directory or the complete new one (`recover_dir`
    finishes a swap the new copy was complete for). `carry(name)`: which entries of the old directory the new
    one keeps (hard links, else copies). A full disk is a DiskFullError naming the file by its real name."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{path} is a file, not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it private; the directory it becomes is not
    try:
        yield tmp
        for entry in path.iterdir() if carry is not None and path.exists() else ():
            if carry(entry.name) and not (tmp / entry.name).exists():
                link_copy(entry, tmp / entry.name)
        os.replace(tmp, aside(path, "new"))  # complete: from here on a crash ends in the new copy
        swap_in(path)
    except BaseException as e:  # Ctrl-C too: no half-written copy is left, and the error goes on
        shutil.rmtree(tmp, ignore_errors=True)
        recover_dir(path)  # (the new copy in place if it was complete)
        full = full_disk(e, tmp, path)
        if full is not None:
            raise full from e
        raise


def full_disk(e: BaseException, tmp: Path, path: Path) -> Optional["DiskFullError"]:
    """A full disk met while writing `atomic_dir`'s temporary copy, told with the file's real name; None for
    any other error."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return disk_full(Path(str(e.filename or path).replace(str(tmp), str(path))))
    return DiskFullError(str(e).replace(str(tmp), str(path))) if isinstance(e, DiskFullError) else None


def aside(path: Path, kind: str) -> Path:
    """`.NAME.new`: the complete copy about to replace `path`; `.NAME.old`: the copy it replaces."""
    return path.with_name(f".{path.name}.{kind}")


def swap_in(path: Path) -> None:
    """The complete `.NAME.new` takes the place of `path` (two renames; the old copy removed after)."""
    old, new = aside(path, "old"), aside(path, "new")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(new, path)
    shutil.rmtree(old, ignore_errors=True)


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
    """After a crash in `atomic_dir`'s swap: a complete `.NAME.new` is swapped in (forward), else the previous
    copy, left under its `.old` name, is put back (after the second rename it is a leftover: removed). A crash
    while writing leaves a half-written temporary copy: removed (one writer only: `only_run`)."""
    path = Path(path)
    old = aside(path, "old")
    if aside(path, "new").is_dir():
        swap_in(path)
    elif not path.exists() and old.is_dir():
        os.replace(old, path)
    shutil.rmtree(old, ignore_errors=True)
    for tmp in path.parent.glob(f".{path.name}.*"):
        if re.fullmatch(r"[a-z0-9_]{8}", tmp.name[len(path.name) + 2:]) and tmp.is_dir():  # mkdtemp's names only
            shutil.rmtree(tmp, ignore_errors=True)


def in_place(path) -> Path:
    """What `path` holds once `recover_dir` has looked at it, without changing anything (for a process that may
    not recover it: it holds no lock)."""
    path = Path(path)
    if aside(path, "new").is_dir():
        return aside(path, "new")
    return aside(path, "old") if not path.exists() and aside(path, "old").is_dir() else path


def atomic_write(path, write: Callable[[Path], None], size: int = 0) -> None:
    """`write(tmp)` a file (of about `size` bytes) under a temporary name beside `path`, then rename it into place:
    a crash never leaves a half-written file under the real name; a full disk is a DiskFullError naming it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # (a name of its own per process)
    try:
        with room_for(path, size):
            write(tmp)
        os.chmod(tmp, 0o666 & ~umask())  # the usual mode: the writer may have made it private
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class DiskFullError(InputError):
    """A file that does not fit on its disk; the message names it, the space it needs and the space free."""


def disk_full(file: Path, needed: int = 0, free: Optional[int] = None) -> DiskFullError:
    free = free_space(file) if free is None else free
    need = f"{size_text(needed)} needed, " if needed else ""
    return DiskFullError(f"cannot write {file}: no space left on its disk ({need}{size_text(free)} free)")


def free_space(file) -> int:
    """Bytes free on the disk that holds `file` (or would)."""
    where = Path(file).parent
    while not where.exists():
        where = where.parent
    return shutil.disk_usage(where).free


def size_text(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000


@contextlib.contextmanager
def room_for(file, needed: int):
    """Writing `file` (`needed` bytes): refused before a byte is written where its disk has less free, and a disk
    that fills while writing (ENOSPC) ends in the same one-line DiskFullError."""
    free = free_space(file)
    if needed > free:
        raise disk_full(Path(file), needed, free)
    try:
        yield
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise disk_full(Path(file), needed) from e  # (what is free now, the write having filled it)


@contextlib.contextmanager
def only_run(out, lock: Optional[Path] = None):
    """One run per output (a directory or a file): a second would write the same files, or replace the first's
    finished model. The lock file (`.NAME.lock` beside `out` unless given) holds the owner's pid; one left by a
    killed run is taken over. Under torchrun rank 0 alone takes it (for every process)."""
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    out = Path(out)
    lock = Path(lock or out.with_name(f".{out.name}.lock"))
    lock.parent.mkdir(parents=True, exist_ok=True)
    take_lock(lock, out)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def take_lock(lock: Path, out: Path) -> None:
    """The lock is linked into place whole, pid and all: a second run never reads a lock without its pid."""
    mine = lock.with_name(f"{lock.name}.{os.getpid()}")
    mine.write_text(str(os.getpid()))
    try:
        for _ in range(2):
            try:
                os.link(mine, lock)
                return
            except FileExistsError:
                pid = lock.read_text().strip()
                if not pid.isdigit() or (int(pid) != os.getpid() and alive(int(pid))):  # (ours: a container restart)
                    raise InputError(f"another run (pid {pid or '?'}) is writing {out}; wait for it to end, "
                                     f"or remove {lock} if it is gone") from None
                lock.unlink(missing_ok=True)  # left by a run that was killed
        raise InputError(f"cannot take {lock}")
    finally:
        mine.unlink(missing_ok=True)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def write_text(path, text: str) -> None:
    data = text.encode("utf-8")
    atomic_write(path, lambda tmp: tmp.write_bytes(data), size=len(data))


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
