"""README.md's recorded tables, written from the JSON results so that the two never disagree.

Per benchmark and machine (device) one table: the run at default sizes when there is one, else
the GPU configuration's, else the quick one; among equals the latest. Everything between the two
markers is replaced; the rest of the README is prose kept by hand.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from benchmarks._harness import RESULTS, _cell, describe_ceilings, device_slug

README = Path(__file__).parent / "README.md"
BEGIN = "<!-- results:begin: `python -m benchmarks --readme` writes this part from results/ -->"
END = "<!-- results:end -->"
PROFILE_RANK = {"default": 0, "gpu": 1, "quick": 2}
PROFILE_WORDS = {"default": "default sizes", "gpu": "GPU configuration", "quick": "quick sizes"}


def load_records(results: Path) -> list[tuple[Path, dict]]:
    """Every benchmark record under ``results`` (sub-folders too), as (path, record)."""
    found = []
    for path in sorted(results.rglob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and "benchmark" in record and "rows" in record:
            found.append((path, record))
    return found


def choose(records: list[tuple[Path, dict]]) -> list[tuple[Path, dict]]:
    """One record per (benchmark, device): the best-ranked profile, then the latest date."""
    best: dict[tuple[str, str], tuple[Path, dict]] = {}
    for path, record in records:
        key = (record["benchmark"], _device(record))
        rank = (-PROFILE_RANK.get(record.get("profile", "default"), 3),
                record.get("machine", {}).get("date", ""))
        if key not in best or rank > best[key][0]:
            best[key] = (rank, (path, record))
    return [best[key][1] for key in sorted(best, key=lambda k: (k[1] != "cpu", k))]


def _device(record: dict) -> str:
    return record.get("device") or device_slug({"gpu": record.get("machine", {}).get("gpu")})


def _columns(record: dict) -> list[tuple[str, str]]:
    """The record's own columns, or (older records) every scalar field of its rows."""
    if record.get("columns"):
        return [tuple(c) for c in record["columns"]]
    keys: dict[str, None] = {}
    for row in record["rows"]:
        keys.update({k: None for k, v in row.items() if not isinstance(v, (list, dict))})
    return [(k, "") for k in keys]


def _auto(value, spec: str) -> str:
    if spec or not isinstance(value, float) or math.isnan(value):
        return _cell(value, spec)
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3g}"


def _setting(value) -> str:
    if isinstance(value, list):
        return " ".join(map(_setting, value))
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def render_record(path: Path, record: dict, base: Path) -> str:
    machine = record.get("machine", {})
    profile = record.get("profile", "default")
    versions = ", ".join(f"{k} {machine[k]}" for k in ("torch", "triton", "cuda") if machine.get(k))
    where = f"{machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, " \
            f"GPU: {machine.get('gpu') or 'none'}"
    settings = " ".join(f"{k}={_setting(v)}" for k, v in record.get("settings", {}).items()
                        if k not in ("note", "notes", "argv") and not isinstance(v, dict))
    title = f"{record['benchmark']} · {_device(record)} · {PROFILE_WORDS.get(profile, profile)}"
    lines = [f"### {title}", "", f"{where}; {versions}; {machine.get('date', '?')}; "
                                 f"`{path.relative_to(base).as_posix()}`", ""]
    if record.get("ceilings"):
        lines += [describe_ceilings(record["ceilings"]) + ".", ""]
    lines += [f"Settings: {settings}.", ""]
    columns = _columns(record)
    lines.append("| " + " | ".join(key for key, _ in columns) + " |")
    lines.append("|" + "---|" * len(columns))
    for row in record["rows"]:
        cells = (_auto(row.get(key), spec).replace("|", "\\|") for key, spec in columns)
        lines.append("| " + " | ".join(cells) + " |")
    given = record.get("settings", {})
    notes = ([given["note"]] if given.get("note") else []) + (given.get("notes") or [])
    lines += [""] + [f"- {note}" for note in notes] if notes else []
    return "\n".join(lines)


def render_tables(results: Path = RESULTS, base: Path | None = None) -> str:
    base = base or results.parent
    chosen = choose(load_records(results))
    if not chosen:
        return "No results recorded yet."
    return "\n\n".join(render_record(path, record, base) for path, record in chosen)


def update_readme(readme: Path = README, results: Path = RESULTS) -> Path:
    """Replace what lies between the markers (appending them if absent) with the tables."""
    text = readme.read_text() if readme.exists() else ""
    block = f"{BEGIN}\n\n{render_tables(results, readme.parent)}\n\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + ("\n\n" if text else "") + block + "\n"
    readme.write_text(text)
    return readme
