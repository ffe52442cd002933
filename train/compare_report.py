"""The comparison as Markdown: measured numbers, budgets, paired tests, and papers' numbers apart."""

from __future__ import annotations

from typing import Any

# The papers' columns, in their order; the reported numbers a user may give are the same ones.
TABLE_METRICS = ("accuracy", "sensitivity", "specificity", "precision", "f1", "auc", "kappa")
REPORTED_METRICS = TABLE_METRICS

_HEADS = {"accuracy": "accuracy", "sensitivity": "sensitivity", "specificity": "specificity",
          "precision": "precision", "f1": "F1", "auc": "AUC [95% CI]", "kappa": "Cohen's κ"}  # fmt: skip


def _number(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if value is None or value != value:
        return "n/a"
    text = f"{value:.3f}"
    if f"{key}_sd" in row:
        return f"{text} ± {row[f'{key}_sd']:.3f}"
    if key == "auc" and row.get("auc_ci"):
        low, high = row["auc_ci"]
        text += f" [{low:.3f}, {high:.3f}]"
    return text


def _name(row: dict[str, Any]) -> str:
    label = row["name"]
    if row["kind"] == "cross-validation":
        label += f" ({len(row['folds'])}-fold, mean ± sd)"
    if row.get("reduced_budget"):
        label += f" — **reduced budget: {row['reduced_budget']}**"
    return label


def _reported(row: dict[str, Any]) -> str:
    r = row.get("reported")
    if not r:
        return ""
    numbers = ", ".join(f"{k} {r[k]:.3f}" for k in REPORTED_METRICS if r.get(k) is not None)
    return f"{numbers} ({r['source']}; on {r['data']})"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "not recorded"
    if seconds < 60:
        return f"{seconds:.0f} s"
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def render_markdown(report: dict[str, Any]) -> str:
    cases, cpu = report["cases"], report["machine"]["cpu"]
    lines = [
        f"# Model comparison, {report['date']}",
        "",
        f"Scored on {cases['n']} cases ({cases['patients']} patients) of {', '.join(cases['data'])} "
        f"(split {', '.join(cases['split'])}); positive class {cases['positive_class']}. Every "
        "count is of the decisions each model's card takes at its own operating point.",
        f"Latency on this machine: {cpu['model']} ({cpu['logical_cores']} logical cores), "
        f"onnxruntime {report['machine']['onnxruntime']}; {report['latency_protocol']}.",
    ]
    if any(r.get("reduced_budget") for r in report["rows"]):
        lines += ["", "**Rows marked reduced budget were trained on less than their design calls for: their "
                  "numbers understate that design, and a model that beats them here has not beaten the design.**"]  # fmt: skip
    heads = [_HEADS[k] for k in TABLE_METRICS]
    lines += ["", "## Measured here", "",
              "| model | " + " | ".join(heads) + " | parameters | ONNX MB | latency ms p50 (p90) | as reported, on other data |",
              "|---" * (len(heads) + 5) + "|"]  # fmt: skip
    for row in report["rows"]:
        lat = row.get("latency") or {}
        params = f"{lat['parameters'] / 1e6:.2f} M" if lat.get("parameters") else "n/a"
        size = f"{lat['onnx_mb']:.1f}" if lat.get("onnx_mb") is not None else "n/a"
        speed = (
            f"{lat['p50_ms']:.1f} ({lat['p90_ms']:.1f})"
            if lat.get("p50_ms") is not None
            else "not timed"
        )
        cells = [_number(row, k) for k in TABLE_METRICS]
        lines.append(
            f"| {_name(row)} | "
            + " | ".join(cells)
            + f" | {params} | {size} | {speed} | {_reported(row)} |"
        )
    lines += ["", "The last column is each paper's own figure, measured by its authors on their data: it is "
              "not comparable with the measured columns and is never used in them.", "",
              "## Data and training budget", "",
              "| model | kind | scored on | trained on | arch | epochs run / planned | wall time | hardware | stated budget |",
              "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in report["rows"]:
        b = row["budget"]
        scored = "; ".join(f"{d['data']} {d['split']}" + (f" fold {d['fold']}" if d["fold"] is not None else "")
                           + f" (n={d['n']})" for d in row["data"])  # fmt: skip
        epochs = f"{b.get('epochs_run', '?')} / {b.get('epochs_planned', '?')}"
        if b.get("folds"):
            epochs += f" over {b['folds']} folds"
        lines.append(f"| {row['name']} | {row['kind']} | {scored} | {b.get('trained_on') or 'not recorded'} | "
                     f"{row['arch']} | {epochs} | {_duration(b.get('wall_s'))} | {b.get('hardware') or 'not recorded'} | "
                     f"{b.get('stated') or ''} |")  # fmt: skip
    classes = report["rows"][0]["classes"]
    lines += ["", "## Per-class AUC (one vs rest)", "", "| model | " + " | ".join(classes) + " |",
              "|---" * (len(classes) + 1) + "|"]  # fmt: skip
    for row in report["rows"]:
        lines.append(
            f"| {row['name']} | "
            + " | ".join(f"{row['per_class_auc'].get(c, float('nan')):.3f}" for c in classes)
            + " |"
        )
    lines += [
        "",
        "## Confusion matrices (rows true, columns decided; cross-validation: pooled out of fold)",
        "",
    ]
    for row in report["rows"]:
        lines.append(f"{row['name']}: " + "; ".join(
            f"{c}: " + " ".join(str(v) for v in values) for c, values in zip(row["classes"], row["confusion_matrix"], strict=True)
        ) + (f" (pooled out-of-fold AUC {row['pooled_out_of_fold_auc']:.3f})" if "pooled_out_of_fold_auc" in row else ""))  # fmt: skip
    lines += ["", "## Paired tests (same cases)", "",
              "| first vs second | ΔAUC (SE) | p (AUC) | AUC test | Δ right about the positive class | p (decisions) | decision test |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for pair in report["paired"]:
        auc, dec = pair["auc"], pair["decisions"]
        lines.append(f"| {pair['first']} vs {pair['second']} | {auc['difference']:+.3f} ({auc['standard_error']:.3f}) | "
                     f"{auc['p_value']:.3g} | {auc['method']} | {dec['difference']:+.3f} | {dec['p_value']:.3g} | {dec['method']} |")  # fmt: skip
    lines += [
        "",
        "p values are two-sided and not corrected for the number of pairs. The decisions are compared "
        "on the question every model answers (is the case of the positive class?), each at its own "
        "operating point: models of different tasks are judged alike.",
        "",
        "![ROC](roc.png)",
        "",
    ]
    return "\n".join(lines)
