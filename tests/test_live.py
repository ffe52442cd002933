"""Sources and the live reader: newest frame only, never twice, and a watchdog tested by injecting faults."""

import time

import numpy as np
import pytest

from edgebc.errors import EdgebcError
from edgebc.live import LiveReader, same_picture
from edgebc.sources import Frame, OpenCVSource, PhantomCineSource, SourceError, open_source
from edgebc.synth import make_ultrasound_phantom
from edgebc.synth.cine import write_video
from edgebc.synth.ultrasound import phantom_rng


class ScriptedSource:
    """A live source that misbehaves on cue: each step is 'frame', 'same', 'garbage', 'hang', 'fail' or 'end'."""

    live = True

    def __init__(self, script, period=0.01, hang=2.0):
        self.script, self.period, self.hang = list(script), period, hang
        self.name, self.position, self.opened, self.closed = "scripted", 0, 0, 0
        self.counter = 0

    def open(self):
        self.opened += 1

    def read(self):
        time.sleep(self.period)
        step = self.script[min(self.position, len(self.script) - 1)]
        self.position += 1
        if step == "hang":
            time.sleep(self.hang)
            step = "frame"
        if step == "fail":
            raise SourceError("capture card unplugged")
        if step == "end":
            return None
        if step == "garbage":
            image = np.zeros((0, 4), np.float64)
        elif step == "same":
            image = np.full((16, 16), 7, np.uint8)
        else:
            self.counter += 1
            image = np.full((16, 16), self.counter % 250, np.uint8)
        return Frame(image, self.position, time.time(), time.monotonic(), self.name)

    def close(self):
        self.closed += 1


