"""The artifact directory on disk: written atomically, read back with every checksum verified.

Layout::

    out_dir/
        manifest.json   format "dagc.artifact", format_version, files: name -> {sha256, bytes}, ...
        report.md       the manifest's numbers as tables (written by the compiler)
        <files>         model files, per-task SVG pictures, ... (relative POSIX paths; sub-folders
                        allowed, e.g. a Triton model repository)

`write_tree` builds a whole directory in a temporary sibling and renames it into place, so a
reader never sees a half-written artifact and a failed write leaves nothing behind. This is the
core's part of the contract: the compiler writes artifacts with it, the runtime and the tools read
them with `load_manifest` (the typed `dagc.manifest.Manifest`) or `read_manifest` (the verified
JSON, for tools that only pass it on), and read a model file's bytes with `read_verified`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath

from dagc.errors import ArtifactError, CompileError
from dagc.manifest import FORMAT, FORMAT_VERSION, READABLE_VERSIONS, Manifest

MANIFEST = "manifest.json"
REPORT = "report.md"

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "REPORT", "read_manifest", "load_manifest", "read_verified",
           "write_tree", "sha256", "check_name"]


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


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_tree(out_dir: str | os.PathLike, files: Mapping[str, bytes], *, force: bool = False,
               dirs: Sequence[str] = ()) -> Path:
    """Write a directory of files atomically (an artifact, a Triton model repository) and return
    its path.

    ``files``: relative POSIX path -> content; ``dirs``: relative paths of directories to create
    even when empty. Everything is written and fsynced in a temporary sibling (mode 0755: services
    read it), which is then renamed to ``out_dir``. With ``force`` an existing ``out_dir`` is
    replaced: the old one is moved aside, the new one renamed in, the old one deleted.

    Raises CompileError if ``out_dir`` has no name, exists and ``force`` is false (before writing
    anything), or a path is not a plain relative path. On any error the temporary directory is
    removed and an existing ``out_dir`` is left as it was.
    """
    out_dir = Path(out_dir)
    name = out_dir.name
    if not name:
        raise CompileError(f"directory {str(out_dir)!r} has no name")
    if (out_dir.exists() or out_dir.is_symlink()) and not force:
        raise CompileError(f"{out_dir} exists; pass --force to replace it")
    paths = {n: _plain_relative(n) for n in files}
    parent = out_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}."))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private (0700)
    try:
        for n in sorted(files):
            _write(tmp.joinpath(*paths[n].parts), bytes(files[n]))
        for d in dirs:
            tmp.joinpath(*_plain_relative(d).parts).mkdir(parents=True, exist_ok=True)
        for d in sorted({tmp, *(p for p in tmp.rglob("*") if p.is_dir())}):
            _fsync_dir(d)
        _install(tmp, out_dir, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(parent)
    return out_dir


def _install(tmp: Path, out_dir: Path, force: bool) -> None:
    """Rename the finished ``tmp`` to ``out_dir``; with ``force`` replace an existing one."""
    if not (out_dir.exists() or out_dir.is_symlink()):
        os.rename(tmp, out_dir)
        return
    if not force:  # appeared while we were writing
        raise CompileError(f"{out_dir} exists; pass --force to replace it")
    aside_root = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old."))
    aside = aside_root / "old"
    try:
        os.rename(out_dir, aside)
        try:
            os.rename(tmp, out_dir)
        except BaseException:
            os.rename(aside, out_dir)  # put the old artifact back
            raise
    except BaseException:
        shutil.rmtree(aside_root, ignore_errors=True)
        raise
    shutil.rmtree(aside_root, ignore_errors=True)


def load_manifest(artifact_dir: str | os.PathLike) -> Manifest:
    """The typed manifest of an artifact directory, every listed file verified (`read_manifest`).

    Takes the directory; returns `dagc.manifest.Manifest` (a version-1 manifest converted: routes
    computed, preprocessing made numeric). Raises ArtifactError as `read_manifest` does and for
    any invalid field (the message names it).
    """
    path = Path(artifact_dir) / MANIFEST
    return Manifest.from_dict(read_manifest(artifact_dir), source=str(path))


def read_verified(artifact_dir: str | os.PathLike, name: str, expected_sha256: str) -> bytes:
    """The bytes of artifact file ``name``, checked against ``expected_sha256`` now (the bytes
    returned are the bytes checked). Raises ArtifactError if it is unreadable or changed since it
    was compiled."""
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
    d = Path(artifact_dir)
    if not d.is_dir():
        raise ArtifactError(f"artifact directory {d} does not exist; compile one with dagc compile")
    path = d / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ArtifactError(f"{d} is not a dagc artifact: it has no {MANIFEST}") from None
    except OSError as e:
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
    for name, entry in sorted(files.items()):
        try:
            p = d.joinpath(*_check_name_for_read(name).parts)
            expected = entry["sha256"]
        except (CompileError, TypeError, KeyError):
            raise ArtifactError(f"{path}: malformed entry for file {name!r}") from None
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            raise ArtifactError(f"artifact file {name!r} listed in {MANIFEST} is missing from {d}") from None
        except OSError as e:
            raise ArtifactError(f"cannot read artifact file {name!r}: {e}") from None
        if sha256(data) != expected or ("bytes" in entry and len(data) != entry["bytes"]):
            raise ArtifactError(f"artifact file {name!r} in {d} does not match its sha256 in {MANIFEST} "
                               "(modified or corrupted); recompile the artifact")
    return manifest


def _check_name_for_read(name: str) -> PurePosixPath:
    if name == REPORT:
        return PurePosixPath(name)
    return check_name(name)
