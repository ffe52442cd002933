"""What `edgebc serve` runs with: one frozen dataclass, filled from deploy/configs/*.yaml and flags.

The classifier's keys (model, region, threshold, quality gate, providers, threads) are
`ClassifierSettings`, shared with `edgebc classify`; the rest is the service's. Every key has a
default that makes `edgebc serve` with no configuration run the embedded demo (the phantom model
watching the phantom tour) on 127.0.0.1. Unknown keys are refused by name.
The bearer token is never written in the YAML file (configs get copied around): it comes from
`token_file` or the EDGEBC_TOKEN environment variable, and a server bound to anything but the
loopback interface refuses to start without one.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from edgebc.classifier_settings import ClassifierSettings
from edgebc.config import load_config
from edgebc.errors import ConfigError
from edgebc.smoothing import SmoothingConfig

TOKEN_ENV = "EDGEBC_TOKEN"
DEMO_SOURCE = "phantom:tour?seed=1"


@dataclass(frozen=True)
class WatchdogSettings:
    stall_seconds: float = 1.0  # no frame for this long: the feed is reported stalled
    freeze_seconds: float = 0.5  # identical frames for this long: frozen (the scanner's freeze key)
    hang_seconds: float = 5.0  # a read blocked this long is abandoned and the source reopened

    def __post_init__(self) -> None:
        if min(self.stall_seconds, self.freeze_seconds, self.hang_seconds) <= 0:
            raise ValueError(f"watchdog times must be positive: {self}")


@dataclass(frozen=True)
class AuditSettings:
    path: str = "edgebc-audit.sqlite"
    max_bytes: int | None = None  # cap for small SD cards; reaching it acts like a full disk
    store_pixels: bool = False  # opt-in: frames as PNG in the log
    store_patient_ids: bool = False  # opt-in
    # What the trail and /v1/status keep of the file or stream a frame came from: its name as is,
    # a hash of it (the default: files named after patients must not leak), or nothing.
    source_names: Literal["name", "hash", "none"] = "hash"
    # The trail's hash chain is keyed (HMAC) with a key kept outside the trail's folder, and its
    # head is anchored in a file beside the key every anchor_interval seconds and at close
    # (edgebc.audit_chain; `edgebc audit verify`). None: systemd's StateDirectory, else
    # $XDG_STATE_HOME/edgebc (~/.local/state/edgebc); the anchor file: audit.anchors beside the key.
    key_path: str | None = None
    anchor_path: str | None = None
    anchor_interval: float = 60.0
    # While the trail cannot be written (a full disk), records go, fsynced, to this journal and
    # are replayed into the trail once it can be (edgebc.audit_journal). None: beside the key,
    # audit-<hash of the trail's path>.journal; another filesystem than the trail's is best.
    fallback_path: str | None = None
    # Records held in memory when neither the trail nor the journal can take them; beyond this
    # the decisions are withheld (not shown, uploads 503): what a kill can lose at most.
    max_held: int = 256
    # Rotation (edgebc.audit_segments): the live file is sealed as <path>.000001, .000002, ... once
    # it reaches rotate_bytes or its first record is rotate_interval_s old, and the chain runs on in
    # a new live file. None: no limit of that kind.
    rotate_bytes: int | None = 256 * 1024 * 1024
    rotate_interval_s: float | None = 24 * 3600.0
    # Retention (edgebc.audit_archive): sealed segments older than keep_days, or the oldest while
    # the trail's files exceed keep_bytes, are deleted, but only those `edgebc audit archive`
    # copied and verified and whose copy is still there. None: kept however old or large.
    keep_days: float | None = 30.0
    keep_bytes: int | None = None
    # Sealed segments with no verified archive copy beyond this: not ready, and says so (someone
    # must archive before the disk fills). None: no limit.
    max_unarchived_bytes: int | None = 8 * 1024**3
    # What the live loop records: every frame, or only the frames whose displayed decision,
    # quality or shift state changed plus one every sample_interval_s ("changes"). Uploads are
    # always recorded.
    record: Literal["every_frame", "changes"] = "every_frame"
    sample_interval_s: float = 10.0

    def __post_init__(self) -> None:
        if self.max_held < 1:
            raise ValueError(f"audit.max_held must be at least 1, got {self.max_held}")
        for name in (
            "rotate_bytes",
            "rotate_interval_s",
            "keep_days",
            "keep_bytes",
            "max_unarchived_bytes",
        ):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(
                    f"audit.{name} must be positive (or null for no limit), got {value}"
                )
        if self.sample_interval_s <= 0:
            raise ValueError(
                f"audit.sample_interval_s must be positive, got {self.sample_interval_s}"
            )


@dataclass(frozen=True)
class DisplaySettings:
    """The local display: a window on the cart's own screen, for carts without a browser."""

    enabled: bool = False  # needs the [display] extra (pygame-ce)
    fullscreen: bool = True
    size: tuple[int, int] = (1280, 720)  # width, height of the window when not full screen

    def __post_init__(self) -> None:
        if min(self.size) < 320:
            raise ValueError(f"display size must be at least 320x320 pixels, got {self.size}")


