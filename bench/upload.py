"""Uploading a large dataset archive: builds an archive of N GiB of real-looking PNGs with a
metadata CSV, starts `synthderm run` (the embedded default) in a temporary folder, uploads the
archive with the client and follows the ingest job, sampling the API's and the worker's RSS.

    python -m bench.upload --gib 2

Prints the archive size, upload and ingest seconds, MB/s, and the peak RSS of each process
(the archive must never be held in memory: peak RSS should stay far below its size).
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def build_archive(path: Path, *, gib: float, side: int) -> int:
    """A tar of noise PNGs (incompressible, so the bytes are real) plus metadata.csv."""
    target = int(gib * 2**30)
    rng = np.random.default_rng(0)
    rows = []
    written = 0
    with tarfile.open(path, "w") as archive:
        index = 0
        while written < target:
            pixels = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG", compress_level=0)
            data = buffer.getvalue()
            info = tarfile.TarInfo(f"images/{index:07d}.png")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
            rows.append([f"images/{index:07d}.png", "psoriasis", 1 + index % 6])
            written += len(data)
            index += 1
        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow(["file", "label", "fitzpatrick"])
        writer.writerows(rows)
        data = text.getvalue().encode()
        info = tarfile.TarInfo("metadata.csv")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    return len(rows)


class PeakRss(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peaks: dict[str, int] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        root = psutil.Process(self.pid)
        while not self.stop.wait(0.05):
            try:
                for child in root.children(recursive=True):
                    command = " ".join(child.cmdline())
                    name = (
                        "worker" if "celery" in command else "api" if "uvicorn" in command else ""
                    )
                    if name:  # not the one-off tiny-model build
                        self.peaks[name] = max(self.peaks.get(name, 0), child.memory_info().rss)
            except psutil.Error:
                continue


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--side", type=int, default=512, help="image side (px)")
    parser.add_argument("--port", type=int, default=0, help="default: a free port")
    args = parser.parse_args()

    if not args.port:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            args.port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="synthderm-bench-") as tmp:
        folder = Path(tmp)
        archive = folder / "big.tar"
        started = time.perf_counter()
        rows = build_archive(archive, gib=args.gib, side=args.side)
        size = archive.stat().st_size
        print(f"archive: {size / 2**30:.2f} GiB, {rows} images, built in "
              f"{time.perf_counter() - started:.0f}s")  # fmt: skip

        env = {k: v for k, v in os.environ.items() if not k.startswith("SYNTHDERM_")}
        env |= {
            "SYNTHDERM_DATA_DIR": str(folder / "var"),
            "SYNTHDERM_API_PORT": str(args.port),
            "SYNTHDERM_PUBLIC_BASE_URL": f"http://127.0.0.1:{args.port}",
        }
        server = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "run"], cwd=ROOT, env=env,
            stdout=(folder / "run.log").open("wb"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        monitor = PeakRss(server.pid)
        monitor.start()
        try:
            base = f"http://127.0.0.1:{args.port}"
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            key = subprocess.run(
                [sys.executable, "-m", "app.cli", "keys", "create", "--name", "bench"],
                cwd=ROOT, env=env, capture_output=True, text=True, check=True,
            ).stdout.strip()  # fmt: skip
            from app.cli.client import Client

            client = Client(url=base, key=key, timeout=600)
            started = time.perf_counter()
            job = client.upload_dataset(archive, form={"name": "big"})
            uploaded = time.perf_counter() - started
            final = client.wait_job(job["id"], interval=1.0)
            ingested = time.perf_counter() - started - uploaded
        finally:
            monitor.stop.set()
            server.send_signal(signal.SIGINT)
            server.wait(timeout=120)
        mb = size / 2**20
        print(f"upload: {uploaded:.1f}s ({mb / uploaded:.0f} MB/s); ingest: {ingested:.1f}s "
              f"({mb / ingested:.0f} MB/s); status {final['status']}, "
              f"{(final.get('result') or {}).get('accepted')} images accepted")  # fmt: skip
        for name, peak in sorted(monitor.peaks.items()):
            print(f"peak RSS {name}: {peak / 2**20:.0f} MB ({peak / size:.1%} of the archive)")


if __name__ == "__main__":
    main()
