"""How dagc writes one file: the one rule for a temporary sibling's name, the atomic write, and the
one line a failed write becomes.

* `tmp_sibling`: the hidden temporary ``.NAME<tail>`` next to an output ``NAME``. When that would
  be longer than the file system allows a name (NAME_MAX, 255 bytes on most), ``NAME`` is cut and
  a hash of the whole of it is added, so every name that is legal for the final file has a
  legal temporary (`dagc.outputs.stage` names its directories with it too).
* `check_name_fits`: a final name the file system cannot hold is refused with one line naming the
  limit, before any work.
* `write_atomic`: write through a temporary sibling, fsync, rename into place.
* `write_failed`: the `DagcError` an error of the operating system (or a library reporting one)
  while writing becomes: it names the path and, when the device is full, says so.
* `fault_line`: the CLI's one line for an error; an OSError that no command turned into a
  `DagcError` (a name too long for any input path, say) gets one too, never a traceback.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path

from dagc.errors import DagcError

__all__ = ["name_max", "tmp_sibling", "check_name_fits", "write_atomic", "write_failed", "fsync_dir", "fault_line"]

_DEFAULT_NAME_MAX = 255
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# a full device as libraries word it without an errno: safetensors (Rust's io::Error, "No space
# left on device (os error 28)"), numpy's and torch's short writes ("5120 requested and 2016 written")
_FULL_TEXT = re.compile(r"No space left on device|Disk quota exceeded|StorageFull|\d+ requested and \d+ written")


def name_max(directory: str | os.PathLike) -> int:
    """The longest file name, in bytes, the file system of ``directory`` (or of its nearest
    existing ancestor) allows; 255 where the system does not say."""
    d = Path(os.path.abspath(directory))
    while not os.path.isdir(d) and d.parent != d:  # (os.path: a name too long is False, not an error)
        d = d.parent
    try:
        n = os.pathconf(d, "PC_NAME_MAX")
    except (OSError, ValueError):
        return _DEFAULT_NAME_MAX
    return n if isinstance(n, int) and n > 0 else _DEFAULT_NAME_MAX


def _shorten(name: str, room: int) -> str:
    """``name`` when it fits in ``room`` bytes, else its start and 8 hex digits of its sha256."""
    raw = os.fsencode(name)
    if len(raw) <= room:
        return name
    digest = hashlib.sha256(raw).hexdigest()[:8]
    start = raw[:max(0, room - 9)].decode("utf-8", "ignore")  # cut on a character boundary
    return f"{start}~{digest}"


def tmp_sibling(path: str | os.PathLike, tail: str, *, reserve: int | None = None) -> Path:
    """The temporary sibling ``.NAME<tail>`` of ``path``, NAME shortened (`_shorten`) so that the
    whole fits the file system's limit. ``reserve``: the bytes to leave for the tail (default its
    own length); a caller whose tails vary in length (a host name, a pid) reserves their longest,
    so that one NAME always gets the same prefix."""
    path = Path(path)
    room = name_max(path.parent) - 1 - (len(os.fsencode(tail)) if reserve is None else reserve)
    return path.parent / f".{_shorten(path.name, room)}{tail}"


def check_name_fits(path: str | os.PathLike, *, what: str, error: type[DagcError]) -> Path:
    """Refuse ``path`` when one of its names is longer than its file system allows (ENAMETOOLONG
    at the first write otherwise). ``what`` names the path in the message (an option, "the output
    of image X"); returns the path; raises ``error`` naming the limit."""
    path = Path(path)
    limit = name_max(path)
    for part in path.parts:
        n = len(os.fsencode(part))
        if n > limit:
            shown = part if len(part) <= 48 else f"{part[:40]}...{part[-5:]}"
            where = str(path).replace(part, shown)  # the name once, shortened: one readable line
            raise error(f"{what} {where}: the name {shown!r} is {n} bytes long, and this file system allows "
                        f"at most {limit} bytes in a name; choose a shorter name")
    return path


def write_failed(path: str | os.PathLike, e: BaseException, error: type[DagcError],
                 then: str = "run the command again") -> DagcError | None:
    """The one-line ``error`` for ``e``, raised while writing ``path``: "the device is full" for
    ENOSPC and EDQUOT (also when a library reports them as text), the system's reason for any other
    OSError; None for anything else (a bug, not the machine). ``then``: what to do once fixed."""
    code = getattr(e, "errno", None)
    if code in _FULL_ERRNOS or _FULL_TEXT.search(str(e)):
        reason = os.strerror(code) if code in _FULL_ERRNOS else "No space left on device"
        return error(f"cannot write {path}: the device is full ({reason}); nothing was half-written: free space "
                     f"there (or choose another place), then {then}")
    if isinstance(e, OSError):
        return error(f"cannot write {path} ({e.strerror or e}); nothing was half-written: fix that, then {then}")
    return None


def fsync_dir(directory: str | os.PathLike) -> None:
    """fsync a directory (so a rename or a new file in it is durable); errors are ignored: not every
    file system can."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _new_tmp(path: Path) -> Path:
    for _ in range(100):  # O_EXCL: another writer's temporary is never reused
        tmp = tmp_sibling(path, f".{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path))


def write_atomic(path: str | os.PathLike, write: Callable[[str], object], *, error: type[DagcError] = DagcError,
                 then: str = "run the command again") -> Path:
    """Call ``write(tmp_path)`` on a temporary sibling of ``path`` (`tmp_sibling`; its directory is
    created when missing), fsync it, then rename it over ``path``: a reader, a crash or a full disk
    never leaves a half-written file, and the temporary is removed on any error. Returns the path.

    Raises ``error`` (`write_failed`: one line naming the path; ``then`` says what to do once the
    cause is fixed) when the system fails the write: a full device, a name too long, no
    permission; anything else ``write`` raises passes through."""
    path = Path(path)
    check_name_fits(path, what="cannot write", error=error)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _new_tmp(path)
        write(str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except Exception as e:
        failed = write_failed(path, e, error, then)
        if failed is None:
            raise
        raise failed from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    fsync_dir(path.parent)  # make the rename itself durable
    return path


def fault_line(e: DagcError | OSError) -> str:
    """The one line ``dagc: error: ...`` says for ``e``: a DagcError's message; for an OSError that
    reached the CLI unconverted, the path, the system's reason and what to do (a full device and a
    name too long are said as such)."""
    if isinstance(e, DagcError):
        return str(e)
    path = e.filename if e.filename is not None else "a file"
    if e.errno == errno.ENAMETOOLONG:
        shown = str(path) if len(str(path)) <= 60 else f"{str(path)[:60]}..."
        return (f"{shown}: a name in this path is longer than the file system allows (at most "
                f"{name_max(os.path.dirname(os.path.abspath(path)))} bytes in a name); choose a shorter name")
    full = write_failed(path, e, DagcError)
    if full is not None and "device is full" in str(full):
        return str(full)
    return f"{path}: {e.strerror or e}; check the path and its permissions, then run the command again"
