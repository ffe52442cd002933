"""Benchmark results out: a flat list of rows, Markdown for the README, CSV, a PNG, comparisons."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from edgebc import sysinfo
from edgebc.atomic import atomic_write_text

KEYS = ("p50_ms", "p90_ms", "p99_ms", "max_ms", "per_s", "cpu_ms")


def rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per timed thing: section, model, what, batch, and the numbers (or why not)."""
    out: list[dict[str, Any]] = []
    for name, result in report["stages"].items():
        out.append({"section": "stage", "model": "", "what": name, "batch": 1, **result})
    for model, sections in report["models"].items():
        for backend, result in sections["backends"].items():
            row = {"section": "model", "model": model, "what": backend}
            if "unavailable" in result:
                out.append({**row, "batch": "", "note": result["unavailable"]})
                continue
            wrong = result.get("check", {}).get("wrong")
            if wrong:
                out.append(
                    {**row, "batch": "", "note": f"WRONG, not timed: {wrong}", "wrong": True}
                )
                continue
            for batch, timing in result["batches"].items():
                if "unavailable" in timing:
                    out.append({**row, "batch": batch[1:], "note": timing["unavailable"]})
                else:
                    out.append({**row, "batch": int(batch[1:]), **timing})
        for what, timing in sections["pipeline"].items():
            if isinstance(timing, dict) and "p50_ms" in timing:
                out.append(
                    {"section": "pipeline", "model": model, "what": what, "batch": 1, **timing}
                )
    return out


def fastest_checked(backends: dict[str, Any], batch: int = 1) -> str | None:
    """The backend with the lowest p50 at `batch` among those whose outputs passed the check."""
    timed = {
        name: result["batches"][f"b{batch}"]["p50_ms"]
        for name, result in backends.items()
        if not result.get("check", {}).get("wrong")
        and "p50_ms" in result.get("batches", {}).get(f"b{batch}", {})
    }
    return min(timed, key=timed.__getitem__) if timed else None


def check_lines(model: str, backends: dict[str, Any]) -> list[str]:
    """The output check of every backend that ran: the figures, and WRONG where it failed."""
    from edgebc.bench.accuracy import check_summary

    lines = [f"\n{model}: outputs on the check frames against ONNX Runtime FP32"]
    lines += [
        f"- {name}: {check_summary(result.get('check'))}"
        for name, result in backends.items()
        if "unavailable" not in result
    ]
    fastest = fastest_checked(backends)
    if fastest:
        lines.append(f"- fastest at batch 1 among the backends that passed: {fastest}")
    return lines


def to_markdown(report: dict[str, Any]) -> str:
    cpu = report["machine"]["cpu"]
    lines = [
        f"edgebc {report['edgebc']}, {report['date']}, {sysinfo.cpu_line(cpu)}, "
        f"Python {report['machine']['python']}, OpenCV {report['machine']['opencv']}"
        + (f", GPU {'; '.join(report['machine']['gpus'])}" if report["machine"].get("gpus") else "")
        + (" — quick run, few iterations" if report["quick"] else ""),
        *([f"\n**{report['load']['busy']}**"] if report.get("load", {}).get("busy") else []),
        "",
        "| section | model | what | batch | p50 ms | p90 ms | p99 ms | max ms | items/s | CPU ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows(report):
        if "note" in row:
            note = row["note"] if row.get("wrong") else f"not available: {row['note']}"
            lines.append(
                f"| {row['section']} | {row['model']} | {row['what']} | {row['batch']} | {note} |||||||"
            )
            continue
        lines.append(f"| {row['section']} | {row['model']} | {row['what']} | {row['batch']} | "
                     + " | ".join(f"{row[k]:.3f}" if k != "per_s" else f"{row[k]:.0f}" for k in KEYS) + " |")  # fmt: skip
    for model, sections in report["models"].items():
        lines.extend(check_lines(model, sections["backends"]))
        lines.extend(_gpu_lines(model, sections["backends"]))
        pipeline = sections["pipeline"]
        for precision, why in pipeline.get("not_timed", {}).items():
            lines.append(f"\n{model}: the {precision} pipeline was not timed: **WRONG**, {why}")
        for key, value in pipeline.items():
            if key.startswith("speedup_vs_naive"):
                tag = key.rsplit("_", 1)[-1]
                cpu = pipeline.get(f"cpu_speedup_vs_naive_{tag}")
                lines.append(
                    f"\n{model}: edgebc pipeline (ORT FP32, 1 thread) is {value:.1f}x faster than the PIL + torch notebook pipeline at p50 ({tag}"
                    + (f"; {cpu:.1f}x in CPU time per frame" if cpu else "")
                    + "), timed interleaved"
                )
            if key.startswith("headroom"):
                lines.append(f"\n{model}: at {value['fps']:.0f} fps from 1920x1080 the pipeline used {value['core_fraction']:.0%} of one core; "
                             f"{value['late']} late and {value['dropped']} dropped of {value['frames']} frames")  # fmt: skip
    lines.append(f"\npeak RSS {report['peak_rss_mb']:.0f} MB; run took {report['seconds']:.0f} s")
    return "\n".join(lines)


def _gpu_lines(model: str, backends: dict[str, Any]) -> list[str]:
    """Device memory per GPU backend, and each GPU backend's batch-1 speed-up over PyTorch eager CUDA."""
    lines = [
        f"\n{model}: {name} held {result['device_memory_mb']:.0f} MB of GPU memory (whole process)"
        for name, result in backends.items()
        if result.get("device_memory_mb") is not None
    ]
    eager = backends.get("torch-eager-cuda", {}).get("batches", {}).get("b1", {}).get("p50_ms")
    if eager:
        for name, result in backends.items():
            p50 = result.get("batches", {}).get("b1", {}).get("p50_ms")
            if p50 and result.get("gpu") and name != "torch-eager-cuda":
                lines.append(
                    f"\n{model}: {name} is {eager / p50:.1f}x faster than PyTorch eager CUDA at batch 1 (p50)"
                )
    return lines


def to_csv(report: dict[str, Any]) -> str:
    buffer = io.StringIO()
    fields = ["section", "model", "what", "batch", *KEYS, "iterations", "note"]
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows(report))
    return buffer.getvalue()


