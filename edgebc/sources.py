"""Frame sources, chosen by a URI-like string: one protocol, numpy BGR or grey frames out.

    scans/  or  "scans/**/*.png"  or  frame.png   image, video and DICOM files (sorted), read once
    clip.avi                                   a video file
    cine.dcm                                   DICOM, single frame or multi-frame cine (needs pydicom)
    /dev/video0, v4l2:0, 0                     a V4L2 capture card (OpenCV)
    /dev/edgebc-capture                        the same, by the stable name deploy/udev gives it
    rtsp://..., http://..., gst:PIPELINE       a network stream or GStreamer pipeline (OpenCV)
    picamera2:0                                a Raspberry Pi camera (picamera2)
    phantom:malignant?fps=30&seed=0            the synthetic phantom cine, looping, paced like a scanner

Folders and glob patterns are expanded by `expand_inputs`, the one rule `edgebc classify` uses too.
Every frame carries its capture time (wall clock and monotonic) and a sequence number, so a
result can say how old its frame was. Live sources are read through `edgebc.live`, which keeps
only the newest frame and watches the feed.
"""

from __future__ import annotations

import contextlib
import glob as globbing
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from edgebc.decode import (
    DicomStudy,
    ImageView,
    decode_dicom_frames,
    read_image,
    read_image_view,
    read_study,
    sniff_format,
)
from edgebc.errors import EdgebcError
from edgebc.optional import require

VIDEO_SUFFIXES = (".avi", ".mp4", ".mov", ".mkv", ".mpg", ".webm")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".pgm")  # picture files, one frame each (not DICOM)
DICOM_SUFFIXES = (".dcm",)  # one frame or a cine; DICOM kept without a suffix is found by content
INPUT_SUFFIXES = (*IMAGE_SUFFIXES, *VIDEO_SUFFIXES, *DICOM_SUFFIXES)


class SourceError(EdgebcError):
    """The source failed (unplugged, closed stream, unreadable); a live reader reopens it."""


@dataclass(frozen=True)
class Frame:
    image: np.ndarray
    index: int  # sequence number within this source
    captured: float  # wall-clock time.time() at capture
    captured_monotonic: float  # time.monotonic() at capture, for ages
    source: str
    read_ms: float = (
        0.0  # how long the source's read took (grab + decode; for live sources also the wait)
    )
    view: ImageView | None = None  # what a DICOM header says of a mammogram's view
    # its DICOM study and patient (StudyInstanceUID, PatientID), hashed; None: not DICOM. In
    # memory only: the live cart compares them, and records the study's hash, never the patient's
    study: DicomStudy | None = None

    def age(self) -> float:
        return time.monotonic() - self.captured_monotonic


class FrameSource(Protocol):
    name: str
    live: bool  # live sources are read on their own thread, newest frame only

    def open(self) -> None: ...

    def read(self) -> Frame | None:
        """The next frame; None at the end of a finite source; SourceError on failure."""
        ...

    def close(self) -> None: ...


class _Counter:
    def __init__(self, name: str) -> None:
        self.name, self._next = name, 0

    def stamp(
        self, image: np.ndarray, view: ImageView | None = None, study: DicomStudy | None = None
    ) -> Frame:
        frame = Frame(image, self._next, time.time(), time.monotonic(), self.name, view=view,
                      study=study)  # fmt: skip
        self._next += 1
        return frame


class ImageFileSource:
    """One image file: one frame (a 16-bit PNG stays 16-bit)."""

    live = False

    def __init__(self, path: Path) -> None:
        self.path, self.name = path, str(path)
        self._pending = False
        self._counter = _Counter(self.name)

    def open(self) -> None:
        self._pending = True

    def read(self) -> Frame | None:
        if not self._pending:
            return None
        self._pending = False
        return self._counter.stamp(read_image(self.path))

    def close(self) -> None:
        self._pending = False


class DicomSource:
    """A DICOM file's frames, display-ready in 8 bits, or with `full_depth` (mammography models)
    grey frames in 16 bits; each frame carries what the header says of the view, and its study
    and patient hashed (the live cart ends a case's mammogram attachment at another patient's
    frame, or when a new ultrasound study begins)."""

    live = False

    def __init__(self, path: Path, full_depth: bool = False) -> None:
        self.path, self.name = path, str(path)
        self.full_depth = full_depth
        self._frames: Iterator[np.ndarray] = iter(())
        self._view: ImageView | None = None
        self.study = DicomStudy()  # the file's study and patient, hashed, once opened
        self._counter = _Counter(self.name)

    def open(self) -> None:
        data = self.path.read_bytes()
        self._view = read_image_view(data, self.name)
        self.study = read_study(data, self.name)
        frames = decode_dicom_frames(data, self.name, full_depth=self.full_depth)
        self._frames = iter(frames)

    def read(self) -> Frame | None:
        image = next(self._frames, None)
        return None if image is None else self._counter.stamp(image, self._view, self.study)

    def close(self) -> None:
        self._frames = iter(())


