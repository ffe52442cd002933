"""`edgebc region`: find the scanner's imaging region on a frame from the real source, once, at setup."""

from __future__ import annotations

import argparse
from pathlib import Path

from edgebc.commands import HelpFormatter


def register_region(commands: argparse._SubParsersAction) -> None:
    region = commands.add_parser(
        "region",
        help="detect the imaging region on a frame from a source and print it for the config",
        description="Read one frame from SOURCE (a capture card such as /dev/edgebc-capture, a "
        "screenshot, a video), propose the imaging region (the ultrasound image without the "
        "scanner's menus and text), print it as the `region:` line for the settings file, and "
        "write a picture with the region drawn on the frame to check by eye before fixing it. "
        "Exit status 1 when no region qualifies (a blank or menu-only screen).",
        formatter_class=HelpFormatter,
    )
    region.add_argument(
        "source", help="/dev/edgebc-capture, /dev/video0, screen.png, clip.mp4, ..."
    )
    region.add_argument(
        "--out", type=Path, default=Path("region.png"), help="picture of the frame with the region"
    )
    region.add_argument(
        "--skip", type=int, default=10, help="frames to drop first (capture cards settle)"
    )
    region.set_defaults(handler=run_region)


def run_region(args: argparse.Namespace) -> int:
    import cv2

    from edgebc.atomic import atomic_write_bytes
    from edgebc.errors import EdgebcError
    from edgebc.region import detect_imaging_region
    from edgebc.sources import open_source

    source = open_source(args.source)
    source.open()
    try:
        frame = None
        for _ in range(max(0, args.skip) + 1):
            frame = source.read() or frame
            if frame is None:
                break
    finally:
        source.close()
    if frame is None:
        raise EdgebcError(f"{args.source}: delivered no frame")
    image = frame.image if frame.image.dtype == "uint8" else (frame.image >> 8).astype("uint8")
    found = detect_imaging_region(image)
    height, width = image.shape[:2]
    picture = image.copy() if image.ndim == 3 else cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if found is not None:
        cv2.rectangle(picture, (found.x, found.y), (found.x + found.w - 1, found.y + found.h - 1),
                      (0, 200, 255), max(2, width // 400))  # fmt: skip
    ok, encoded = cv2.imencode(args.out.suffix or ".png", picture)
    if ok:
        atomic_write_bytes(args.out, encoded.tobytes())
    if found is None:
        print(f"no imaging region found on the {width}x{height} frame (blank or menu-only screen?); "
              f"look at {args.out}")  # fmt: skip
        return 1
    share = found.area / float(width * height)
    print(f"region: [{found.x}, {found.y}, {found.w}, {found.h}]   # x, y, w, h on the {width}x{height} "
          f"frame ({share:.0%} of it); drawn on {args.out}")  # fmt: skip
    print("check the picture, then put the line in the settings file with auto_region: false")
    return 0
