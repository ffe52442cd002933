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
