"""Writing a compiled artifact: the files, a manifest that lists each with its sha256, and a report.

The directory contract (layout, atomic write, checksummed read) is the core's, `dagc.artifact`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from dagc.artifact import FORMAT, FORMAT_VERSION, MANIFEST, REPORT, check_name, sha256, write_tree
from dagc.compiler.report import report_markdown

__all__ = ["write_artifact"]


def write_artifact(out_dir: str | os.PathLike, files: Mapping[str, bytes], manifest: Mapping, *,
                   force: bool = False) -> Path:
    """Write an artifact directory atomically and return its path.

    ``files``: relative name -> content (model files, SVGs, ...). ``manifest``: everything else the
    manifest holds (see `dagc.compiler.report`); it is not modified. Adds ``format``,
    ``format_version`` and ``files`` (name -> {"sha256", "bytes"}, ``report.md`` included), writes
    ``manifest.json`` (sorted keys, indent 2) and ``report.md``.

    Raises CompileError if ``out_dir`` exists and ``force`` is false (before writing anything), or
    for a bad file name. Replacing and failures as `write_tree`.
    """
    for n in files:
        check_name(n)
    full = dict(manifest)
    full["format"], full["format_version"] = FORMAT, FORMAT_VERSION
    full["files"] = {n: {"sha256": sha256(bytes(data)), "bytes": len(data)} for n, data in sorted(files.items())}
    report = report_markdown(full).encode("utf-8")
    full["files"][REPORT] = {"sha256": sha256(report), "bytes": len(report)}
    text = json.dumps(full, sort_keys=True, indent=2, allow_nan=False) + "\n"
    return write_tree(out_dir, {**files, REPORT: report, MANIFEST: text.encode("utf-8")}, force=force)
