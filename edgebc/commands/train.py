"""`edgebc train` and `edgebc eval` (the [train] extra; torch is imported only when they run)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edgebc.commands import HelpFormatter


def register_train(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train",
        help="train a classifier (needs the [train] extra: torch)",
        description="Train from a YAML config (see configs/) with optional overrides. The run folder "
        "gets config.yaml, history.csv, curves.png, best.pt (with temperature and operating threshold), "
        "last.pt (for --resume) and metrics.json. Under torchrun it trains data-parallel.",
        formatter_class=HelpFormatter,
    )
    train.add_argument(
        "--config",
        type=Path,
        default=None,
        help="YAML training configuration (defaults when omitted)",
    )
    train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set optim.lr=1e-3 (repeatable)",
    )
    train.add_argument("--manifest", default=None, help="shortcut for --set data.manifest=PATH")
    train.add_argument("--arch", default=None, help="shortcut for --set model.arch=NAME")
    train.add_argument(
        "--pretrained",
        default=None,
        help="torchvision ImageNet weights file on disk (never downloaded)",
    )
    train.add_argument("--epochs", type=int, default=None, help="shortcut for --set optim.epochs=N")
    train.add_argument(
        "--distill-from",
        nargs="+",
        default=None,
        metavar="CHECKPOINT",
        help="also learn from these trained models' averaged soft predictions (knowledge "
        "distillation; they must have been trained on the same train/val samples); with "
        "--cross-validate, {fold} in a path names each fold's own teacher "
        "(runs/cv-mnv3/fold{fold}/best.pt); shortcut for --set optim.distill_from=[...]",
    )
    train.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default=None,
        help="shortcut for --set device=...",
    )
    train.add_argument("--name", default=None, help="run name (folder under out_dir)")
    train.add_argument("--out", default=None, help="shortcut for --set out_dir=PATH")
    train.add_argument(
        "--resume",
        type=Path,
        default=None,
        help="continue the run in this folder exactly where last.pt left it",
    )
    train.add_argument(
        "--cross-validate",
        action="store_true",
        help="train one model per fold of a --folds manifest and summarise",
    )
    train.set_defaults(handler=run_train)


def run_train(args: argparse.Namespace) -> int:
    from edgebc.train.config import load_train_config
    from edgebc.train.loop import train_model

    if args.resume is not None:
        result = train_model(load_train_config(args.resume / "config.yaml"), resume=args.resume)
    else:
        shortcuts = {"data.manifest": args.manifest, "model.arch": args.arch, "model.pretrained": args.pretrained,
                     "optim.epochs": args.epochs, "device": args.device, "name": args.name, "out_dir": args.out}  # fmt: skip
        if args.distill_from:  # JSON is YAML: paths with commas or spaces survive the parse
            shortcuts["optim.distill_from"] = json.dumps(args.distill_from)
        overrides = [*args.overrides, *(f"{k}={v}" for k, v in shortcuts.items() if v is not None)]
        config = load_train_config(args.config, overrides)
        from edgebc.train.phantom_manifest import ensure_phantom_manifest

        ensure_phantom_manifest(config.data)  # a phantom run's data, made on first use
        if args.cross_validate:
            from edgebc.train.crossval import cross_validate

            report = cross_validate(config)
            for key, stats in report["summary"].items():
                print(f"  {key:32s} {stats['mean']:.3f} +- {stats['sd']:.3f}")
            print(f"wrote {Path(config.out_dir) / config.name / 'cv_summary.md'}")
            return 0
        result = train_model(config)
    if result.best_metrics:
        m = result.best_metrics
        print(f"best epoch {m['best_epoch']}: val AUC {m['val_auc_positive']:.3f}, macro AUC {m['val_macro_auc']:.3f}, "
              f"balanced accuracy {m['val_balanced_accuracy']:.3f}, threshold {m['threshold']:.3f} "
              f"(val sensitivity {m['val_sensitivity_at_threshold']:.3f}, specificity {m['val_specificity_at_threshold']:.3f})")  # fmt: skip
        # a fusion model's one threshold, at each combination of inputs it may meet on a device
        for inputs, f in (m.get("val_operating_point_by_inputs") or {}).items():
            print(f"  {inputs}: " + ("no positive calibration case: sensitivity unknown" if not f.get("positives")
                  else f"sensitivity {f['sensitivity']:.3f}, specificity {f['specificity']:.3f} "
                       f"({f['positives']} positive; alone it would take {f['threshold_alone']:.3f})"))  # fmt: skip
        print(f"wrote {result.best_checkpoint}")
    return 0


def register_eval(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser(
        "eval",
        help="score a checkpoint or ONNX model: AUC with CIs, sensitivity at the operating point, calibration, Grad-CAM",
        description="Evaluate a checkpoint on a manifest or folder and write report.md, report.json, "
        "predictions.csv, ROC/PR/confusion/calibration PNGs and Grad-CAM overlays.",
        formatter_class=HelpFormatter,
    )
    evaluate.add_argument(
        "checkpoint", type=Path, help="best.pt from a training run, or an exported .onnx model"
    )
    evaluate.add_argument("data", type=Path, help="manifest .csv or dataset folder")
    evaluate.add_argument(
        "--split", default="test", help="which split to score; 'all' for every sample"
    )
    evaluate.add_argument(
        "--out",
        type=Path,
        default=None,
        help="report folder (default: eval-<split> beside the checkpoint)",
    )
    evaluate.add_argument(
        "--bootstrap", type=int, default=1000, help="bootstrap resamples for confidence intervals"
    )
    evaluate.add_argument(
        "--gradcam", type=int, default=4, help="Grad-CAM overlays per kind (correct, wrong)"
    )
    evaluate.add_argument(
        "--subgroup",
        action="append",
        default=None,
        metavar="COLUMN",
        help="manifest column for the subgroup table (repeatable; default: source, modality, "
        "view, annotations (the audit's burned-in calipers/text flag))",
    )
    evaluate.add_argument(
        "--device", default="cpu", help="torch device for inference, e.g. cpu or cuda:0"
    )
    evaluate.set_defaults(handler=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from edgebc.train.evaluate import DEFAULT_SUBGROUPS, evaluate_checkpoint

    split = None if args.split == "all" else args.split
    out = args.out or args.checkpoint.parent / f"eval-{args.split}"
    report = evaluate_checkpoint(args.checkpoint, args.data, out, split, args.bootstrap, args.gradcam,
                                 args.subgroup or DEFAULT_SUBGROUPS, args.device)  # fmt: skip
    low, high = report["auc_positive_ci"]
    print(f"{report['positive_class']}-vs-rest AUC {report['auc_positive']:.3f} (95% CI {low:.3f}-{high:.3f}), "
          f"macro AUC {report['macro_auc']:.3f}, balanced accuracy {report['balanced_accuracy']:.3f}, ECE {report['ece']:.3f}")  # fmt: skip
    if report.get("operating_point"):
        op = report["operating_point"]
        bound = ""
        if op.get("sensitivity_bound") is not None:
            realised = op.get("patient_sensitivity", op["sensitivity"])
            held = "n/a" if realised is None else ("yes" if op.get("bound_held") else "NO")
            bound = (
                f" (stated bound >= {op['sensitivity_bound']:.3f} per {op['unit']}, held: {held})"
            )
        print(
            f"at threshold {op['threshold']:.3f}: sensitivity {op['sensitivity']:.3f}, specificity {op['specificity']:.3f}{bound}"
        )
    if report["excluded_labels"]:
        left_out = ", ".join(f"{n} {label}" for label, n in report["excluded_labels"].items())
        print(f"task {report['task']} leaves out {left_out} (not scored)")
    print(f"wrote {out / 'report.md'}")
    return 0


def register_cross_site(commands: argparse._SubParsersAction) -> None:
    cross = commands.add_parser(
        "cross-site",
        help="does a model hold at a site it never saw? leave-one-site-out and pooled, every site scored",
        description="Train the recipe once per site and once pooled (finished arms of the same recipe are "
        "reused, interrupted ones resumed), score every model on every site (a site it trained on: its test "
        "split; any other: all its shared patients) with patient-clustered 95%% intervals, the card's "
        "operating point against its bound, calibration, per scanner and per BI-RADS, and the "
        "radiologists' BI-RADS as a reference reader; writes cross_site.md and cross_site.json.",
        formatter_class=HelpFormatter,
    )
    cross.add_argument("--config", type=Path, required=True,
                       help="YAML with train_config, manifest and the report's settings (configs/cross_site.yaml)")  # fmt: skip
    cross.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a key of --config (repeatable), e.g. --set 'overrides=[threads=1]'")  # fmt: skip
    cross.add_argument("--compare", action="store_true",
                       help="train nothing: score every variant whose arms have finished against the baseline "
                       "variant, paired on the same frames; writes remedies.md and remedies.json in out_dir")  # fmt: skip
    cross.set_defaults(handler=run_cross_site_command)


def run_cross_site_command(args: argparse.Namespace) -> int:
    from edgebc.train.crosssite import (
        compare_variants,
        load_cross_site_config,
        render_markdown,
        render_remedies,
        run_cross_site,
    )

    config = load_cross_site_config(args.config, args.set)
    if args.compare:
        print(render_remedies(compare_variants(config)))
    else:
        print(render_markdown(run_cross_site(config)))
    return 0
