"""Where dagc writes: the checks an output path gets before any work, and the one way a directory
of files (an artifact, a Triton model repository) is put in place or replaced.

* `check_writable_dir` / `check_writable_file`: an output that cannot be written (under a regular
  file, in a read-only or foreign directory, a directory where a file is expected) is refused with
  one line before a command starts its work.
* `check_replaceable`: what ``--force`` may delete. Only a directory dagc wrote: its top level has
  a marker (``manifest.json`` of format ``dagc.artifact``, ``routing.json`` of format
  ``dagc.triton_routing``, or a temporary directory's own marker) whose ``files`` list every file
  in it, it is not a symbolic link, and it neither is, holds nor lies inside one of the command's
  inputs. A training run directory has no such marker, so it is never replaced.
* `stage` and `install`: a directory is written in full under a temporary sibling
  ``.NAME.dagc-tmp-<host>-<pid>-<random>`` (a long NAME cut and hashed to fit the file system,
  `dagc.writing.tmp_sibling`; with a marker listing what it will hold) and then
  swapped in with one ``renameat2(RENAME_EXCHANGE)``: at every instant the path holds either the
  complete old or the complete new directory, whatever system call a kill -9 interrupts. The old
  one, now under the temporary name, is then removed (its listed files first, its marker last,
  so what a kill leaves is still provably dagc's). `remove_stale` deletes such leftovers of dead
  processes on this host before the next write to the same path.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import secrets
import socket
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from dagc.errors import DagcError
from dagc.writing import check_name_fits, tmp_sibling

TMP_MARKER = ".dagc-tmp.json"
# marker file at the top of a directory dagc wrote -> the "format" it holds; its "files" list the rest
MARKERS = {"manifest.json": "dagc.artifact", "routing.json": "dagc.triton_routing", TMP_MARKER: "dagc.tmp"}
_TMP_TAG = ".dagc-tmp-"

__all__ = ["MARKERS", "TMP_MARKER", "broken_link", "check_writable_dir", "check_writable_file", "check_replaceable",
           "check_not_input", "stage", "install", "remove_stale", "remove_owned"]


# ---------------------------------------------------------------------------------------------------
# output paths


def _nearest_existing(path: Path) -> Path:
    p = path
    while not (p.exists() or p.is_symlink()):
        if p.parent == p:
            break
        p = p.parent
    return p


def _probe(directory: Path) -> str | None:
    """None when a file can be created in ``directory`` (tried for real: permissions, read-only
    mounts, ACLs), else the reason. The probe has no name (O_TMPFILE) where the OS and filesystem
    allow, so a kill leaves nothing; elsewhere a hidden file, deleted at once."""
    if not directory.is_dir():
        return f"{directory} is not a directory"
    try:
        os.close(os.open(directory, os.O_WRONLY | getattr(os, "O_TMPFILE", 0) | os.O_CLOEXEC, 0o600))
        return None
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT):
            return e.strerror or str(e)
    try:  # no O_TMPFILE here (EISDIR, EOPNOTSUPP, EINVAL)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".dagc-probe-")
    except OSError as e:
        return e.strerror or str(e)
    os.close(fd)
    os.unlink(probe)
    return None


def broken_link(path: str | os.PathLike) -> str | None:
    """What is wrong with ``path`` when it is a symbolic link that leads nowhere (``"a symbolic
    link loop"``, ``"a symbolic link to a missing file"``, also through a link in a folder above
    it); None otherwise (it exists, or is plainly absent)."""
    try:
        os.stat(path)
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symbolic link loop"
        return "a symbolic link to a missing file" if os.path.islink(path) else None


def _check_base(path: Path, base: Path, option: str, error: type[DagcError]) -> None:
    link = broken_link(base)
    if link is not None:
        raise error(f"cannot write to {option} {path}: {base} is {link}; remove it or choose another {option}")
    if not base.is_dir():
        raise error(f"cannot write to {option} {path}: {base} is a file, not a directory; choose another "
                    f"{option}")
    reason = _probe(base)
    if reason is not None:
        raise error(f"cannot write to {option} {path} ({reason}); choose a writable {option}")


def check_writable_dir(path: str | os.PathLike, *, option: str, error: type[DagcError]) -> Path:
    """Check, before any work, that directory ``path`` can be created (or, when it exists, written
    in); creates nothing. Takes the path, the option it came from (for the message) and the
    DagcError subclass to raise; returns the path. Raises ``error`` when the path is a file, lies
    under a regular file, has a name too long for its file system (`dagc.writing.check_name_fits`),
    or the nearest existing directory cannot be reached or written."""
    path = check_name_fits(path, what=option, error=error)
    try:
        if path.exists() and not path.is_dir():
            raise error(f"{option} {path} exists and is not a directory; choose a directory for {option}")
        base = _nearest_existing(path)
    except OSError as e:  # a directory on the way that cannot be searched
        raise error(f"cannot write to {option} {path} ({e.strerror or e}); choose a writable {option}") from None
    _check_base(path, base, option, error)
    return path


def check_writable_file(path: str | os.PathLike, *, option: str, error: type[DagcError]) -> Path:
    """`check_writable_dir` for a file to be written (replaced) at ``path``: it must not be a
    directory, and its directory must exist or be creatable, and be writable. Returns the path;
    raises ``error``."""
    path = check_name_fits(path, what=option, error=error)
    try:
        if path.is_dir():
            raise error(f"{option} {path} is a directory; give a file name")
        base = path.parent if path.exists() else _nearest_existing(path)
    except OSError as e:
        raise error(f"cannot write to {option} {path} ({e.strerror or e}); choose a writable {option}") from None
    _check_base(path, base, option, error)
    return path


# ---------------------------------------------------------------------------------------------------
# what --force may replace


def _related(out: Path, inp: Path) -> str | None:
    # os.path.realpath, not Path.resolve: a symbolic link loop is the reader's to report, not a RuntimeError here
    outs = {Path(os.path.abspath(out)), Path(os.path.realpath(out))}
    for i in {Path(os.path.abspath(inp)), Path(os.path.realpath(inp))}:
        for o in outs:
            if o == i:
                return "is"
            if o in i.parents:
                return "holds"
            if i in o.parents:
                return "lies inside"
    return None


def check_not_input(out: str | os.PathLike, inputs: Iterable[str | os.PathLike], *, option: str,
                    error: type[DagcError], what: str = "input") -> None:
    """Raise ``error`` if output ``out`` is, holds, or lies inside one of ``inputs`` (called
    ``what`` in the message): writing there would overwrite or delete what the command reads."""
    for inp in inputs:
        how = _related(Path(out), Path(inp))
        if how is not None:
            raise error(f"{option} {out} {how} the {what} {inp}; writing there would destroy it: choose another "
                        f"{option}")


def _marker_listing(d: Path, marker: str) -> set[str] | None:
    """The files marker ``marker`` at the top of ``d`` lists (itself included); None: absent or invalid."""
    try:
        doc = json.loads((d / marker).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != MARKERS[marker] or not isinstance(doc.get("files"),
                                                                                           (dict, list)):
        return None
    return {marker} | {n for n in doc["files"] if isinstance(n, str)}


def _listed(d: Path) -> set[str] | None:
    """The files the markers at the top of ``d`` account for (markers included); None: no valid marker."""
    found = [s for s in (_marker_listing(d, m) for m in MARKERS) if s is not None]
    return set().union(*found) if found else None


def _files(d: Path) -> list[str]:
    """Every non-directory under ``d`` (symbolic links are not followed), as relative POSIX paths."""
    out = []
    for root, dirs, files in os.walk(d):
        rel = Path(root).relative_to(d)
        out += [(rel / n).as_posix() for n in files]
        out += [(rel / n).as_posix() for n in dirs if os.path.islink(os.path.join(root, n))]
    return sorted(out)


def _foreign(d: Path) -> list[str]:
    """The files in ``d`` that no valid marker lists (all of them when it has no marker)."""
    files = _files(d)
    listed = _listed(d)
    if listed is None:
        return files
    return [f for f in files if f not in listed]


def check_replaceable(out: str | os.PathLike, *, inputs: Sequence[str | os.PathLike] = (), force: bool,
                      error: type[DagcError], option: str = "--out", what: str = "input") -> None:
    """Check, before any work, that ``out`` may be written: it is none of ``inputs``, holds none
    and lies inside none (`check_not_input`); when it exists, ``force`` is given and it is a
    directory dagc wrote with nothing else in it (module docstring). Raises ``error`` saying what
    to do."""
    out = Path(out)
    check_not_input(out, inputs, option=option, error=error, what=what)
    if not (out.exists() or out.is_symlink()):
        return
    if not force:
        raise error(f"{out} exists; pass --force to replace it")
    if out.is_symlink():
        raise error(f"{out} is a symbolic link; --force replaces only a directory dagc wrote: remove the link or "
                    f"choose another {option}")
    if not out.is_dir():
        raise error(f"{out} exists and is not a directory; --force replaces only a directory dagc wrote: choose "
                    f"another {option}")
    if _listed(out) is None:
        raise error(f"{out} is not a dagc artifact or Triton repository (no dagc manifest.json or routing.json), "
                    f"so --force will not delete it: choose another {option} or remove it yourself")
    foreign = _foreign(out)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise error(f"{out} holds files dagc did not write ({shown}), so --force will not delete it: move them "
                    f"away or choose another {option}")


# ---------------------------------------------------------------------------------------------------
# staging, the atomic swap, removal


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:24] or "host"


# the longest tail `_tmp_name` adds (tag, a 24-character host, a pid, 8 hex digits): a long NAME is
# shortened by the same rule for every process, so `remove_stale` finds what another one left
_TMP_TAIL = len(_TMP_TAG) + 24 + 1 + 10 + 1 + 8


def _tmp_pattern(out: Path) -> re.Pattern:
    prefix = tmp_sibling(out, _TMP_TAG, reserve=_TMP_TAIL).name
    return re.compile(re.escape(prefix) + r"(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)-[0-9a-f]{8}\Z")


def _tmp_name(out: Path) -> Path:
    return tmp_sibling(out, f"{_TMP_TAG}{_host()}-{os.getpid()}-{secrets.token_hex(4)}", reserve=_TMP_TAIL)


def stage(out: Path, names: Iterable[str]) -> Path:
    """Create the temporary sibling of ``out`` (mode 0755: services read it) holding only its
    marker, which lists ``names`` (the files about to be written); returns its path."""
    tmp = _tmp_name(out)
    os.mkdir(tmp, 0o755)
    os.chmod(tmp, 0o755)  # whatever the umask
    doc = {"format": MARKERS[TMP_MARKER], "target": out.name, "pid": os.getpid(), "files": sorted(names)}
    (tmp / TMP_MARKER).write_text(json.dumps(doc) + "\n", encoding="utf-8")
    return tmp


_AT_FDCWD, _NOREPLACE, _EXCHANGE = -100, 1, 2
try:
    _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
except (AttributeError, OSError):
    _renameat2 = None


def _rename2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False when this OS or filesystem does not support it."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    e = ctypes.get_errno()
    if e in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(e, os.strerror(e), str(src), None, str(dst))


def install(tmp: Path, out: Path, *, force: bool, inputs: Sequence[str | os.PathLike], error: type[DagcError]) -> None:
    """Put the finished ``tmp`` (from `stage`) at ``out``; with ``force`` replace the directory
    there, checked again with `check_replaceable` just before the swap.

    Linux (glibc >= 2.28, a filesystem with ``RENAME_EXCHANGE``): one atomic exchange, so ``out``
    always holds a complete old or new directory; the old one is then removed from ``tmp``'s name.
    Elsewhere (EINVAL/ENOSYS) two renames: old ``out`` -> another temporary name, ``tmp`` -> ``out``;
    a kill between them leaves no ``out`` and the complete old directory under the temporary name,
    which the next write to ``out`` removes (`remove_stale`). A new ``out`` that appears while
    writing is never overwritten without ``force``. Raises ``error``, OSError.
    """
    own = any(_marker_listing(tmp, m) is not None for m in MARKERS if m != TMP_MARKER)
    if own:  # the complete new tree is accounted for by its own marker (manifest.json, routing.json)
        (tmp / TMP_MARKER).unlink()
    _replace(tmp, out, force=force, inputs=inputs, error=error)
    if not own:  # a tree with no marker of its own: it was ours while the marker was there
        (out / TMP_MARKER).unlink()


def _replace(tmp: Path, out: Path, *, force: bool, inputs: Sequence[str | os.PathLike],
             error: type[DagcError]) -> None:
    exists = out.exists() or out.is_symlink()
    if exists:
        check_replaceable(out, inputs=inputs, force=force, error=error)
    else:
        try:
            if _rename2(tmp, out, _NOREPLACE):
                return
        except FileExistsError:
            raise error(f"{out} appeared while it was being written; pass --force to replace it") from None
        if out.exists() or out.is_symlink():
            raise error(f"{out} appeared while it was being written; pass --force to replace it")
        os.rename(tmp, out)
        return
    if _rename2(tmp, out, _EXCHANGE):
        remove_owned(tmp)
        return
    aside = _tmp_name(out)
    os.rename(out, aside)
    try:
        os.rename(tmp, out)
    except BaseException:  # an error or Ctrl-C between the two: put the old one back
        os.rename(aside, out)
        raise
    remove_owned(aside)


def remove_owned(d: Path) -> None:
    """Delete what a marker in ``d`` lists (other files first, markers last, then the emptied
    directories): a kill half-way leaves a directory that is still provably dagc's. Anything
    unlisted stays, and so does its directory."""
    files = _files(d)
    # a marker cut short by a kill while `stage` wrote it, before any other file: still ours
    listed = _listed(d) or ({TMP_MARKER} if files == [TMP_MARKER] else set())
    markers = [f for f in files if f in MARKERS]
    for f in [f for f in files if f in listed and f not in MARKERS] + [f for f in markers if f in listed]:
        try:
            os.unlink(d / f)
        except FileNotFoundError:  # another process cleaning the same leftover
            pass
    for root, _, _ in sorted(os.walk(d), key=lambda w: -len(Path(w[0]).parts)):
        try:
            os.rmdir(root)
        except OSError:  # holds something nobody listed: leave it
            pass


def _dead(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


def remove_stale(out: Path) -> list[Path]:
    """Remove the temporary directories a killed write to ``out`` left next to it: named as
    `stage` names them, by a process of this host that is gone, and holding only files a marker
    in them lists (or none). Returns what was removed; anything it cannot prove is left."""
    pattern, removed = _tmp_pattern(out), []
    try:
        entries = list(os.scandir(out.parent))
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if not m or m["host"] != _host() or not _dead(int(m["pid"])) or not entry.is_dir(follow_symlinks=False):
            continue
        d = Path(entry.path)
        if _foreign(d) == [] or _files(d) == [TMP_MARKER]:  # (the marker alone: cut short by a kill)
            remove_owned(d)
            removed.append(d)
    return removed
