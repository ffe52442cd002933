"""The local display: the cart's own screen, full-screen, for a cart without a browser.

Three parts, so that what is drawn is tested without a screen:
- `render_screen(view, image, size)` draws what the page shows from the same view
  (`ServeRuntime.view()`): the frame with the imaging-region outline, the decision in large type
  or "no decision: <reason>", probability bars with a tick at the operating threshold, and the
  permanent research banner (and the DEMO banner for the demo model). numpy and OpenCV only.
- `Window` puts such images on the screen through pygame-ce (the [display] extra; the runtime's
  OpenCV is the headless build, which has no windows). Its SDL2 runs under X11 or Wayland, and on
  a console without a desktop straight on KMS/DRM (SDL_VIDEODRIVER=kmsdrm). Where SDL finds no
  screen it falls back to drivers that draw nowhere; those are refused unless asked for by name.
- `LocalDisplay` is the sink: a thread that redraws on every result and at least four times a
  second, so a withdrawn decision leaves the screen even when frames stop coming. Each redraw
  takes the view and its frame from one result (`ServeRuntime.screen`).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from edgebc.errors import EdgebcError
from edgebc.optional import require

if TYPE_CHECKING:
    from edgebc.serve.live_loop import LiveResult
    from edgebc.serve.settings import DisplaySettings

# A view (`ServeRuntime.view()`) and the frame it describes, taken together from one result.
Screen = Callable[[], tuple[dict[str, Any], np.ndarray | None]]

log = logging.getLogger(__name__)

# BGR, the page's colours (edgebc/serve/page.html)
BACKGROUND = (17, 17, 17)
BANNER_COLOURS = ((31, 31, 122), (0, 109, 138))  # research (#7a1f1f), then DEMO (#8a6d00)
LESION = (0, 176, 255)  # BGR amber, as the page draws it
REGION = (132, 220, 61)  # #3ddc84
TRACK = (51, 51, 51)
FILL = (255, 154, 76)  # #4c9aff
POSITIVE_FILL = (107, 107, 255)  # #ff6b6b, also the positive class's label
TICK = (255, 255, 255)
TEXT = (238, 238, 238)
WARNING = (41, 180, 240)  # #f0b429: "no decision"
MUTED = (187, 187, 187)
WITHDRAWN_DIM = 0.35  # a frame without a decision is shown dimmed, as on the page
FONT = cv2.FONT_HERSHEY_DUPLEX
# SDL's fallbacks where it finds no screen: they draw nowhere, so they are taken only when asked for
HEADLESS_DRIVERS = ("offscreen", "dummy")
NO_SCREEN = ("with no display server, set SDL_VIDEODRIVER=kmsdrm on a console without a desktop, "
             "run under X11 or Wayland, or turn the display off (no --display; display.enabled: false)")  # fmt: skip


@dataclass(frozen=True)
class Box:
    x: int
    y: int
    w: int
    h: int


@dataclass(frozen=True)
class Layout:
    banners: tuple[Box, ...]
    frame: Box  # the frame is fitted inside, letterboxed
    decision: Box
    reason: Box
    tracks: tuple[Box, ...]  # one probability bar per class
    status: Box


def screen_layout(size: tuple[int, int], banners: int, classes: int) -> Layout:
    """Where everything goes on a `size` (width, height) screen: banners across the top, the
    frame on the left three fifths, decision, bars and status on the right."""
    width, height = size
    band = max(24, height // 20)
    top = banners * band
    margin = max(8, width // 80)
    panel_w = max(240, width * 2 // 5)
    frame = Box(margin, top + margin, width - panel_w - 3 * margin, height - top - 2 * margin)
    x = frame.x + frame.w + margin
    w = width - x - margin
    decision = Box(x, top + margin, w, max(40, height // 6))
    reason = Box(x, decision.y + decision.h, w, max(30, height // 8))
    row = max(22, height // 14)
    label_w, value_w = w * 3 // 10, w * 2 // 10
    first = reason.y + reason.h + margin
    tracks = tuple(
        Box(x + label_w, first + k * row + row // 5, w - label_w - value_w, row * 3 // 5)
        for k in range(classes)
    )
    status_y = first + classes * row + margin
    status = Box(x, status_y, w, max(0, height - margin - status_y))
    return Layout(tuple(Box(0, k * band, width, band) for k in range(banners)), frame, decision,
                  reason, tracks, status)  # fmt: skip


def fit(shape: Sequence[int], box: Box) -> tuple[int, int, float]:
    """Left, top and scale of an image of `shape` fitted (aspect kept) and centred in `box`."""
    height, width = shape[:2]
    scale = min(box.w / width, box.h / height)
    return (box.x + (box.w - round(width * scale)) // 2,
            box.y + (box.h - round(height * scale)) // 2, scale)  # fmt: skip


def render_screen(
    view: dict[str, Any], image: np.ndarray | None, size: tuple[int, int]
) -> np.ndarray:
    """The screen for `view` (`ServeRuntime.view()`) and the frame it describes, as BGR uint8."""
    width, height = size
    screen = np.full((height, width, 3), BACKGROUND, np.uint8)
    shown = view["display"]
    probabilities: dict[str, float] = shown["probabilities"] or {}
    decided = shown["label"] is not None
    layout = screen_layout(size, len(view["banners"]), len(probabilities) if decided else 0)
    for k, (box, text) in enumerate(zip(layout.banners, view["banners"], strict=True)):
        _fill(screen, box, BANNER_COLOURS[min(k, 1)])
        _text(screen, text, box, TEXT, centre=True)
    if image is not None:
        per_frame = view.get("per_frame") or {}
        lesion = per_frame.get("box") if per_frame.get("quality") == "ok" else None
        _draw_frame(screen, image, view.get("region"), layout.frame, dim=not decided, lesion=lesion)
    model = view["model"]
    if decided:
        colour = POSITIVE_FILL if shown["label"] == model["positive_class"] else TEXT
        _text(screen, shown["label"], layout.decision, colour)
        for box, (name, p) in zip(layout.tracks, probabilities.items(), strict=True):
            positive = name == model["positive_class"]
            _bar(screen, box, name, p, model["threshold"] if positive else None, positive)
        if shown.get("warning"):  # shown, but marked unreliable (shift: mark)
            _wrapped(screen, shown["warning"], layout.reason)
    else:
        _text(screen, "no decision", layout.decision, WARNING, height_share=0.5)
        _wrapped(screen, (shown["reason"] or "").removeprefix("no decision: "), layout.reason)
    latency = (view.get("latency_ms") or {}).get("end_to_end") or {}
    lines = [
        f"{view['fps']:.1f} fps, latency p50 {latency.get('p50', 0):.0f} ms",
        f"source {view['feed']['source']}: {view['feed']['status']}",
        f"model {model['name']} {model['sha256'][:12]}",
    ]
    if decided and model.get("sensitivity_bound"):
        lines.insert(0, model["sensitivity_bound"])  # the evidence behind the call, beside it
    if not view["audit"]["healthy"]:
        lines.append(f"Audit log problem: {view['audit']['problem']}")
    line_h = max(16, layout.status.h // 6)
    for k, line in enumerate(lines):
        box = Box(layout.status.x, layout.status.y + k * line_h, layout.status.w, line_h)
        _text(screen, line, box, WARNING if line.startswith("Audit") else MUTED)
    return screen


def _draw_frame(screen: np.ndarray, image: np.ndarray, region: dict[str, int] | None, box: Box,
                dim: bool, lesion: dict[str, float] | None = None) -> None:  # fmt: skip
    if image.dtype != np.uint8:
        image = (image >> 8).astype(np.uint8)
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    x, y, scale = fit(image.shape, box)
    w, h = round(image.shape[1] * scale), round(image.shape[0] * scale)
    fitted = cv2.resize(
        image, (w, h), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    )
    if dim:
        fitted = (fitted * WITHDRAWN_DIM).astype(np.uint8)
    screen[y : y + h, x : x + w] = fitted
    if region is not None:
        left, top = x + round(region["x"] * scale), y + round(region["y"] * scale)
        right = x + round((region["x"] + region["w"]) * scale) - 1
        bottom = y + round((region["y"] + region["h"]) * scale) - 1
        cv2.rectangle(screen, (left, top), (right, bottom), REGION, 2)
    if lesion is not None:  # the localiser's box, where the classifier looked (found lesions only)
        left, top = x + round(lesion["x"] * scale), y + round(lesion["y"] * scale)
        right = x + round((lesion["x"] + lesion["w"]) * scale) - 1
        bottom = y + round((lesion["y"] + lesion["h"]) * scale) - 1
        cv2.rectangle(screen, (left, top), (right, bottom), LESION, 2)


def _bar(screen: np.ndarray, track: Box, name: str, p: float, threshold: float | None,
         positive: bool) -> None:  # fmt: skip
    _fill(screen, track, TRACK)
    _fill(
        screen,
        Box(track.x, track.y, round(p * track.w), track.h),
        POSITIVE_FILL if positive else FILL,
    )
    if threshold is not None:  # the operating threshold, so that the label makes sense
        tick = track.x + round(threshold * track.w)
        screen[track.y - 3 : track.y + track.h + 3, max(track.x, tick - 1) : tick + 1] = TICK
    label = Box(track.x - track.w * 3 // 5, track.y, track.w * 3 // 5, track.h)
    _text(screen, name, label, TEXT, height_share=0.9)
    value = Box(track.x + track.w + 6, track.y, track.w // 2, track.h)
    _text(screen, f"{100 * p:.0f}%", value, TEXT, height_share=0.9)


def _fill(screen: np.ndarray, box: Box, colour: tuple[int, int, int]) -> None:
    screen[box.y : box.y + box.h, box.x : box.x + box.w] = colour


def _ascii(text: str) -> str:
    """OpenCV's Hershey fonts draw ASCII only."""
    text = text.replace("—", "-").replace("…", "...")
    return text.encode("ascii", "replace").decode("ascii")


