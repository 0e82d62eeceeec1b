"""Files that a crash never leaves half written, and one writer per output directory."""
import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


@contextlib.contextmanager
def atomic_dir(path):
    """Write a directory under a temporary name and swap it in at the end, so a crash never leaves a
    half-written checkpoint where a good one was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def recover_dir(path) -> None:
    """After a crash between `atomic_dir`'s two renames only the previous copy is left, under its `.old` name:
    put it back. A crash while writing leaves a half-written temporary copy: remove it (one writer only)."""
    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    if not path.exists() and old.is_dir():
        os.replace(old, path)
    for tmp in path.parent.glob(f".{path.name}.*"):
        if tmp != old and tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write(path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` a file under a temporary name beside `path`, then rename it into place: a crash
    never leaves a half-written file under the real name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # (a name of its own per process)
    try:
        write(tmp)
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
                raise SystemExit(f"gen_data: another run (pid {pid or '?'}) is writing {out}; wait for it to end, "
                                 f"or remove {lock} if it is gone")
            lock.unlink(missing_ok=True)  # left by a run that was killed
    else:
        raise SystemExit(f"gen_data: cannot take {lock}")
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
