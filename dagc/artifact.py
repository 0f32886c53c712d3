"""The artifact directory on disk: written atomically, read back with every checksum verified.

Layout::

    out_dir/
        manifest.json   format "dagc.artifact", format_version, files: name -> {sha256, bytes}, ...
        report.md       the manifest's numbers as tables (written by the compiler)
        <files>         model files, per-task SVG pictures, ... (relative POSIX paths; sub-folders
                        allowed, e.g. a Triton model repository)

`write_tree` builds a whole directory in a temporary sibling and swaps it into place
(`dagc.outputs`: atomic even under kill -9; ``force`` replaces only a directory dagc wrote, never
an input), so a reader never sees a half-written artifact and a failed write leaves nothing
behind. This is the core's part of the contract: the compiler writes artifacts with it (and the
Triton export its repositories), the runtime and the tools read them with `load_artifact` (the
typed `dagc.manifest.Manifest` and every file's verified bytes, one consistent snapshot),
`load_manifest` or `read_manifest` (the verified JSON, for tools that only pass it on).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath

from dagc.errors import ArtifactError, CompileError
from dagc.manifest import FORMAT, FORMAT_VERSION, READABLE_VERSIONS, Manifest
from dagc.outputs import check_replaceable, check_writable_dir, install, remove_owned, remove_stale, stage
from dagc.writing import check_name_fits, fsync_dir, write_failed

MANIFEST = "manifest.json"
REPORT = "report.md"

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "REPORT", "read_manifest", "read_artifact", "load_manifest",
           "load_artifact", "read_verified", "write_tree", "check_out_dir", "sha256", "check_name"]


def sha256(data: bytes) -> str:
    """The hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def _plain_relative(name: str) -> PurePosixPath:
    p = PurePosixPath(name)
    if (not name or p.is_absolute() or any(part in ("", ".", "..") for part in p.parts)
            or "\\" in name or str(p) != name):
        raise CompileError(f"file name {name!r} must be a plain relative path (no '..', no leading '/')")
    return p


def check_name(name: str) -> PurePosixPath:
    p = _plain_relative(name)
    if name in (MANIFEST, REPORT):
        raise CompileError(f"artifact file name {name!r} is reserved; write_artifact creates it")
    return p


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def check_out_dir(out_dir: str | os.PathLike, *, force: bool, inputs: Sequence[str | os.PathLike] = (),
                  what: str = "input") -> Path:
    """The checks `write_tree` makes before writing, for a command to make before its work: the
    directory has a name and can be created (`dagc.outputs.check_writable_dir`), and it may be
    written with ``force`` (`dagc.outputs.check_replaceable`; ``what`` names the inputs in the
    message). Returns it as a Path; raises CompileError."""
    out_dir = Path(out_dir)
    if not out_dir.name:
        raise CompileError(f"directory {str(out_dir)!r} has no name")
    # an existing one is swapped out by a rename in its parent; a new one needs its nearest ancestor
    check_writable_dir(out_dir.parent if os.path.lexists(out_dir) else out_dir, option="--out", error=CompileError)
    check_replaceable(out_dir, inputs=inputs, force=force, error=CompileError, what=what)
    return out_dir