@dataclass(frozen=True)
class CaseSettings:
    """A fusion model's case context: the mammograms attached to the live stream (POST /v1/case)."""

    # No ultrasound frame passing the quality gate for this long ends the case: its mammograms are
    # detached (an audit record), so a stale attachment never fuses with the next patient's frames.
    idle_detach_s: float = 120.0
    max_mammograms: int = 8  # mammograms in one attach or one POST /v1/cases
    max_ultrasound: int = 16  # ultrasound images in one POST /v1/cases
    max_body_bytes: int = 96 * 1024**2  # an attach's or POST /v1/cases' JSON body (base64 images)

    def __post_init__(self) -> None:
        if self.idle_detach_s <= 0:
            raise ValueError(f"case.idle_detach_s must be positive, got {self.idle_detach_s}")
        if min(self.max_mammograms, self.max_ultrasound) < 1 or self.max_body_bytes < 1024:
            raise ValueError(
                "case.max_mammograms and case.max_ultrasound must be >= 1 and "
                "case.max_body_bytes >= 1024"
            )


@dataclass(frozen=True)
class ServeSettings(ClassifierSettings):
    source: str = DEMO_SOURCE
    require_verified_model: bool = True  # not ready unless a MANIFEST.sha256 lists the model
    host: str = "127.0.0.1"
    port: int = 8000
    token_file: str | None = None
    max_upload_bytes: int = 16 * 1024 * 1024
    # Uploads in the server at once (bodies being received, waiting or being classified): beyond
    # this POST /v1/classify answers 503 with Retry-After; it bounds the memory bodies hold.
    max_pending_uploads: int = 8
    # A slow client costs itself, not the cart: the request head (line and headers) must arrive
    # within header_timeout_s of the connection (or of the previous answer on a kept-alive one),
    # else the connection is closed; the body within body_timeout_s, and after its first
    # body_grace_s at min_body_rate bytes/s on average, else 408 and its slot is freed.
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    body_grace_s: float = 2.0
    min_body_rate: int = 64 * 1024
    # Uploads are decoded and classified one at a time beside the live loop; one more may wait,
    # for at most twice the measured time one takes and never longer than admission_wait_s.
    # An upload that cannot start by then gets 503 with Retry-After instead of a growing wait.
    admission_wait_s: float = 1.0
    # An upload whose header declares more decoded bytes (width x height x channels x bytes per
    # sample) is refused before decoding; 64 MiB admits a 4K frame and a 16-bit 4096x3328
    # mammogram. Every decode in the process shares one budget (edgebc.decode.SHARED_DECODE_BUDGET).
    max_decoded_bytes: int = 64 * 1024**2
    decode_wait_s: float = 2.0  # an upload that cannot start decoding by then gets 503
    decode_budget_bytes: int = 512 * 1024**2  # decoded bytes in flight across the whole process
    max_result_age: float = 1.0  # seconds; an older result is withdrawn from the screen
    stream_width: int = 960  # frames sent to the page are scaled down to this width
    smoothing: SmoothingConfig = field(default_factory=SmoothingConfig)
    watchdog: WatchdogSettings = field(default_factory=WatchdogSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    display: DisplaySettings = field(default_factory=DisplaySettings)
    case: CaseSettings = field(default_factory=CaseSettings)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be 1..65535, got {self.port}")
        if self.max_decoded_bytes < 1024**2:
            raise ValueError(f"max_decoded_bytes must be >= 1 MiB, got {self.max_decoded_bytes}")
        if self.decode_budget_bytes < self.max_decoded_bytes:
            raise ValueError(
                f"decode_budget_bytes ({self.decode_budget_bytes}) must hold at least one image of "
                f"max_decoded_bytes ({self.max_decoded_bytes})"
            )
        if self.max_upload_bytes < 1024 or self.max_pending_uploads < 1:
            raise ValueError("max_upload_bytes must be >= 1024 and max_pending_uploads >= 1")
        if min(self.header_timeout_s, self.body_timeout_s, self.body_grace_s) <= 0:
            raise ValueError(
                "header_timeout_s, body_timeout_s and body_grace_s must be positive, got "
                f"{self.header_timeout_s}, {self.body_timeout_s}, {self.body_grace_s}"
            )
        if self.body_grace_s > self.body_timeout_s or self.min_body_rate < 1:
            raise ValueError(
                f"body_grace_s ({self.body_grace_s}) must be at most body_timeout_s "
                f"({self.body_timeout_s}) and min_body_rate >= 1 byte/s, got {self.min_body_rate}"
            )
        if self.admission_wait_s <= 0:
            raise ValueError(f"admission_wait_s must be positive, got {self.admission_wait_s}")
        if self.max_result_age <= 0 or self.stream_width < 64:
            raise ValueError("max_result_age must be positive and stream_width >= 64")

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def read_token(self) -> str | None:
        """The bearer token (token_file, else $EDGEBC_TOKEN), or None; refuses an exposed server without one."""
        token: str | None = None
        if self.token_file:
            try:
                token = Path(self.token_file).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(
                    f"token_file {self.token_file}: cannot read it: {exc.strerror or exc}"
                ) from exc
            if not token:
                raise ConfigError(f"token_file {self.token_file} is empty")
        else:
            token = os.environ.get(TOKEN_ENV, "").strip() or None
        if token is not None and len(token) < 16:
            raise ConfigError("the bearer token must be at least 16 characters")
        if token is None and not self.loopback:
            raise ConfigError(
                f"binding to {self.host} exposes the service beyond this machine: set a bearer token "
                f"with token_file or ${TOKEN_ENV} (or bind to 127.0.0.1)"
            )
        return token


def load_serve_settings(path: str | Path | None, overrides: Sequence[str] = ()) -> ServeSettings:
    """Settings from a YAML file (defaults when None) with dotted `key=value` overrides on top."""
    return load_config(ServeSettings, path, overrides)
