"""Uploads under overload: accepted p99 against the unloaded p99, refusals, and the live frame rate.

    python benchmarks/overload.py [--quick] [--seconds 10] [--rounds 3] [--size 256] [--out DIR]
    python benchmarks/overload.py --soak 120      # resident memory under upload load

Starts a real `edgebc serve` on the embedded demo (phantom model, phantom tour at 30 fps), checks
that an upload is answered with a decision, then loads POST /v1/classify with closed-loop clients
(benchmarks/loadgen.py): 1 client (unloaded), and 4x and 16x the server's capacity (it works on
one upload at a time beside the live loop, so 4 and 16 clients), levels interleaved round by round
so that the machine's drift falls on all alike. A refused client tries again after 20 ms
(--refusal-pause; one that honoured Retry-After would hide the overload).
Per level: accepted p50/p99 and accepted p99 / unloaded p99 (the ratio is what compares across
machines), the share of 503s, and the live loop's frame rate while it lasted (frames classified,
from /v1/status). With --soak S: S seconds at 16x, the server's RSS (VmRSS) sampled every 5 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # loadgen.py beside this script
from loadgen import Load, Server, closed_loop

from edgebc.synth import make_ultrasound_phantom
from edgebc.synth.ultrasound import phantom_rng

CAPACITY = 1  # uploads the server works on at once (edgebc.serve.runtime.UploadQueue)


def cpu_model() -> str:
    """The machine's CPU as lscpu names it (under a hypervisor too)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    model = fields.get("Model name", "unknown CPU").strip()
    cpus = fields.get("CPU(s)", "?").strip()
    hypervisor = fields.get("Hypervisor vendor", "").strip()
    return f"{model}, {cpus} CPUs" + (f", under {hypervisor}" if hypervisor else "")


def upload_image(size: int) -> bytes:
    ok, encoded = cv2.imencode(".png", make_ultrasound_phantom("malignant", phantom_rng(3, 0), size, size).image)  # fmt: skip
    if not ok:
        raise RuntimeError("could not encode the phantom as PNG")
    return encoded.tobytes()


def check_answer(server: Server, body: bytes) -> None:
    """An upload is answered with a decision before anything is timed."""
    request = urllib.request.Request(server.url + "/v1/classify", data=body,
                                     headers={"Content-Type": "image/png"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=30) as answer:
        result = json.loads(answer.read())
    probabilities = result["probabilities"]
    if result["label"] not in probabilities or abs(sum(probabilities.values()) - 1.0) > 1e-4:
        raise RuntimeError(f"the upload's answer is not a decision: {result}")


def frames(server: Server) -> int:
    return int(server.status()["counts"]["frames"])


def percentile_ms(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000.0, q)) if values else float("nan")


def run_levels(server: Server, body: bytes, levels: list[int], rounds: int, seconds: float,
               pause: float) -> dict:  # fmt: skip
    """Every level `rounds` times, interleaved; answers and live frames summed per level."""
    merged: dict[int, dict] = {n: {"answers": [], "errors": 0, "seconds": 0.0, "frames": 0}
                               for n in levels}  # fmt: skip
    for _ in range(rounds):
        for clients in levels:
            before = frames(server)
            load: Load = asyncio.run(closed_loop("127.0.0.1", server.port, body, clients, seconds,
                                                 pause))  # fmt: skip
            level = merged[clients]
            level["frames"] += frames(server) - before
            level["answers"] += load.answers
            level["errors"] += load.errors
            level["seconds"] += load.seconds
    return merged


