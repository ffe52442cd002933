"""The local display: the screen drawn headless and checked pixel by pixel, then the real pygame
window under SDL's dummy video driver, and the sink inside a running service."""

import sys

import numpy as np
import pytest

from edgebc.serve.display import (
    BACKGROUND,
    BANNER_COLOURS,
    FILL,
    POSITIVE_FILL,
    REGION,
    TICK,
    TRACK,
    WARNING,
    Box,
    fit,
    render_screen,
    screen_layout,
)

SIZE = (960, 540)
RESEARCH = "Research use only — not a medical device. Not for diagnosis."


def view(label="benign", probabilities=None, reason=None, demo=True, region=None, threshold=0.3):
    probabilities = probabilities or {"normal": 0.2, "benign": 0.5, "malignant": 0.3}
    return {
        "banners": [RESEARCH] + (["DEMO — synthetic phantom model"] if demo else []),
        "display": {
            "label": label,
            "probabilities": probabilities if label else None,
            "reason": reason,
        },
        "region": region,
        "fps": 29.5,
        "latency_ms": {"end_to_end": {"p50": 31.0, "p90": 40.0, "p99": 52.0, "max": 60.0}},
        "feed": {"source": "phantom:tour", "status": "ok"},
        "audit": {"healthy": True, "problem": None},
        "model": {
            "name": "demo-phantom",
            "sha256": "ab" * 32,
            "positive_class": "malignant",
            "threshold": threshold,
        },
    }


def runs(row, colour):
    """Lengths of the runs of `colour` along one row of pixels."""
    hits = np.all(row == colour, axis=-1).astype(np.int8)
    edges = np.diff(np.concatenate([[0], hits, [0]]))
    return list(np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1))


def test_the_banners_are_bands_across_the_top_and_the_demo_one_only_for_the_demo():
    screen = render_screen(view(demo=True), None, SIZE)
    layout = screen_layout(SIZE, 2, 3)
    research, demo = layout.banners
    assert research.y == 0 and research.w == SIZE[0] and demo.y == research.h
    assert (screen[research.y + 1, 2] == BANNER_COLOURS[0]).all()  # the band's left end, no text
    assert (screen[demo.y + demo.h - 2, SIZE[0] - 3] == BANNER_COLOURS[1]).all()
    band = screen[research.y : research.y + research.h]
    assert np.any(np.all(band > 200, axis=-1))  # the banner's words, in light type
    plain = render_screen(view(demo=False), None, SIZE)
    assert (plain[research.y + 1, 2] == BANNER_COLOURS[0]).all()
    assert (plain[demo.y + 1, 2] == BACKGROUND).all()  # no DEMO band for a real model