@contextlib.contextmanager
def _opencv_errors_only() -> Iterator[None]:
    """OpenCV prints its own warnings to stderr, bypassing logging (a missing device gives
    "[ WARN:0@0.009] global cap.cpp:212 open VIDEOIO(V4L2): backend is generally available but
    can't be used to capture by name" at every reopening); while a capture opens, only its errors
    pass, and the source says what went wrong in an edgebc line instead."""
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    try:
        yield
    finally:
        cv2.utils.logging.setLogLevel(level)


class OpenCVSource:
    """Video files, V4L2 devices, network streams and GStreamer pipelines through cv2.VideoCapture."""

    def __init__(
        self,
        target: str | int,
        name: str,
        live: bool,
        api: int = cv2.CAP_ANY,
        buffer_frames: int = 1,
    ) -> None:
        self.target, self.name, self.live, self.api = target, name, live, api
        self.buffer_frames = buffer_frames
        self._capture: cv2.VideoCapture | None = None
        self._counter = _Counter(name)

    def open(self) -> None:
        device = (
            self.target
            if isinstance(self.target, str) and self.target.startswith("/dev/")
            else None
        )
        if device is not None and not Path(device).exists():
            raise SourceError(f"{self.name}: cannot open (no such device {device}: unplugged, or "
                              "another name? `edgebc info` lists the video devices)")  # fmt: skip
        with _opencv_errors_only():  # its own "[ WARN ...]" lines; the reason is ours, below
            capture = cv2.VideoCapture(self.target, self.api)
        if not capture.isOpened():
            why = (
                "device absent, busy or no permission?"
                if self.live
                else "no such file, or not a video OpenCV reads?"
            )
            raise SourceError(f"{self.name}: cannot open ({why})")
        if (
            self.live
        ):  # ask the driver for as little buffering as it allows; the reader drops the rest
            capture.set(cv2.CAP_PROP_BUFFERSIZE, self.buffer_frames)
        self._capture = capture

    def declared(self) -> str:
        """What the driver or container says of the stream: its frame rate and pixel format."""
        if self._capture is None:
            return ""
        fps = self._capture.get(cv2.CAP_PROP_FPS)
        code = int(self._capture.get(cv2.CAP_PROP_FOURCC))
        fourcc = "".join(chr((code >> 8 * k) & 0xFF) for k in range(4)).strip("\x00 ")
        parts = [
            f"declared {fps:.1f} fps" if fps > 0 else "",
            f"format {fourcc}" if fourcc.isprintable() and fourcc else "",
        ]
        return ", ".join(p for p in parts if p)

    def read(self) -> Frame | None:
        if self._capture is None:
            raise SourceError(f"{self.name}: not open")
        ok, image = self._capture.read()
        if not ok:
            if self.live:
                raise SourceError(f"{self.name}: no frame (unplugged or stream ended)")
            return None
        return self._counter.stamp(image)

    def close(self) -> None:
        if self._capture is not None:
            self._capture.release()
            self._capture = None


class PiCameraSource:
    """The Raspberry Pi camera through picamera2. Its "RGB888" arrays are B, G, R in memory (and
    "XRGB8888" B, G, R, X), which is already OpenCV's order: only the padding byte is dropped."""

    live = True

    def __init__(
        self, camera: int = 0, size: tuple[int, int] = (1280, 720), pixel_format: str = "RGB888"
    ) -> None:
        self.camera, self.size, self.pixel_format = camera, size, pixel_format
        self.name = f"picamera2:{camera}"
        self._picam: Any = None
        self._counter = _Counter(self.name)

    def open(self) -> None:
        picamera2 = require("picamera2", "the Raspberry Pi camera")
        try:
            self._picam = picamera2.Picamera2(self.camera)
            config = self._picam.create_video_configuration(
                main={"size": self.size, "format": self.pixel_format}
            )
            self._picam.configure(config)
            self._picam.start()
        except Exception as exc:
            raise SourceError(f"{self.name}: cannot start the camera: {exc}") from exc

    def read(self) -> Frame | None:
        if self._picam is None:
            raise SourceError(f"{self.name}: not open")
        try:
            array = self._picam.capture_array("main")
        except Exception as exc:
            raise SourceError(f"{self.name}: capture failed: {exc}") from exc
        return self._counter.stamp(np.ascontiguousarray(array[:, :, :3]))

    def close(self) -> None:
        if self._picam is not None:
            self._picam.stop()
            self._picam.close()
            self._picam = None


PHANTOM_TOUR = ("normal", "benign", "malignant")