def _wait_for(reader, status, timeout=3.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if reader.state().status == status:
            return reader.state()
        time.sleep(0.02)
    raise AssertionError(f"state stayed {reader.state()} instead of {status}")


def test_newest_frame_only_and_never_twice():
    source = ScriptedSource(["frame"] * 400, period=0.001)
    reader = LiveReader(lambda: source).start()
    try:
        seen = []
        for _ in range(10):
            frame = reader.latest(timeout=1.0)
            assert frame is not None and frame.age() < 0.5
            seen.append(frame.index)
            time.sleep(0.02)  # a slow consumer: the reader must skip ahead, not queue
        assert seen == sorted(set(seen))  # strictly increasing: no frame handed out twice
        assert reader.state().dropped > 0 and max(np.diff(seen)) > 1
    finally:
        reader.stop()
    assert source.closed == 1


def test_a_hung_source_is_reported_within_a_second_then_replaced():
    sources = []

    def factory():
        sources.append(ScriptedSource(["frame"] * 5 + ["hang"] + ["frame"] * 1000, hang=30.0))
        return sources[-1]

    reader = LiveReader(factory, stall_seconds=0.5, hang_seconds=1.5).start()
    try:
        assert reader.latest(1.0) is not None
        start = time.monotonic()
        _wait_for(reader, "stalled", timeout=2.0)
        assert time.monotonic() - start < 1.5
        state = _wait_for(reader, "ok", timeout=4.0)  # a fresh source from the factory took over
        assert len(sources) == 2 and state.reopenings >= 1
    finally:
        reader.stop()


def test_a_frozen_feed_is_reported_and_its_frames_not_reclassified():
    reader = LiveReader(
        lambda: ScriptedSource(["frame"] + ["same"] * 1000), freeze_seconds=0.3
    ).start()
    try:
        assert reader.latest(1.0) is not None
        state = _wait_for(reader, "frozen", timeout=2.0)
        assert "identical frames" in state.detail
        reader.latest(0.2)  # the first frame of the identical run was new content; take it
        assert reader.latest(0.3) is None  # the repeats are never handed out
    finally:
        reader.stop()


def test_garbage_is_reported():
    reader = LiveReader(lambda: ScriptedSource(["garbage"] * 1000)).start()
    try:
        state = _wait_for(reader, "garbage", timeout=2.0)
        assert "ndarray (0, 4) float64" in state.detail
    finally:
        reader.stop()


def test_a_source_that_disappears_and_comes_back_is_reopened_with_backoff():
    attempts = {"n": 0}

    class Flaky(ScriptedSource):
        def open(self):
            attempts["n"] += 1
            if attempts["n"] <= 3:
                raise SourceError("/dev/video0: no such device")
            super().open()

    reader = LiveReader(
        lambda: Flaky(["frame"] * 10 + ["fail"] + ["frame"] * 1000), backoff=(0.05, 0.2)
    ).start()
    try:
        _wait_for(reader, "reopening", timeout=1.0)
        _wait_for(reader, "ok", timeout=3.0)
        assert reader.latest(1.0) is not None
        assert reader.state().reopenings >= 3 and attempts["n"] >= 4
    finally:
        reader.stop()


def test_a_finite_source_ends_and_stop_releases_the_thread():
    reader = LiveReader(lambda: ScriptedSource(["frame", "frame", "end"])).start()
    _wait_for(reader, "ended", timeout=2.0)
    reader.stop()
    assert not reader.alive


def test_video_file_and_image_folder_sources(tmp_path):
    frames = [make_ultrasound_phantom("benign", phantom_rng(0, k), 64, 80).image for k in range(5)]
    write_video(frames, tmp_path / "clip.avi")
    video = open_source(str(tmp_path / "clip.avi"))
    assert isinstance(video, OpenCVSource) and not video.live
    video.open()
    read = [video.read() for _ in range(6)]
    video.close()
    assert [f.index for f in read[:5]] == [0, 1, 2, 3, 4] and read[5] is None
    assert read[0].image.shape == (64, 80, 3)
    import cv2

    # a folder of its own: a folder stands for its videos too (see the next test)
    (tmp_path / "scans").mkdir()
    for k, frame in enumerate(frames[:3]):
        cv2.imwrite(str(tmp_path / "scans" / f"f{k}.png"), frame)
    folder = open_source(str(tmp_path / "scans"))
    folder.open()
    assert [folder.read().source for _ in range(3)] == [str(tmp_path / "scans")] * 3
    assert folder.read() is None


def test_folders_and_patterns_play_images_videos_and_dicom_as_classify_expands_them(tmp_path):
    """One expansion for `edgebc classify` and the serve sources: folders recursively, `**`
    patterns across folders, videos and DICOM included, masks left out."""
    import cv2

    from edgebc.sources import expand_inputs

    frames = [make_ultrasound_phantom("benign", phantom_rng(1, k), 48, 64).image for k in range(4)]
    (tmp_path / "a" / "deep").mkdir(parents=True)
    write_video(frames, tmp_path / "a" / "clip.avi")
    cv2.imwrite(str(tmp_path / "a" / "deep" / "one.png"), frames[0])
    cv2.imwrite(str(tmp_path / "a" / "deep" / "one_mask.png"), (frames[0] > 100).astype(np.uint8))
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    expected = [tmp_path / "a" / "clip.avi", tmp_path / "a" / "deep" / "one.png"]
    assert expand_inputs([str(tmp_path / "a")]) == expected
    assert expand_inputs([str(tmp_path / "**" / "*.*")]) == expected
    assert expand_inputs([str(tmp_path / "a" / "notes.txt")]) == [tmp_path / "a" / "notes.txt"]
    with pytest.raises(EdgebcError, match="matches no image, video or DICOM file"):
        expand_inputs([str(tmp_path / "*.txt")])
    source = open_source(str(tmp_path / "a"))
    source.open()
    played = []
    while (frame := source.read()) is not None:
        played.append(frame)
    source.close()
    assert [f.index for f in played] == [0, 1, 2, 3, 4]  # four video frames, then the image
    assert played[0].image.shape == (48, 64, 3) and played[0].source == str(tmp_path / "a")
    assert np.array_equal(played[4].image, frames[0])  # the PNG, read back as written


def test_phantom_stream_is_paced_like_a_scanner():
    source = open_source("phantom:malignant?fps=50&size=64")
    assert isinstance(source, PhantomCineSource) and source.live
    source.open()
    start = time.monotonic()
    frames = [source.read() for _ in range(11)]
    assert 0.15 < time.monotonic() - start < 0.6  # 10 intervals at 50 fps
    assert frames[0].image.shape == (64, 64) and not np.array_equal(
        frames[0].image, frames[1].image
    )


def test_unknown_sources_and_missing_devices_are_clear():
    with pytest.raises(EdgebcError, match="no such file, folder or device"):
        open_source("/no/such/thing.avi")
    source = open_source("/dev/video99")
    with pytest.raises(SourceError, match="cannot open"):
        source.open()
    # the udev rule's stable name is a capture device too, reported as missing, not as a bad path
    named = open_source("/dev/edgebc-capture")
    assert named.name == "v4l2:/dev/edgebc-capture"
    with pytest.raises(SourceError, match="cannot open"):
        named.open()


@pytest.mark.camera
def test_a_real_capture_device_delivers_frames():
    reader = LiveReader(lambda: open_source("/dev/video0")).start()
    try:
        assert reader.latest(5.0) is not None
    finally:
        reader.stop()


def test_a_missing_device_is_said_once_in_an_edgebc_line_not_opencvs(caplog, capfd):
    """A capture device that is not there: the reader keeps reopening it, and the log says so once
    (with why), while OpenCV's own "[ WARN ...]" lines no longer reach stderr."""
    import logging

    from edgebc.live import LiveReader
    from edgebc.sources import open_source

    caplog.set_level(logging.INFO, logger="edgebc.live")
    reader = LiveReader(lambda: open_source("v4l2:57"), backoff=(0.01, 0.02)).start()
    try:
        deadline = time.monotonic() + 5
        while reader.state().reopenings < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert reader.state().reopenings >= 5 and reader.state().status == "reopening"
    finally:
        reader.stop()
    said = [r.getMessage() for r in caplog.records if r.name == "edgebc.live"]
    assert said == [
        "source reopening: v4l2:57: cannot open (device absent, busy or no permission?)"
    ]
    assert "WARN" not in capfd.readouterr().err


def test_probe_says_what_a_video_declares(tmp_path):
    """`edgebc serve --check` on a video: its size and channels from a frame, its rate and pixel
    format from what the container declares (read while it is open)."""
    from edgebc.sources import probe_source
    from edgebc.synth.cine import write_video

    frames = [np.full((48, 64), 40 * k, np.uint8) for k in range(4)]
    write_video(frames, tmp_path / "clip.avi")
    found = probe_source(str(tmp_path / "clip.avi"))
    assert found.startswith("64x48, 3 channels uint8") and "declared" in found and "fps" in found
    assert "format MJPG" in found


def test_frames_equal_on_the_rows_compared_first_are_still_compared_whole():
    rng = np.random.default_rng(3)
    frame = rng.integers(0, 256, (1080, 1920, 3), dtype=np.uint8)
    changed = frame.copy()
    changed[1, 1, 0] ^= 1  # off the eight rows the first comparison looks at
    assert same_picture(frame, frame.copy())
    assert not same_picture(frame, changed)
    assert not same_picture(frame, frame[:-1])
    assert not same_picture(frame, frame.astype(np.uint16))
