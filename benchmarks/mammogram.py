"""A full-field mammogram through the device's path: decode -> gate -> breast -> preprocess ->
inference, per stage, with the peak memory it takes.

    python benchmarks/mammogram.py [--model mg.onnx] [--iterations 10] [--out results/mammogram]

A 4096x3328 DICOM with 12 bits stored in 16 (what a digital mammography detector writes) is timed
beside its 1024x832 8-bit PNG (mini-MIAS's scale), the baseline, in the same run with the two
interleaved iteration by iteration, so the ratio holds on a shared, noisy machine even when the
absolute numbers do not. Both are the same framed phantom (edgebc.synth.mammogram), drawn at
1024x832 and scaled up for the full field. Without --model, a MobileNetV3-Small with random
weights and an MG card (breast crop, laterality, 512x320; speed does not depend on the weights)
is exported first, which needs the [train] and [export] extras; with --model, only the device's
own packages and pydicom.

Before timing, the model's answer on the full-field DICOM through the stages is checked against
the runtime's own classifier on the same file (they must agree to 1e-5), so the rows time the
path the device runs. Peak memory is tracemalloc's peak over one full pass (numpy and Python
allocations; ONNX Runtime's arena is not traced), reported as a multiple of the 16-bit frame's
size, and the process's peak RSS. The machine is its CPU model (edgebc.sysinfo).
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from edgebc.backends import open_backend
from edgebc.bench.timing import peak_rss_mb
from edgebc.breast import prepare_breast
from edgebc.decode import decode_image, read_image_view
from edgebc.metrics import softmax
from edgebc.optional import require
from edgebc.preprocess import PreprocessCard, preprocess_chw
from edgebc.sysinfo import cpu_description

FULL_FIELD = (4096, 3328)
BASELINE = (1024, 832)
STAGES = ("decode", "gate", "breast", "preprocess", "inference")
MG_PREPROCESS = PreprocessCard(input_height=512, input_width=320, breast_crop=True,
                               laterality="left")  # fmt: skip


def phantom_files() -> dict[str, bytes]:
    """The same framed phantom as a 4096x3328 12-bit DICOM and a 1024x832 8-bit PNG."""
    from edgebc.synth.mammogram import draw_breast, make_mammogram

    rng = np.random.default_rng(20)
    film = make_mammogram(draw_breast("malignant", rng), rng, "L", "MLO", *BASELINE, bits=12)
    full = cv2.resize(film.image, FULL_FIELD[::-1], interpolation=cv2.INTER_LINEAR)
    small = np.round(film.image.astype(np.float32) * (255.0 / 4095.0)).astype(np.uint8)
    ok, png = cv2.imencode(".png", small)
    if not ok:
        raise RuntimeError("could not encode the baseline PNG")
    return {"dicom-4096x3328-12bit": dicom_bytes(full), "png-1024x832-8bit": png.tobytes()}


def dicom_bytes(pixels: np.ndarray) -> bytes:
    """A digital mammography DICOM (MONOCHROME2, 12 of 16 bits, left MLO) holding `pixels`."""
    pydicom = require("pydicom", "writing the benchmark's DICOM file")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import DigitalMammographyXRayImageStorageForPresentation as MG
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MG, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MG, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.ImageLaterality, ds.ViewPosition = "L", "MLO"
    ds.PixelData = pixels.astype("<u2").tobytes()
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def untrained_mg_model(folder: Path) -> Path:
    """A random-weight MobileNetV3-Small with an MG card, exported to ONNX."""
    from dataclasses import replace

    from edgebc.export.onnx_export import export_onnx
    from edgebc.model_card import single_input
    from edgebc.train.checkpoint import load_checkpoint, save_checkpoint, save_untrained_checkpoint

    path = save_untrained_checkpoint(folder / "mg.pt", "mobilenet_v3_small", 224)
    checkpoint = load_checkpoint(path)
    card = replace(checkpoint.card, inputs=single_input(MG_PREPROCESS, modality="mg"))
    save_checkpoint(path, replace(checkpoint, card=card))
    onnx_path, _, _ = export_onnx(path, folder / "mg.onnx")
    return Path(onnx_path)


class Pipeline:
    """The device's stages for one MG card, each callable on its own for timing."""

    def __init__(self, model: Path, threads: int) -> None:
        from edgebc.classifier import FrameClassifier

        self.backend = open_backend(model, threads=threads)
        self.prep = self.backend.card.preprocess
        if self.backend.card.inputs[0].modality != "mg":
            raise SystemExit(f"{model}: not a mammography model (its input's modality is not mg)")
        self.gate = FrameClassifier(self.backend).gate  # the gate the card's modality picks

    def stages(self, data: bytes) -> dict[str, Callable[[], object]]:
        """Stage callables over `data`, each fed the previous stage's output (computed once)."""
        image = decode_image(data, full_depth=True)
        view = read_image_view(data)
        prep = self.prep

        def breast_step() -> np.ndarray:
            return prepare_breast(image, prep.breast_crop, prep.laterality,
                                  header_chest_wall=view.chest_wall,
                                  pectoral=prep.pectoral, is_mlo=view.is_mlo)  # fmt: skip

        breast = breast_step()
        tensor = preprocess_chw(image, prep, view=view)[np.newaxis]
        return {
            "decode": lambda: (decode_image(data, full_depth=True), read_image_view(data)),
            "gate": lambda: self.gate.check(image),
            "breast": breast_step,
            "preprocess": lambda: preprocess_chw(breast, _after_breast(prep), view=view),
            "inference": lambda: self.backend.run(tensor),
        }

    def probabilities(self, data: bytes) -> np.ndarray:
        """The whole path once, for the check and the memory figure."""
        image = decode_image(data, full_depth=True)
        view = read_image_view(data)
        verdict = self.gate.check(image)
        if not verdict.ok:
            raise SystemExit(f"the MG gate refused the benchmark film: {verdict.reason}")
        logits = self.backend.run(preprocess_chw(image, self.prep, view=view)[np.newaxis])
        return softmax(logits, self.backend.card.temperature)