def write_tree(out_dir: str | os.PathLike, files: Mapping[str, bytes], *, force: bool = False,
               dirs: Sequence[str] = (), inputs: Sequence[str | os.PathLike] = ()) -> Path:
    """Write a directory of files atomically (an artifact, a Triton model repository) and return
    its path: the one writer and replacer of dagc's output directories.

    ``files``: relative POSIX path -> content; ``dirs``: relative paths of directories to create
    even when empty; ``inputs``: what the command reads, which ``out_dir`` must not be, hold or lie
    in. Stale temporaries of killed writes to ``out_dir`` are removed first
    (`dagc.outputs.remove_stale`); everything is written and fsynced in a temporary sibling (mode
    0755: services read it), which then takes ``out_dir``'s place (`dagc.outputs.install`: with
    ``force`` one atomic exchange with the old directory, which is then removed).

    Raises CompileError if ``out_dir`` has no name, is or holds an input, exists without
    ``force``, exists and is not a directory dagc wrote (`dagc.outputs.check_replaceable`; all
    before writing anything), a path is not a plain relative path or has a name too long for the
    file system, or the system fails a write (a full device: the message says so). On any error
    the temporary directory is removed and an existing ``out_dir`` is left as it was.
    """
    out_dir = check_out_dir(out_dir, force=force, inputs=inputs)
    paths = {n: _plain_relative(n) for n in files}
    for n in [*files, *dirs]:
        check_name_fits(out_dir.joinpath(*_plain_relative(n).parts), what="cannot write", error=CompileError)
    parent = out_dir.parent
    tmp = None
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale(out_dir)
        tmp = stage(out_dir, files)
        for n in sorted(files):
            _write(tmp.joinpath(*paths[n].parts), bytes(files[n]))
        for d in dirs:
            tmp.joinpath(*_plain_relative(d).parts).mkdir(parents=True, exist_ok=True)
        for d in sorted({tmp, *(p for p in tmp.rglob("*") if p.is_dir())}):
            fsync_dir(d)
        install(tmp, out_dir, force=force, inputs=inputs, error=CompileError)
    except BaseException as e:
        if tmp is not None and tmp.exists():
            remove_owned(tmp)
        failed = write_failed(out_dir, e, CompileError) if isinstance(e, Exception) else None
        if failed is None:
            raise
        kept = " (the existing one is unchanged)" if force and os.path.lexists(out_dir) else ""
        raise CompileError(f"{failed}{kept}") from None
    fsync_dir(parent)
    return out_dir


def load_manifest(artifact_dir: str | os.PathLike) -> Manifest:
    """The typed manifest of an artifact directory, every listed file verified (`read_manifest`).

    Takes the directory; returns `dagc.manifest.Manifest` (a version-1 manifest converted: routes
    computed, preprocessing made numeric). Raises ArtifactError as `read_manifest` does and for
    any invalid field (the message names it).
    """
    return load_artifact(artifact_dir)[0]


def load_artifact(artifact_dir: str | os.PathLike) -> tuple[Manifest, dict[str, bytes]]:
    """`load_manifest` and the verified bytes of every listed file, all from one snapshot of the
    directory (`read_artifact`): what a reader that runs the models must use, so that a
    concurrent ``--force`` replace never mixes two artifacts. Raises as `load_manifest`."""
    manifest, files = read_artifact(artifact_dir)
    return Manifest.from_dict(manifest, source=str(Path(artifact_dir) / MANIFEST)), files


def read_verified(artifact_dir: str | os.PathLike, name: str, expected_sha256: str) -> bytes:
    """The bytes of artifact file ``name``, checked against ``expected_sha256`` now (the bytes
    returned are the bytes checked). Raises ArtifactError if it is unreadable or changed since it
    was compiled. (A reader of several files wants `load_artifact`: one snapshot.)"""
    d = Path(artifact_dir)
    try:
        data = d.joinpath(*_check_name_for_read(name).parts).read_bytes()
    except CompileError:
        raise ArtifactError(f"artifact file name {name!r} is not a plain relative path") from None
    except OSError as e:
        raise ArtifactError(f"cannot read artifact file {name!r}: {e}") from None
    if sha256(data) != expected_sha256:
        raise ArtifactError(f"artifact file {name!r} in {d} does not match its sha256 in {MANIFEST} "
                            "(modified after load?); recompile the artifact")
    return data


def read_manifest(artifact_dir: str | os.PathLike) -> dict:
    """Read ``manifest.json`` of an artifact and verify every file it lists; returns the decoded
    JSON (any readable version, unconverted; `load_manifest` gives the typed form).

    Raises ArtifactError if the directory or the manifest is missing, the manifest is not JSON,
    its format is not ``dagc.artifact`` or its version unknown, or a listed file is missing or its
    sha256 (or size) differs from the recorded one (the message names the file).
    """
    return read_artifact(artifact_dir)[0]


