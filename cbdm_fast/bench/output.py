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