class FramePacer:
    """When a paced source's next frame is due: every 1/fps s from `start`, never more than one
    period behind (a reader that fell behind gets the next frame at once, not a burst of the
    frames it missed)."""

    def __init__(self, fps: float) -> None:
        self.period = 1.0 / fps
        self._due = 0.0

    def start(self) -> None:
        self._due = time.monotonic()

    def wait(self) -> None:
        delay = self._due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        self._due = max(self._due + self.period, time.monotonic() - self.period)


class PhantomCineSource:
    """Synthetic phantom sweeps, looping, delivered at `fps` like a live scanner.

    One class (`phantom:benign`) or `phantom:tour`: a sweep of each class in turn, so a display
    shows its decision change (the embedded demo watches this)."""

    live = True

    def __init__(
        self,
        label: str = "malignant",
        fps: float = 30.0,
        seed: int = 0,
        size: int = 256,
        frames: int = 60,
    ) -> None:
        from edgebc.data.records import CLASS_NAMES

        if label not in (*CLASS_NAMES, "tour"):
            raise EdgebcError(
                f"phantom:{label}: unknown phantom; choose tour or one of {', '.join(CLASS_NAMES)}"
            )
        if not fps > 0 or size < 32 or frames < 2:
            raise EdgebcError(f"phantom:{label}: fps must be > 0, size >= 32, frames >= 2")
        self.label, self.fps, self.seed, self.size, self.frames = label, fps, seed, size, frames
        self.name = f"phantom:{label}"
        self._clip: list[np.ndarray] = []
        self._position = 0
        self._pacer = FramePacer(fps)
        self._counter = _Counter(self.name)

    def open(self) -> None:
        from edgebc.synth.cine import make_cine
        from edgebc.synth.ultrasound import phantom_rng

        labels = PHANTOM_TOUR if self.label == "tour" else (self.label,)
        self._clip = []
        for number, label in enumerate(labels):
            sweep, _ = make_cine(
                label, phantom_rng(self.seed, 77 + number), self.frames, self.size, self.size
            )
            self._clip += sweep + sweep[-2:0:-1]  # back and forth, so a loop has no jump
        self._pacer.start()

    def read(self) -> Frame | None:
        if not self._clip:
            raise SourceError(f"{self.name}: not open")
        self._pacer.wait()
        image = self._clip[self._position % len(self._clip)]
        self._position += 1
        return self._counter.stamp(image)

    def close(self) -> None:
        self._clip = []


class FilesSource:
    """Image, video and DICOM files played one after another as one finite source (a folder or a
    glob pattern); its frames are numbered on, across the files, and keep their DICOM view,
    study and patient."""

    live = False

    def __init__(self, paths: Sequence[Path], name: str, full_depth: bool = False) -> None:
        if not paths:
            raise EdgebcError(f"{name}: no image, video or DICOM files found")
        self.paths, self.name, self.full_depth = list(paths), name, full_depth
        self._files: Iterator[Path] = iter(())
        self._current: FrameSource | None = None
        self._counter = _Counter(name)

    def open(self) -> None:
        self.close()
        self._files = iter(self.paths)

    def read(self) -> Frame | None:
        while True:
            if self._current is None:
                path = next(self._files, None)
                if path is None:
                    return None
                self._current = open_file(path, self.full_depth)
                self._current.open()
            frame = self._current.read()
            if frame is not None:
                return self._counter.stamp(frame.image, frame.view, frame.study)
            self._current.close()
            self._current = None

    def close(self) -> None:
        if self._current is not None:
            self._current.close()
            self._current = None
        self._files = iter(())


def expand_inputs(items: Sequence[str]) -> list[Path]:
    """The files that `items` name, for `edgebc classify` and for folder and pattern sources.

    A file is taken as named, whatever it is (an unreadable one is reported when read). A folder
    stands for the image, video and DICOM files anywhere below it, and a glob pattern for those it
    matches (`**` crosses folders); segmentation masks (`*_mask*`) are left out of both. A pattern
    that matches no such file is an error, and so is a named path that does not exist (a typo:
    refused before anything is read or written); a folder may be empty (a night without studies).
    """
    missing = [item for item in items if not _is_pattern(item) and not Path(item).exists()]
    if missing:
        raise EdgebcError(f"no such file or folder: {', '.join(missing)}")
    paths: list[Path] = []
    for item in items:
        if _is_pattern(item):
            found = [Path(m) for m in sorted(globbing.glob(item, recursive=True))]
            found = [p for p in found if _is_input_file(p)]
            if not found:
                raise EdgebcError(f"{item}: the pattern matches no image, video or DICOM file")
            paths += found
        elif Path(item).is_dir():
            paths += sorted(p for p in Path(item).rglob("*") if _is_input_file(p))
        else:
            paths.append(Path(item))
    return paths