def summarise(merged: dict) -> list[dict]:
    base = None
    rows = []
    for clients, level in merged.items():
        accepted = [a.seconds for a in level["answers"] if a.status == 200]
        refused = [a for a in level["answers"] if a.status == 503]
        other = len(level["answers"]) - len(accepted) - len(refused)
        p99 = percentile_ms(accepted, 99)
        base = p99 if base is None else base
        rows.append({
            "clients": clients, "overload": clients / CAPACITY, "answers": len(level["answers"]),
            "accepted": len(accepted), "accepted_p50_ms": percentile_ms(accepted, 50),
            "accepted_p99_ms": p99, "p99_ratio": p99 / base,
            "refused_share": len(refused) / max(1, len(level["answers"])),
            "retry_after": sorted({a.retry_after for a in refused if a.retry_after}),
            "other_statuses": other, "errors": level["errors"],
            "live_fps": level["frames"] / level["seconds"],
        })  # fmt: skip
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| clients (x capacity) | answers | accepted p50 ms | accepted p99 ms | "
             "p99 / unloaded p99 | 503 share | live fps |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['clients']} ({r['overload']:g}x) | {r['answers']} | "
                     f"{r['accepted_p50_ms']:.1f} | {r['accepted_p99_ms']:.1f} | "
                     f"{r['p99_ratio']:.2f} | {r['refused_share']:.0%} | {r['live_fps']:.1f} |")  # fmt: skip
    return "\n".join(lines)


def soak(server: Server, body: bytes, seconds: float, clients: int,
         pause: float) -> list[tuple[float, float]]:  # fmt: skip
    """RSS (MB) every 5 s while `clients` clients load the server for `seconds`."""
    samples: list[tuple[float, float]] = []

    async def sampled() -> Load:
        started = time.perf_counter()
        load = asyncio.ensure_future(closed_loop("127.0.0.1", server.port, body, clients,
                                                 seconds, pause))  # fmt: skip
        while not load.done():
            samples.append((time.perf_counter() - started, server.rss_kb() / 1024))
            await asyncio.sleep(5.0)
        return await load

    load = asyncio.run(sampled())
    samples.append((seconds, server.rss_kb() / 1024))
    accepted = sum(a.status == 200 for a in load.answers)
    print(f"soak: {len(load.answers)} answers ({accepted} classified), {load.errors} errors")
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    parser.add_argument(
        "--quick", action="store_true", help="one round of 3 s per level (smoke test)"
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per level and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of interleaved levels")
    parser.add_argument("--size", type=int, default=256, help="the uploaded phantom's side, pixels")
    parser.add_argument("--soak", type=float, default=None, metavar="SECONDS",
                        help="instead: load at 16x for SECONDS and sample the server's RSS")  # fmt: skip
    parser.add_argument("--refusal-pause", type=float, default=0.02, metavar="SECONDS",
                        help="how long a refused client waits before trying again")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="write overload.json here")
    args = parser.parse_args(argv)
    seconds, rounds = (3.0, 1) if args.quick else (args.seconds, args.rounds)
    body = upload_image(args.size)
    print(f"edgebc serve (demo) on {cpu_model()}; upload {len(body)} bytes ({args.size} px PNG)")
    with tempfile.TemporaryDirectory(prefix="edgebc-overload-") as folder, Server(Path(folder)) as server:  # fmt: skip
        server.wait_ready()
        for _ in range(5):  # warm up, and the answer checked before anything is timed
            check_answer(server, body)
        if args.soak is not None:
            samples = soak(server, body, args.soak, 16 * CAPACITY, args.refusal_pause)
            for at, rss in samples:
                print(f"  {at:6.1f} s  RSS {rss:7.1f} MB")
            half = [rss for at, rss in samples if at >= args.soak / 2]
            print(f"RSS first {samples[0][1]:.1f} MB, peak {max(r for _, r in samples):.1f} MB, "
                  f"over the second half {min(half):.1f}..{max(half):.1f} MB")  # fmt: skip
            result: dict = {"soak_s": args.soak, "rss_mb": samples}
        else:
            rows = summarise(run_levels(server, body, [1, 4 * CAPACITY, 16 * CAPACITY], rounds, seconds,
                                         args.refusal_pause))  # fmt: skip
            print(markdown(rows))
            bad = [r for r in rows if r["other_statuses"] or r["errors"]]
            if bad:
                print(f"unexpected answers or connection errors: {bad}", file=sys.stderr)
            result = {"rows": rows}
        code = server.stop()
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "overload.json").write_text(
            json.dumps({"cpu": cpu_model(), **result}, indent=2)
        )
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