def _text(screen: np.ndarray, text: str, box: Box, colour: tuple[int, int, int],
          centre: bool = False, height_share: float = 0.7) -> None:  # fmt: skip
    """`text` as large as fits `box` (its height times `height_share`, its width)."""
    text = _ascii(text)
    if not text or box.w <= 0 or box.h <= 0:
        return
    (w1, h1), _ = cv2.getTextSize(text, FONT, 1.0, 1)
    scale = min(box.h * height_share / max(h1, 1), box.w / max(w1, 1))
    thickness = max(1, round(scale * 1.5))
    (w, h), _ = cv2.getTextSize(text, FONT, scale, thickness)
    if w > box.w:  # the thicker stroke widened it
        scale *= box.w / w
        (w, h), _ = cv2.getTextSize(text, FONT, scale, thickness)
    x = box.x + (box.w - w) // 2 if centre else box.x
    cv2.putText(
        screen, text, (x, box.y + (box.h + h) // 2), FONT, scale, colour, thickness, cv2.LINE_AA
    )


def _wrapped(screen: np.ndarray, text: str, box: Box, lines: int = 3) -> None:
    """A reason, over up to `lines` lines of the box (the last one shortened if need be)."""
    words, rows = _ascii(text).split(), list[str]()
    while words and len(rows) < lines:
        row = words.pop(0)
        while words and len(row) + 1 + len(words[0]) <= 34:
            row += " " + words.pop(0)
        rows.append(row)
    if words:
        rows[-1] += " ..."
    line_h = box.h // lines
    for k, row in enumerate(rows):
        _text(screen, row, Box(box.x, box.y + k * line_h, box.w, line_h), WARNING, height_share=0.8)


class Window:
    """A pygame window, full screen or not, that shows BGR images. Use it from one thread."""

    def __init__(self, fullscreen: bool = True, size: tuple[int, int] = (1280, 720)) -> None:
        os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")  # no greeting on the service log
        self._pygame = pygame = require("pygame", "the local display (display.enabled)")
        try:
            pygame.display.init()
            driver = pygame.display.get_driver()
            if driver in HEADLESS_DRIVERS and os.environ.get("SDL_VIDEODRIVER") != driver:
                raise pygame.error(f"no screen found (SDL fell back to its {driver} driver, "
                                   "which shows nothing)")  # fmt: skip
            flags = pygame.FULLSCREEN if fullscreen else 0
            self.surface = pygame.display.set_mode((0, 0) if fullscreen else size, flags)
        except pygame.error as exc:
            pygame.display.quit()
            message = f"the local display cannot open a window: {exc}; {NO_SCREEN}"
            raise EdgebcError(message) from exc
        pygame.display.set_caption("edgebc — research use only")
        pygame.mouse.set_visible(not fullscreen)
        self.size: tuple[int, int] = self.surface.get_size()

    def show(self, screen: np.ndarray) -> None:
        height, width = screen.shape[:2]
        if (width, height) != self.size:
            raise ValueError(f"a {width}x{height} image for a {self.size[0]}x{self.size[1]} window")
        rgb = np.ascontiguousarray(screen[:, :, ::-1])
        self.surface.blit(self._pygame.image.frombuffer(rgb.tobytes(), self.size, "RGB"), (0, 0))
        self._pygame.display.flip()

    def close_requested(self) -> bool:
        """Handle the window's events; True when the window manager asked to close it."""
        return any(event.type == self._pygame.QUIT for event in self._pygame.event.get())

    def close(self) -> None:
        self._pygame.display.quit()


class LocalDisplay:
    """The sink that keeps the cart's own screen current: `start` opens the window (an error
    there stops the service from starting), each result wakes a redraw, `close` closes it."""

    name = "display"

    def __init__(self, settings: DisplaySettings, refresh_seconds: float = 0.25) -> None:
        os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
        require("pygame", "the local display (display.enabled)")  # fail at start-up, not later
        self.settings = settings
        self.refresh_seconds = refresh_seconds
        self.frames_shown = 0
        self.stopped: str | None = None  # why the window went away, once it has
        self._size: tuple[int, int] | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._opened = threading.Event()
        self._failure: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self, screen: Screen, timeout: float = 10.0) -> None:
        """Open the window on the display's own thread (SDL wants one thread), wait for it, and
        from then on draw `screen()`: the view and its frame, from one result."""
        self._thread = threading.Thread(target=self._run, args=(screen,),
                                        name="edgebc-local-display", daemon=True)  # fmt: skip
        self._thread.start()
        if not self._opened.wait(timeout):
            self._stop.set()
            raise EdgebcError(f"the local display did not open its window within {timeout:.0f} s; "
                              f"{NO_SCREEN}")  # fmt: skip
        if self._failure is not None:
            raise self._failure

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def health(self) -> tuple[bool, str]:
        """Whether the window is up and redrawing, and in words (readiness, the status line)."""
        stopped = self.stopped
        if self.alive and stopped is None and self._size is not None:
            return True, f"showing the screen at {self._size[0]}x{self._size[1]}"
        return False, f"the local display stopped: {stopped or 'not open'}"

    def handle(self, result: LiveResult) -> None:
        self._wake.set()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5.0)

    def _run(self, screen: Screen) -> None:
        try:
            window = Window(self.settings.fullscreen, self.settings.size)
        except BaseException as exc:  # handed to start(), which raises it on the caller's thread
            self._failure = exc
            self._opened.set()
            return
        self._size = window.size
        self._opened.set()
        try:
            while not self._stop.is_set():
                if window.close_requested():
                    self.stopped = "its window was closed"
                    log.warning("the local display was closed from its window; serving goes on")
                    break
                view, image = screen()
                window.show(render_screen(view, image, window.size))
                self.frames_shown += 1
                self._wake.wait(self.refresh_seconds)
                self._wake.clear()
            else:
                self.stopped = "the service is stopping"
        except Exception as exc:
            self.stopped = f"it failed ({exc})"
            log.exception("the local display failed; serving goes on without it")
        finally:
            window.close()