def to_png(report: dict[str, Any], path: Path) -> Path:
    """Latency per backend (p50 with a p99 whisker, batch 1) and stacked per-stage bars of the pipeline."""
    from edgebc.optional import require

    matplotlib = require("matplotlib", "the benchmark's PNG")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(report["models"])
    fig, axes = plt.subplots(len(models), 2, figsize=(13, 3.5 * max(1, len(models))), squeeze=False)
    for row, model in enumerate(models):
        sections = report["models"][model]
        names, p50, p99 = [], [], []
        for backend, result in sections["backends"].items():
            timing = result.get("batches", {}).get("b1", {})
            if "p50_ms" in timing:
                names.append(backend)
                p50.append(timing["p50_ms"])
                p99.append(timing["p99_ms"])
        ax = axes[row][0]
        ax.barh(
            names,
            p50,
            xerr=[[0] * len(p50), [b - a for a, b in zip(p50, p99, strict=True)]],
            color="#4c9aff",
        )
        ax.set_xlabel("ms per frame, batch 1 (bar p50, whisker to p99)")
        ax.set_title(f"{model}: model only")
        ax = axes[row][1]
        pipelines = {
            k: v
            for k, v in sections["pipeline"].items()
            if isinstance(v, dict) and "stages_p50_ms" in v
        }
        left = [0.0] * len(pipelines)
        stages = sorted({s for v in pipelines.values() for s in v["stages_p50_ms"]})
        for stage in stages:
            widths = [v["stages_p50_ms"].get(stage, 0.0) for v in pipelines.values()]
            ax.barh(list(pipelines), widths, left=left, label=stage)
            left = [a + b for a, b in zip(left, widths, strict=True)]
        ax.set_xlabel("ms per frame (p50 per stage)")
        ax.set_title(f"{model}: full pipeline")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def compare(
    current: dict[str, Any], previous: dict[str, Any], tolerance: float
) -> tuple[list[str], bool]:
    """Lines 'what: previous -> current (ratio)' for every p50 both runs have; True if any slowed past tolerance."""
    old = {
        (r["section"], r["model"], r["what"], str(r["batch"])): r
        for r in rows(previous)
        if "p50_ms" in r
    }
    lines, regressed = [], False
    for row in rows(current):
        key = (row["section"], row["model"], row["what"], str(row["batch"]))
        if "p50_ms" not in row or key not in old:
            continue
        ratio = row["p50_ms"] / old[key]["p50_ms"]
        flag = ""
        if ratio > 1 + tolerance:
            flag, regressed = "  REGRESSION", True
        lines.append(
            f"{' / '.join(k for k in key if k)}: {old[key]['p50_ms']:.3f} -> {row['p50_ms']:.3f} ms ({ratio:.2f}x){flag}"
        )
    return lines, regressed


def write_report(stem: Path, report: dict[str, Any], markdown: str) -> Path:
    """`stem`.json (the numbers) and `stem`.md (the table), each written atomically, the folder
    made: every benchmark's results out the one way. Returns the JSON's path."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stem.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
    atomic_write_text(stem.with_suffix(".md"), markdown.rstrip("\n") + "\n")
    return stem.with_suffix(".json")
