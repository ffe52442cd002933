#!/usr/bin/env bash
# Container start on a Jetson: build (first start) or reuse the TensorRT engine of the installed
# model on this very device, then serve with it. Engines are specific to the GPU, JetPack and
# TensorRT version, so they are built here and cached (with a sidecar recording all three) in a
# volume; a JetPack upgrade or a new model makes the next start rebuild, which takes minutes.
# Extra arguments go to `edgebc serve` (for example --set threshold=0.3).
set -euo pipefail

config="${EDGEBC_CONFIG:-/etc/edgebc/edgebc.yaml}"
store="${EDGEBC_MODEL_STORE:-/var/lib/edgebc/models}"
cache="${EDGEBC_ENGINE_CACHE:-/var/cache/edgebc/engines}"
precision="${EDGEBC_PRECISION:-fp16}"

if [ ! -f "$store/current/model.onnx" ]; then
  echo "edgebc: no model installed in $store; on the host: sudo edgebc model install MODEL.onnx" >&2
  exit 1
fi
echo "edgebc: TensorRT $precision engine for $(readlink "$store/current") (first start builds it: minutes)" >&2
engine="$(edgebc model --store "$store" engine --cache "$cache" --precision "$precision" | tail -n 1)"
if [ ! -f "$engine" ]; then
  echo "edgebc: no engine was produced (see above)" >&2
  exit 1
fi
exec edgebc serve --config "$config" --set "model=$engine" "$@"