def _after_breast(prep: PreprocessCard) -> PreprocessCard:
    """The card's preprocessing with the breast steps already done (timed as their own stage)."""
    from dataclasses import replace

    return replace(prep, breast_crop=False, laterality="keep", pectoral="keep")


def check_against_runtime(pipeline: Pipeline, model: Path, data: bytes) -> float:
    """Largest probability difference between these stages and the runtime's classifier."""
    from edgebc.classifier import FrameClassifier

    decision = FrameClassifier(open_backend(model)).classify(
        decode_image(data, full_depth=True), read_image_view(data)
    )
    if decision.probabilities is None:
        raise SystemExit(f"the runtime gave no decision on the benchmark film: {decision.quality}")
    ours = pipeline.probabilities(data)[0]
    return float(np.max(np.abs(np.array(list(decision.probabilities.values())) - ours)))


def peak_memory(pipeline: Pipeline, data: bytes) -> int:
    tracemalloc.start()
    try:
        pipeline.probabilities(data)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def time_interleaved(pipeline: Pipeline, files: dict[str, bytes], iterations: int,
                     warmup: int = 2) -> dict[str, dict[str, list[float]]]:  # fmt: skip
    """ms per call of every stage of every file, the files alternating in each iteration."""
    calls = {name: pipeline.stages(data) for name, data in files.items()}
    times: dict[str, dict[str, list[float]]] = {n: {s: [] for s in STAGES} for n in files}
    for k in range(warmup + iterations):
        for name, stages in calls.items():
            for stage in STAGES:
                start = time.perf_counter()
                stages[stage]()
                elapsed = (time.perf_counter() - start) * 1e3
                if k >= warmup:
                    times[name][stage].append(elapsed)
    return times


def render(report: dict) -> str:
    names = list(report["p50_ms"])
    full, base = names
    lines = [
        f"Machine: {report['cpu']}, {report['threads']} inference thread(s); "
        f"{report['iterations']} interleaved iterations; model {report['model']}",
        "",
        f"| stage | {base} p50 ms | {full} p50 ms | ratio |",
        "|---|---|---|---|",
    ]
    for stage in (*STAGES, "total"):
        a, b = report["p50_ms"][base][stage], report["p50_ms"][full][stage]
        lines.append(f"| {stage} | {a:.1f} | {b:.1f} | {b / a:.2f}x |")
    memory = report["peak_memory"]
    lines += [
        "",
        f"Peak traced memory over one full pass of the {full}: {memory['traced_mb']:.0f} MB "
        f"({memory['traced_per_frame']:.2f}x its {memory['frame_mb']:.0f} MB frame); "
        f"process peak RSS {memory['peak_rss_mb']:.0f} MB.",
        f"Check before timing: stages vs the runtime's classifier, max |dp| = "
        f"{report['check_max_abs_diff']:.2e}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="an exported MG model (.onnx)")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="inference threads")
    parser.add_argument("--out", type=Path, help="folder for mammogram.json and mammogram.md")
    args = parser.parse_args(argv)
    files = phantom_files()
    with tempfile.TemporaryDirectory() as folder:
        model = args.model or untrained_mg_model(Path(folder))
        pipeline = Pipeline(model, args.threads)
        full = next(iter(files))
        difference = check_against_runtime(pipeline, model, files[full])
        if difference > 1e-5:
            raise SystemExit(
                f"the timed stages disagree with the runtime: max |dp| {difference:.2e}"
            )
        traced = peak_memory(pipeline, files[full])
        times = time_interleaved(pipeline, files, args.iterations)
    frame_bytes = FULL_FIELD[0] * FULL_FIELD[1] * 2
    p50 = {
        name: {**{s: float(np.median(v)) for s, v in stages.items()},
               "total": float(np.median(np.sum([v for v in stages.values()], axis=0)))}
        for name, stages in times.items()
    }  # fmt: skip
    report = {
        "cpu": cpu_description()["model"], "threads": args.threads, "iterations": args.iterations,
        "model": str(args.model or "random-weight mobilenet_v3_small, MG card 512x320"),
        "check_max_abs_diff": difference, "p50_ms": p50,
        "peak_memory": {"traced_mb": traced / 2**20, "frame_mb": frame_bytes / 2**20,
                        "traced_per_frame": traced / frame_bytes, "peak_rss_mb": peak_rss_mb()},
    }  # fmt: skip
    text = render(report)
    print(text)
    if args.out:
        from edgebc.bench.report import write_report

        write_report(args.out / "mammogram", report, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
