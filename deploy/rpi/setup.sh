#!/usr/bin/env bash
# Raspberry Pi OS (Bookworm, 64-bit) field kit: the camera stack from apt, edgebc from pip, the
# service installed with the Pi settings. Run on the Pi from a checkout of edgebc:
#
#   sudo deploy/rpi/setup.sh [CONFIG.yaml]        # default deploy/configs/pi-field-kit.yaml
#
# picamera2 and libcamera come from apt (their pip builds need the Pi's own libcamera); the
# service's virtual environment sees them through --system-site-packages. ONNX Runtime comes from
# pip (aarch64 wheels). Nothing is downloaded at run time.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
  echo "run as root (sudo)" >&2
  exit 1
fi
here="$(cd "$(dirname "$0")" && pwd)"
config="${1:-$here/../configs/pi-field-kit.yaml}"

if ! grep -qi "raspberry pi" /proc/device-tree/model 2> /dev/null; then
  echo "warning: this does not look like a Raspberry Pi; continuing anyway" >&2
fi
if [ "$(uname -m)" != "aarch64" ]; then
  echo "use the 64-bit Raspberry Pi OS: ONNX Runtime publishes aarch64 wheels, not armv7" >&2
  exit 1
fi

apt-get update
# gcc: pip builds edgebc's native area kernel with it (without it a numpy path answers, slower)
apt-get install -y --no-install-recommends python3-venv python3-picamera2 gcc libc6-dev
# the camera must answer before the service is pointed at it
if command -v rpicam-hello > /dev/null; then
  rpicam-hello --list-cameras || echo "warning: no camera listed; check the ribbon cable" >&2
fi

EDGEBC_SYSTEM_SITE_PACKAGES=1 "$here/../systemd/install-service.sh" "$config"

cores="$(nproc)"
echo
echo "This Pi has $cores cores. Choose FP32 or INT8 by measuring, on this Pi, with your model:"
echo "  /opt/edgebc/venv/bin/edgebc bench --model MODEL.onnx --int8 MODEL-int8.onnx --threads 1 --threads $cores"
echo "then install the faster one whose accuracy held (benchmarks/accuracy.py), and set threads: in"
echo "/etc/edgebc/edgebc.yaml to the thread count that met your frame rate with the lowest p99."