def _is_pattern(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def _is_input_file(path: Path) -> bool:
    return path.suffix.lower() in INPUT_SUFFIXES and "_mask" not in path.stem and path.is_file()


def open_file(path: Path, full_depth: bool = False) -> FrameSource:
    """The source for one file: a video (by its suffix), a DICOM file, one frame or a cine (by its
    suffix, or its first bytes: archives often keep DICOM without one), else an image. The one
    reader of a file's frames, for `edgebc serve` and `edgebc classify` alike. `full_depth`
    (mammography) keeps a grey DICOM's full bit depth instead of its 8-bit display."""
    suffix = path.suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        return OpenCVSource(str(path), str(path), live=False)
    if suffix in DICOM_SUFFIXES or _holds_dicom(path):
        return DicomSource(path, full_depth)
    return ImageFileSource(path)


def _holds_dicom(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return sniff_format(handle.read(132)) == "dicom"
    except OSError:
        return False  # not readable: reading it as an image says why


def probe_source(uri: str, timeout: float = 5.0) -> str:
    """Open the source once, read two frames and say what came (`edgebc serve --check`): size,
    channels, sample type, the rate they came at, and what the driver declares. A source that
    cannot be opened or gives no frame within `timeout` raises SourceError saying so."""
    import threading

    source = open_source(uri)
    found: dict[str, Any] = {}

    def read_two() -> None:
        try:
            source.open()
            first = source.read()
            second = source.read() if first is not None and source.live else None
            found["frames"] = [f for f in (first, second) if f is not None]
        except Exception as exc:  # said below, in one line
            found["error"] = exc

    reader = threading.Thread(target=read_two, name="edgebc-probe", daemon=True)
    reader.start()
    reader.join(timeout)
    try:
        if reader.is_alive():
            raise SourceError(f"{uri}: no frame within {timeout:.0f} s (a hung device or stream?)")
        if "error" in found:
            error = found["error"]
            raise error if isinstance(error, SourceError) else SourceError(f"{uri}: {error}")
        frames: list[Frame] = found["frames"]
        if not frames:
            raise SourceError(f"{uri}: opened, but it has no frame")
        declared = source.declared() if isinstance(source, OpenCVSource) else ""  # while open
    finally:
        if not reader.is_alive():
            source.close()
    image = frames[0].image
    height, width = image.shape[:2]
    channels = 1 if image.ndim == 2 else image.shape[2]
    facts = [f"{width}x{height}", f"{channels} channel{'s' if channels > 1 else ''} {image.dtype}"]
    if len(frames) == 2 and frames[1].captured_monotonic > frames[0].captured_monotonic:
        facts.append(
            f"next frame after {1000 * (frames[1].captured_monotonic - frames[0].captured_monotonic):.0f} ms"
        )
    return ", ".join([*facts, *([declared] if declared else [])])


def open_source(uri: str, full_depth: bool = False) -> FrameSource:
    """The source named by `uri` (see the module docstring); not yet opened. `full_depth`
    (mammography models) keeps a grey DICOM file's full bit depth (open_file)."""
    text = uri.strip()
    if text.startswith("phantom:"):
        parsed = urllib.parse.urlparse(text)
        options = dict(urllib.parse.parse_qsl(parsed.query))
        label = parsed.path or "malignant"
        try:
            return PhantomCineSource(
                label,
                float(options.get("fps", 30)),
                int(options.get("seed", 0)),
                int(options.get("size", 256)),
            )
        except ValueError as exc:
            raise EdgebcError(f"{uri}: bad phantom option: {exc}") from exc
    if text.startswith("picamera2:"):
        return PiCameraSource(int(text.split(":", 1)[1] or 0))
    if text.startswith("gst:"):
        return OpenCVSource(text[4:], text, live=True, api=cv2.CAP_GSTREAMER)
    if text.startswith(("rtsp://", "http://", "https://")):
        return OpenCVSource(text, text, live=True)
    if text.isdigit() or text.startswith(("v4l2:", "/dev/")):  # /dev/edgebc-capture: udev's name
        device = text.removeprefix("v4l2:")
        target: str | int = int(device) if device.isdigit() else device
        return OpenCVSource(target, f"v4l2:{device}", live=True, api=cv2.CAP_V4L2)
    path = Path(text)
    if _is_pattern(text) or path.is_dir():
        return FilesSource(expand_inputs([text]), text, full_depth)
    if not path.exists():
        raise EdgebcError(
            f"{uri}: no such file, folder or device (sources: a folder, glob, image, video, .dcm, "
            "/dev/videoN, rtsp://..., gst:PIPELINE, picamera2:N or phantom:CLASS)"
        )
    return open_file(path, full_depth)
