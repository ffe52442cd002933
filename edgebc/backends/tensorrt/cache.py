"""This device's TensorRT engine for a model, built once and reused while its sidecar matches."""

from __future__ import annotations

from pathlib import Path

from edgebc.backends.tensorrt.build import Precision, build_engine
from edgebc.backends.tensorrt.sidecar import (
    check_engine_compatible,
    gpu_identity,
    read_sidecar,
    write_sidecar,
)
from edgebc.errors import EdgebcError
from edgebc.integrity import sha256_file, verify_artifact
from edgebc.optional import require
from edgebc.release import card_for_model


def cached_engine(
    model: Path, cache: Path, precision: Precision = "fp16", max_batch: int = 8
) -> tuple[Path, bool]:
    """A TensorRT engine for `model` built on this device, reused while its sidecar still matches
    the model's bytes, this GPU and this TensorRT; else rebuilt (minutes on a Jetson, once). The
    sidecar carries the card the model runs by (a release's card.json, else the embedded one).
    Returns (engine, built_now). Engines are not portable, which is why they are not installed."""
    trt = require("tensorrt", "building TensorRT engines (on Jetson it comes with JetPack)")
    sha = verify_artifact(model) or sha256_file(model)
    card = card_for_model(model).to_json()
    engine = cache / f"{sha[:16]}-{precision}.engine"
    if engine.is_file():
        try:
            sidecar = read_sidecar(engine)
            check_engine_compatible(sidecar, trt.__version__, gpu_identity())
            if sidecar.get("onnx_sha256") == sha and sidecar.get("engine_sha256") == sha256_file(
                engine
            ):
                if sidecar.get("card") != card:  # a site calibration: same network, new card
                    write_sidecar(engine, {**sidecar, "card": card})
                return engine, False
        except EdgebcError:
            pass  # another GPU, another TensorRT, or a damaged file: rebuild below
    cache.mkdir(parents=True, exist_ok=True)
    build_engine(model, engine, precision, batch=(1, 1, max_batch))
    return engine, True
