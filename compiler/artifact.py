"""Writing a compiled artifact: the files, a manifest that lists each with its sha256, and a report.

The directory contract (layout, atomic write, checksummed read) is the core's, `dagc.artifact`;
the manifest is the core's typed `dagc.manifest.Manifest`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from dagc.artifact import MANIFEST, REPORT, check_name, sha256, write_tree
from dagc.compiler.report import report_markdown
from dagc.manifest import FileEntry, Manifest

__all__ = ["write_artifact"]


def write_artifact(out_dir: str | os.PathLike, files: Mapping[str, bytes], manifest: Manifest, *,
                   force: bool = False, inputs: Sequence[str | os.PathLike] = ()) -> Path:
    """Write an artifact directory atomically and return its path.

    ``files``: relative name -> content (model files, SVGs, ...). ``manifest``: everything else the
    manifest holds; its ``files`` are replaced by the listing of ``files`` (name -> sha256, bytes;
    ``report.md`` included). Writes ``manifest.json`` (`Manifest.to_json`) and ``report.md``
    (`dagc.compiler.report.report_markdown` of the manifest before ``report.md`` is listed).

    Raises CompileError if ``out_dir`` exists and ``force`` is false (before writing anything), or
    for a bad file name; ArtifactError if a model of the manifest is not among ``files``.
    ``inputs`` (the checkpoint) must not be, or lie under, ``out_dir``. Replacing and failures as
    `dagc.artifact.write_tree`.
    """
    for n in files:
        check_name(n)
    listed = {n: FileEntry(sha256(bytes(data)), len(data)) for n, data in sorted(files.items())}
    report = report_markdown(replace(manifest, files=listed)).encode("utf-8")
    full = replace(manifest, files={**listed, REPORT: FileEntry(sha256(report), len(report))})
    return write_tree(out_dir, {**files, REPORT: report, MANIFEST: full.to_json().encode("utf-8")}, force=force,
                      inputs=inputs)