def test_bars_are_as_long_as_the_probabilities_with_a_tick_at_the_threshold():
    probabilities = {"normal": 0.1, "benign": 0.62, "malignant": 0.28}
    screen = render_screen(view("benign", probabilities, threshold=0.35), None, SIZE)
    tracks = screen_layout(SIZE, 2, 3).tracks
    for track, (name, p) in zip(tracks, probabilities.items(), strict=True):
        row = screen[track.y + track.h // 2, track.x : track.x + track.w]
        colour = POSITIVE_FILL if name == "malignant" else FILL
        filled = runs(row, colour)
        assert filled[0] == pytest.approx(p * track.w, abs=1), (name, filled)
        assert sum(runs(row, TRACK)) + sum(filled) >= track.w - 2  # the rest is the empty track
    malignant = tracks[2]
    tick = malignant.x + round(0.35 * malignant.w)
    column = screen[malignant.y - 2 : malignant.y + malignant.h + 2, tick - 1]
    assert np.all(column == TICK)  # above, across and below the bar
    others = [screen[t.y + t.h // 2, t.x + round(0.35 * t.w) - 1] for t in tracks[:2]]
    assert not any(np.all(pixel == TICK) for pixel in others)  # only the positive class has one


def test_the_frame_is_fitted_with_the_region_outlined_and_dimmed_without_a_decision():
    image = np.full((200, 300), 128, np.uint8)
    region = {"x": 30, "y": 40, "w": 120, "h": 100}
    screen = render_screen(view(region=region), image, SIZE)
    box = screen_layout(SIZE, 2, 3).frame
    x, y, scale = fit(image.shape, box)
    left, top = x + round(30 * scale), y + round(40 * scale)
    right, bottom = x + round(150 * scale) - 1, y + round(140 * scale) - 1
    middle_x, middle_y = (left + right) // 2, (top + bottom) // 2
    for point in ((left, middle_y), (right, middle_y), (middle_x, top), (middle_x, bottom)):
        assert (screen[point[1], point[0]] == REGION).all(), point
    assert (screen[middle_y, middle_x] == 128).all()  # inside: the frame itself
    assert (screen[y + 2, x + 2] == 128).all()  # the frame's corner, scaled into its box
    withdrawn = render_screen(view(label=None, reason="no decision: frozen feed"), image, SIZE)
    assert (withdrawn[middle_y, middle_x] == int(128 * 0.35)).all()
    tracks = screen_layout(SIZE, 2, 3).tracks
    assert not np.any(np.all(withdrawn[tracks[0].y + 2] == TRACK, axis=-1))  # no bars
    decision = screen_layout(SIZE, 2, 0).decision
    words = withdrawn[decision.y : decision.y + decision.h, decision.x : decision.x + decision.w]
    assert np.count_nonzero(np.all(words == WARNING, axis=-1)) > 100  # "no decision" in amber


def test_the_positive_decision_is_in_its_colour_and_sixteen_bit_frames_are_shown():
    image = np.full((120, 160), 200 << 8, np.uint16)
    screen = render_screen(view("malignant", {"normal": 0.1, "benign": 0.2, "malignant": 0.7}),
                           image, SIZE)  # fmt: skip
    decision = screen_layout(SIZE, 2, 3).decision
    words = screen[decision.y : decision.y + decision.h, decision.x : decision.x + decision.w]
    assert np.count_nonzero(np.all(words == POSITIVE_FILL, axis=-1)) > 100
    x, y, _ = fit(image.shape, screen_layout(SIZE, 2, 3).frame)
    assert (screen[y + 3, x + 3] == 200).all()


@pytest.fixture
def pygame_dummy(monkeypatch):
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")
    monkeypatch.setenv("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    return pytest.importorskip("pygame", reason="the local display needs the [display] extra")


def test_the_window_shows_exactly_the_rendered_screen(pygame_dummy):
    from edgebc.serve.display import Window

    window = Window(fullscreen=False, size=(640, 400))
    try:
        assert window.size == (640, 400)
        screen = render_screen(view(region={"x": 1, "y": 1, "w": 50, "h": 40}),
                               np.random.default_rng(0).integers(0, 255, (90, 120, 3), np.uint8),
                               window.size)  # fmt: skip
        window.show(screen)
        shown = pygame_dummy.surfarray.array3d(pygame_dummy.display.get_surface())
        assert np.array_equal(shown.transpose(1, 0, 2)[:, :, ::-1], screen)  # RGB, x-major
        with pytest.raises(ValueError, match="for a 640x400 window"):
            window.show(screen[:10])
        assert window.close_requested() is False
    finally:
        window.close()


def test_the_display_sink_follows_the_service_and_withdraws_with_it(pygame_dummy, tmp_path):
    pytest.importorskip("fastapi", reason="needs the [serve] extra")
    from fastapi.testclient import TestClient

    from edgebc.serve.app import create_app
    from edgebc.serve.runtime import build_runtime
    from tests.test_serve import settings_for, wait_until

    runtime = build_runtime(settings_for(tmp_path, display={"enabled": True, "fullscreen": False,
                                                            "size": [640, 400]}))  # fmt: skip
    assert runtime.display in runtime.pipeline.sinks
    with TestClient(create_app(runtime)) as client:
        display = runtime.display
        wait_until(lambda: client.get("/v1/status").json()["display"]["label"], what="a decision")
        shown = display.frames_shown
        wait_until(lambda: display.frames_shown > shown + 5, what="the window to follow")
        surface = pygame_dummy.surfarray.array3d(pygame_dummy.display.get_surface())
        assert tuple(surface[2, 1][::-1]) == BANNER_COLOURS[0]  # the research band, on screen
        assert (
            tuple(surface[2, screen_layout((640, 400), 2, 3).banners[1].y + 1][::-1])
            == BANNER_COLOURS[1]
        )
        assert "display" in client.get("/v1/status").json()["per_frame"]["timings_ms"]
    assert not display.alive  # the service stopped: the window is closed


def test_a_missing_pygame_fails_at_start_up_with_its_install_command(tmp_path, monkeypatch):
    from edgebc.errors import MissingDependencyError
    from edgebc.serve.runtime import build_runtime
    from tests.test_serve import settings_for

    monkeypatch.setitem(sys.modules, "pygame", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'edgebc\[display\]'"):
        build_runtime(settings_for(tmp_path, display={"enabled": True}))
    assert not (tmp_path / "audit.sqlite").exists()  # refused before anything was opened


def test_display_is_off_by_default_and_a_flag_turns_it_on():
    from edgebc.cli import build_parser
    from edgebc.commands.serve import settings_from_args
    from edgebc.serve.settings import ServeSettings

    assert ServeSettings().display.enabled is False
    args = build_parser().parse_args(["serve", "--display"])
    settings = settings_from_args(args)
    assert settings.display.enabled and settings.display.fullscreen


@pytest.mark.parametrize("driver", ["fallback", "x11"])
def test_a_cart_without_a_screen_fails_to_start_with_one_line_and_closes_what_it_opened(
    tmp_path, monkeypatch, driver
):
    """Without a screen SDL either fails (x11 without an X server) or falls back to a driver that
    draws nowhere: both are refused in build_runtime, before the server starts, and the audit
    trail and the model it opened are closed again."""
    pytest.importorskip("pygame", reason="the local display needs the [display] extra")
    from edgebc.errors import EdgebcError
    from edgebc.serve import runtime as runtime_module
    from tests.test_serve import settings_for

    closed = []

    class Trail(runtime_module.AuditTrail):
        def close(self, timeout=5.0):
            closed.append("audit trail")
            super().close(timeout)

    build_classifier = runtime_module.build_classifier

    def classifier_of(settings):
        classifier = build_classifier(settings)
        close = classifier.backend.close
        classifier.backend.close = lambda: closed.append("model") or close()
        return classifier

    monkeypatch.setattr(runtime_module, "AuditTrail", Trail)
    monkeypatch.setattr(runtime_module, "build_classifier", classifier_of)
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    if driver == "fallback":  # what SDL picks where it finds no screen (offscreen, as here)
        monkeypatch.delenv("SDL_VIDEODRIVER", raising=False)
        monkeypatch.setattr("pygame.display.get_driver", lambda: "offscreen")
    else:
        monkeypatch.setenv("SDL_VIDEODRIVER", driver)
    with pytest.raises(EdgebcError, match="the local display cannot open a window") as error:
        runtime_module.build_runtime(settings_for(tmp_path, display={"enabled": True}))
    assert "SDL_VIDEODRIVER=kmsdrm" in str(error.value) and "\n" not in str(error.value)
    assert sorted(closed) == ["audit trail", "model"]


def test_serve_with_a_display_on_a_headless_machine_exits_with_one_line(tmp_path):
    pytest.importorskip("pygame", reason="the local display needs the [display] extra")
    pytest.importorskip("uvicorn", reason="needs the [serve] extra")
    import os
    import socket
    import subprocess

    env = {k: v for k, v in os.environ.items()
           if k not in ("DISPLAY", "WAYLAND_DISPLAY", "SDL_VIDEODRIVER")}  # fmt: skip
    with socket.socket() as probe:  # a free port: the service must fail before it would listen
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    done = subprocess.run(
        [sys.executable, "-m", "edgebc", "serve", "--display", "--port", str(port),
         "--audit-log", str(tmp_path / "audit.sqlite")],
        capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path,
    )  # fmt: skip
    errors = [line for line in done.stderr.splitlines() if line.startswith("edgebc: error:")]
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert len(errors) == 1 and "the local display cannot open a window" in errors[0], done.stderr
    assert "SDL_VIDEODRIVER=kmsdrm" in errors[0] and "turn the display off" in errors[0]


def decided_pixels(screen, size, colour):
    """How many pixels of the decision's box are in `colour` (the label's type)."""
    box = screen_layout(size, 2, 3).decision
    words = screen[box.y : box.y + box.h, box.x : box.x + box.w]
    return int(np.count_nonzero(np.all(words == colour, axis=-1)))


def test_each_redraw_takes_frame_region_and_decision_from_one_result(pygame_dummy, tmp_path,
                                                                     monkeypatch):  # fmt: skip
    """Results alternate between a dark frame decided malignant with its region on the left and a
    bright one decided benign with its region on the right, one new result per look: whatever
    the display draws, its frame, outline and label belong together."""
    import time

    from edgebc.classifier import Decision
    from edgebc.live import FeedState
    from edgebc.quality import QualityResult
    from edgebc.region import Region
    from edgebc.serve.display import TEXT, Window
    from edgebc.serve.live_loop import LiveResult
    from edgebc.serve.runtime import build_runtime
    from edgebc.smoothing import Smoothed
    from edgebc.sources import Frame
    from tests.test_serve import settings_for

    size = (640, 400)
    runtime = build_runtime(settings_for(tmp_path, display={"enabled": True, "fullscreen": False,
                                                            "size": list(size)}))  # fmt: skip
    kinds = {60: ("malignant", Region(4, 4, 40, 80)), 180: ("benign", Region(110, 4, 40, 80))}
    looks = iter(range(10**6))

    def alternating():
        grey = (60, 180)[next(looks) % 2]
        label, region = kinds[grey]
        p = {"normal": 0.1, "benign": 0.6, "malignant": 0.3} if label == "benign" else \
            {"normal": 0.1, "benign": 0.2, "malignant": 0.7}  # fmt: skip
        frame = Frame(np.full((90, 160), grey, np.uint8), grey, time.time(), time.monotonic(), "t")
        decision = Decision(label, p, p["malignant"], 0.3, QualityResult(True), "ab" * 32)
        return LiveResult(grey, frame, decision, Smoothed(label, p), "0" * 64, {}, time.monotonic(),
                          region)  # fmt: skip

    shown = []
    show = Window.show
    monkeypatch.setattr(
        Window, "show", lambda self, screen: shown.append(screen) or show(self, screen)
    )
    pipeline = runtime.pipeline
    monkeypatch.setattr(pipeline, "latest", alternating)
    monkeypatch.setattr(pipeline.reader, "state", lambda: FeedState("ok", "", 1, 0, 0, 0.0))
    runtime.start()
    try:
        wait = time.monotonic() + 10
        while len(shown) < 12 and time.monotonic() < wait:
            runtime.display.handle(None)
            time.sleep(0.02)
    finally:
        runtime.stop()
    box = screen_layout(size, 2, 3).frame
    x, y, scale = fit((90, 160), box)
    checked = 0
    for screen in shown[2:]:  # the first ones may predate the alternating results
        grey = int(screen[y + round(45 * scale), x + round(80 * scale), 0])
        if grey not in kinds:
            continue
        label, region = kinds[grey]
        outline = screen[y + round((region.y + 40) * scale), x + round(region.x * scale)]
        assert (outline == REGION).all(), grey  # the outline of this frame's own region
        malignant = decided_pixels(screen, size, POSITIVE_FILL)
        assert (malignant > 50) if label == "malignant" else (malignant == 0), (grey, malignant)
        assert (decided_pixels(screen, size, TEXT) == 0) == (label == "malignant"), grey
        checked += 1
    assert checked >= 8


@pytest.mark.parametrize("how", ["closed", "failed"])
def test_a_display_that_stops_turns_readiness_false(pygame_dummy, tmp_path, monkeypatch, how):
    pytest.importorskip("fastapi", reason="needs the [serve] extra")
    from fastapi.testclient import TestClient

    from edgebc.serve import display as display_module
    from edgebc.serve.app import create_app
    from edgebc.serve.runtime import build_runtime
    from tests.test_serve import settings_for, wait_until

    runtime = build_runtime(settings_for(tmp_path, display={"enabled": True, "fullscreen": False,
                                                            "size": [640, 400]}))  # fmt: skip
    with TestClient(create_app(runtime)) as client:
        wait_until(lambda: client.get("/readyz").status_code == 200, what="ready")
        checks = client.get("/readyz").json()["checks"]
        assert set(checks) == {"model", "source", "audit_log", "display"}
        assert checks["display"] == {"ok": True, "detail": "showing the screen at 640x400"}
        if how == "closed":  # the window manager's close button, or a stray key on a kiosk
            monkeypatch.setattr(display_module.Window, "close_requested", lambda self: True)
        else:
            monkeypatch.setattr(display_module, "render_screen", lambda *a: 1 / 0)
        ready = wait_until(lambda: (r := client.get("/readyz")).status_code == 503 and r,
                           what="readiness to fall")  # fmt: skip
        display = ready.json()["checks"]["display"]
        assert not display["ok"] and display["detail"].startswith("the local display stopped: ")
        assert ("window was closed" if how == "closed" else "division by zero") in display["detail"]
        assert all(c["ok"] for name, c in ready.json()["checks"].items() if name != "display")
        assert runtime.status_line().endswith("; not ready: display")
        assert client.get("/healthz").status_code == 200  # serving goes on without it


@pytest.mark.parametrize("mode", ["frozen", "stalled"])
def test_a_frozen_or_stalled_feed_withdraws_the_decision_on_the_local_screen(
    pygame_dummy, tmp_path, monkeypatch, mode
):
    """Not only the page: the cart's own screen drops the label and the bars and says why."""
    pytest.importorskip("fastapi", reason="needs the [serve] extra")
    from fastapi.testclient import TestClient

    from edgebc.serve import display as display_module
    from edgebc.serve.app import create_app
    from edgebc.serve.display import TEXT
    from edgebc.serve.runtime import build_runtime
    from tests.test_serve import SwitchableSource, settings_for, wait_until

    drawn = []
    render = display_module.render_screen
    monkeypatch.setattr(display_module, "render_screen",
                        lambda view, image, size: drawn.append((view, render(view, image, size)))
                        or drawn[-1][1])  # fmt: skip
    size = (640, 400)
    source = SwitchableSource()
    runtime = build_runtime(settings_for(tmp_path, display={"enabled": True, "fullscreen": False,
                                                            "size": list(size)}),
                            source_factory=lambda: source)  # fmt: skip
    try:
        with TestClient(create_app(runtime)):
            wait_until(lambda: drawn and drawn[-1][0]["display"]["label"], what="a decision shown")
            _, decided = drawn[-1]
            assert (
                decided_pixels(decided, size, TEXT) + decided_pixels(decided, size, POSITIVE_FILL)
                > 50
            )
            source.mode = mode
            reason = f"no decision: {mode} feed"
            wait_until(lambda: (drawn[-1][0]["display"]["reason"] or "").startswith(reason),
                       timeout=5.0, what=f"the {mode} feed withdrawn on the screen")  # fmt: skip
            view, screen = drawn[-1]
            source.mode = "live"
    finally:
        source.mode = "live"
    assert view["display"]["label"] is None and view["display"]["probabilities"] is None
    layout = screen_layout(size, 2, 0)
    assert decided_pixels(screen, size, WARNING) > 50  # "no decision" in amber, where the label was
    assert decided_pixels(screen, size, TEXT) == decided_pixels(screen, size, POSITIVE_FILL) == 0
    reason_box = screen[layout.reason.y : layout.reason.y + layout.reason.h,
                        layout.reason.x : layout.reason.x + layout.reason.w]  # fmt: skip
    assert np.count_nonzero(np.all(reason_box == WARNING, axis=-1)) > 50  # the reason, in words
    for track in screen_layout(size, 2, 3).tracks:  # where the bars were: no bar, no fill
        row = screen[track.y + track.h // 2, track.x : track.x + track.w]
        assert max([0, *runs(row, TRACK), *runs(row, FILL), *runs(row, POSITIVE_FILL)]) < 8


def test_the_stated_bound_is_shown_beside_a_decision_and_not_without_one():
    bound = "sensitivity ≥ 0.85 at 95 % confidence, 40 malignant patients"
    layout = screen_layout(SIZE, 2, 3)
    line_h = max(16, layout.status.h // 6)
    fourth = Box(layout.status.x, layout.status.y + 3 * line_h, layout.status.w, line_h)

    def ink(v):
        screen = render_screen(v, None, SIZE)
        patch = screen[fourth.y : fourth.y + fourth.h, fourth.x : fourth.x + fourth.w]
        return int(np.any(patch != BACKGROUND, axis=-1).sum())

    with_bound = view()
    with_bound["model"]["sensitivity_bound"] = bound
    assert ink(with_bound) > 50  # four status lines: the bound first
    assert ink(view()) == 0  # three lines: nothing in the fourth
    withdrawn = view(label=None, reason="no decision: frozen feed")
    withdrawn["model"]["sensitivity_bound"] = bound
    assert ink(withdrawn) == 0  # no decision, no claim about it
