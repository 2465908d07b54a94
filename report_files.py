"""The report's files: the text and its JSON twin, named together, each written atomically.

An interrupted run leaves the previous report or none, never half of one, and a report that cannot
be written is refused before any work.
"""
from __future__ import annotations

import os
from pathlib import Path

from provenance import strict_json
from recovery_report import Report, render


def json_path(report_path: Path) -> Path:
    return report_path.with_suffix(".json")


def picture_path(report_path: Path, picture: str) -> Path:
    """A picture named after its report: /tmp/run.txt gives /tmp/run.timeline.png (two reports
    written to different paths never overwrite each other's pictures)."""
    stem = report_path.with_suffix("")
    return stem.with_name(f"{stem.name}.{picture}.png")


def write_report(report_path: Path, report: Report) -> None:
    """Write the text report and its JSON twin (same name, .json, strict JSON), each atomically."""
    text, data = render(report), strict_json(report, indent=2)  # both complete before either file is replaced
    write_text_atomically(report_path, text)
    write_text_atomically(json_path(report_path), data)


def write_text_atomically(path: Path, text: str) -> None:
    """A temporary file beside `path`, then os.replace: an interrupted write leaves the old file or none."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_writable(report_path: Path) -> None:
    """Fail before any work if the report cannot be written (a one-line OSError)."""
    folder = report_path.parent
    if folder.exists() and not folder.is_dir():
        raise OSError(f"{folder} is a file, not a folder")
    if not folder.is_dir():
        raise OSError(f"report folder {folder} does not exist")
    for path in (report_path, json_path(report_path)):
        if path.is_dir():
            raise OSError(f"{path} is a folder")
    if not os.access(folder, os.W_OK):
        raise OSError(f"report folder {folder} is not writable")
