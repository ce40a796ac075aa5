"""Writing benchmark results: the JSON list of records, and the markdown table when asked for."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


def write_records(records: list[dict], json_path, markdown_path: Optional[str] = None,
                  markdown: Optional[str] = None) -> None:
    """``records`` as an indented JSON list at ``json_path``; ``markdown`` (text) at ``markdown_path``."""
    path = Path(json_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=2) + "\n")
    if markdown_path:
        md = Path(markdown_path)
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(markdown if markdown is not None else "")


def text_table(header: str, columns: tuple, rows: list[list[str]], left: int = 1) -> str:
    """``header``, then the rows aligned under ``columns`` (the first ``left`` columns left-aligned)."""
    rows = [list(columns)] + rows
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = [header]
    for k, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(header: str, columns: tuple, rows: list[list[str]]) -> str:
    """``header``, a blank line, and a markdown table."""
    lines = [header, "", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