# a snapshot is retried when the directory it opened was replaced meanwhile; more than a few
# replaces during one read means something rewrites the path in a loop
_SNAPSHOT_ATTEMPTS = 4


def read_artifact(artifact_dir: str | os.PathLike) -> tuple[dict, dict[str, bytes]]:
    """`read_manifest` and the bytes of every file it lists (name -> bytes, each checked against
    its sha256): one consistent snapshot of the directory.

    The directory is opened once and the manifest and every file are read relative to that open
    directory, so they all come from one artifact even while ``dagc compile --force`` swaps a new
    one in (`dagc.outputs.install`). The old directory is deleted after the swap; when a read then
    fails and ``artifact_dir`` now names another directory, the whole read starts again from the
    new one (up to 4 times). Raises ArtifactError as `read_manifest` does.
    """
    d = Path(artifact_dir)
    for attempt in range(_SNAPSHOT_ATTEMPTS):
        try:
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        except (FileNotFoundError, NotADirectoryError):
            raise ArtifactError(f"artifact directory {d} does not exist; compile one with dagc compile") from None
        except OSError as e:
            raise ArtifactError(f"cannot open artifact directory {d}: {e.strerror or e}") from None
        try:
            return _read_snapshot(d, fd)
        except ArtifactError:
            if attempt + 1 == _SNAPSHOT_ATTEMPTS or not _replaced(d, fd):
                raise
        finally:
            os.close(fd)
    raise AssertionError("unreachable")


def _replaced(d: Path, fd: int) -> bool:
    """Whether path ``d`` no longer names the directory open as ``fd``."""
    try:
        now, then = os.stat(d), os.fstat(fd)
    except OSError:
        return True
    return (now.st_dev, now.st_ino) != (then.st_dev, then.st_ino)


def _read_at(fd: int, name: str) -> bytes:
    f = os.open(name, os.O_RDONLY, dir_fd=fd)
    with os.fdopen(f, "rb") as fh:
        return fh.read()


def _read_snapshot(d: Path, fd: int) -> tuple[dict, dict[str, bytes]]:
    path = d / MANIFEST
    try:
        text = _read_at(fd, MANIFEST).decode("utf-8")
    except FileNotFoundError:
        raise ArtifactError(f"{d} is not a dagc artifact: it has no {MANIFEST}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ArtifactError(f"cannot read {path}: {e}") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ArtifactError(f"{path}: not a dagc artifact manifest (format {found!r}, expected {FORMAT!r})")
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise ArtifactError(f"{path}: artifact format version {manifest.get('format_version')!r} is not "
                            f"supported (this dagc reads versions {list(READABLE_VERSIONS)}); recompile the "
                            "checkpoint with this version of dagc")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ArtifactError(f"{path}: the manifest has no 'files' table")
    contents = {}
    for name, entry in sorted(files.items()):
        try:
            rel = _check_name_for_read(name).as_posix()
            expected = entry["sha256"]
        except (CompileError, TypeError, KeyError):
            raise ArtifactError(f"{path}: malformed entry for file {name!r}") from None
        try:
            data = _read_at(fd, rel)
        except FileNotFoundError:
            raise ArtifactError(f"artifact file {name!r} listed in {MANIFEST} is missing from {d}") from None
        except OSError as e:
            raise ArtifactError(f"cannot read artifact file {name!r}: {e}") from None
        if sha256(data) != expected or ("bytes" in entry and len(data) != entry["bytes"]):
            raise ArtifactError(f"artifact file {name!r} in {d} does not match its sha256 in {MANIFEST} "
                               "(modified or corrupted); recompile the artifact")
        contents[name] = data
    return manifest, contents


def _check_name_for_read(name: str) -> PurePosixPath:
    if name == REPORT:
        return PurePosixPath(name)
    return check_name(name)
