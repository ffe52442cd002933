#!/usr/bin/env bash
# Install edgebc as a system service: the `edgebc` user, the folders the unit expects, a virtual
# environment in /opt/edgebc/venv, the settings file, the unit and the udev rule.
#
#   sudo deploy/systemd/install-service.sh CONFIG.yaml [PIP_SPEC]
#
# CONFIG.yaml becomes /etc/edgebc/edgebc.yaml (start from deploy/configs/). PIP_SPEC is what pip
# installs (default: this checkout with the [serve] extra). Re-running it upgrades in place; the
# model store, the token and the audit log are never touched. Models are installed afterwards with
# `sudo edgebc model install MODEL.onnx`.
set -euo pipefail

if [ "$#" -lt 1 ] || [ "$#" -gt 2 ]; then
  echo "usage: sudo $0 CONFIG.yaml [PIP_SPEC]" >&2
  exit 2
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "run as root (sudo): it creates a user and writes /etc, /opt and /var/lib" >&2
  exit 1
fi
here="$(cd "$(dirname "$0")" && pwd)"
config="$1"
spec="${2:-$(cd "$here/../.." && pwd)[serve]}"
prefix=/opt/edgebc
# On a Pi the camera stack (picamera2, libcamera) comes from apt, so the environment sees it.
venv_options=()
if [ "${EDGEBC_SYSTEM_SITE_PACKAGES:-0}" = 1 ]; then
  venv_options+=(--system-site-packages)
fi

if [ ! -f "$config" ]; then
  echo "no such settings file: $config (start from deploy/configs/)" >&2
  exit 1
fi

id -u edgebc > /dev/null 2>&1 || useradd --system --home-dir /nonexistent --shell /usr/sbin/nologin \
  --user-group --groups video edgebc
install -d -m 0755 "$prefix" /var/lib/edgebc /var/lib/edgebc/models
install -d -m 0750 -g edgebc /etc/edgebc
install -d -m 0750 -o edgebc -g edgebc /var/log/edgebc

if [ ! -x "$prefix/venv/bin/python" ]; then
  python3 -m venv "${venv_options[@]}" "$prefix/venv"
fi
"$prefix/venv/bin/pip" install --upgrade "$spec"
"$prefix/venv/bin/edgebc" info | grep "^Area downscales"  # the native kernel, or why the numpy path
if [ ! -f /etc/edgebc/token ]; then
  # a bearer token for the API off loopback; 32 random bytes, readable by the service only
  umask 027
  head -c 32 /dev/urandom | base64 | tr -d '\n=' > /etc/edgebc/token
  chgrp edgebc /etc/edgebc/token
fi
# The capture card's stable name (/dev/edgebc-capture) first: the check below opens the source.
install -m 0644 "$here/../udev/99-edgebc-capture.rules" /etc/udev/rules.d/99-edgebc-capture.rules
udevadm control --reload || true
udevadm trigger --subsystem-match=video4linux || true
udevadm settle --timeout=10 || true
# The settings are checked before anything is switched over: a typo, or a source that cannot be
# opened (the card unplugged), stops the install here. On a re-run (an upgrade) the running
# service holds the capture card, so it is stopped for the check and started again after.
was_running=false
if systemctl is-active --quiet edgebc.service 2> /dev/null; then
  was_running=true
  systemctl stop edgebc.service
fi
if ! "$prefix/venv/bin/edgebc" serve --config "$config" --check; then
  if [ "$was_running" = true ]; then systemctl start edgebc.service; fi  # as it was: old settings
  exit 1
fi
install -m 0640 -g edgebc "$config" /etc/edgebc/edgebc.yaml

install -m 0644 "$here/edgebc.service" /etc/systemd/system/edgebc.service
ln -sf "$prefix/venv/bin/edgebc" /usr/local/bin/edgebc
systemctl daemon-reload
systemctl enable edgebc.service
if [ "$was_running" = true ]; then systemctl restart edgebc.service; fi
echo "installed. Next: sudo EDGEBC_MODEL_STORE=/var/lib/edgebc/models edgebc model install MODEL.onnx"
echo "then: sudo systemctl restart edgebc && journalctl -u edgebc -f"
