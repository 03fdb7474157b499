"""What every benchmark shares: the machine's description, a text table, and the JSON record."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def machine_description() -> dict:
    """Enough to tell two result files' machines apart (recorded with every result)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "torch": torch.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def summarize(seconds: list[float]) -> dict:
    """Median and interquartile spread, in milliseconds."""
    q1, median, q3 = statistics.quantiles(seconds, n=4) if len(seconds) > 1 else seconds * 3
    return {"median_ms": median * 1e3, "iqr_ms": (q3 - q1) * 1e3}


def format_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """``columns``: (key, format spec) pairs; the key is also the header."""
    cells = [[format(row[key], spec) for key, spec in columns] for row in rows]
    widths = [max(len(key), *(len(c[i]) for c in cells)) for i, (key, _) in enumerate(columns)]
    lines = ["  ".join(key.rjust(w) for (key, _), w in zip(columns, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def write_results(name: str, rows: list[dict], settings: dict) -> Path:
    """``results/<name>-<device>.json`` with the machine, the settings and every row."""
    machine = machine_description()
    device = (machine["gpu"] or "cpu").lower().replace(" ", "-")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}-{device}.json"
    path.write_text(json.dumps({"benchmark": name, "machine": machine, "settings": settings,
                                "rows": rows}, indent=2) + "\n")
    return path
