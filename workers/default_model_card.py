"""`make default-model-card`: remake the evaluation of the project's own generator (issue 24)
through the service's own code paths, and write its model card (workers/model_card.py).

    python -m workers.default_model_card [--model DIR] [--out DIR] [--work DIR]
        [--per-cell N] [--conditions SLUG ...] [--real-per-split N] [--seed S]

It starts an embedded service of its own (SQLite, a temporary data folder, a free port) whose
models folder links `synthderm-fitz64` and `synthderm-fitz64-inpaint` to MODEL's pipelines,
uploads the Fitzpatrick17k photos (and a 64-px copy, as the generator sees them), generates
with the REST API, runs four evaluations, and stops the service at the end, also on error.
Figures showing patients' photos (an evaluation's contact sheet and closest pairs) stay in
WORK; the card folder gets none.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.cli.client import TERMINAL, Client
from app.schemas.jobs import DEFAULT_GUIDANCE_SCALE
from workers import model_card
from workers.default_model import DEFAULT_DATA, DEFAULT_OUT, ROOT

log = logging.getLogger("default_model_card")
DEFAULT_WORK = ROOT / "var" / "model-card"
MODEL = "synthderm-fitz64"
BASELINE = "tiny-random"
COMMONEST = 9  # issue 24's utility target: the 9 commonest conditions (chance 1/9)
SKIN_TONES = range(1, 7)
STEPS = 25  # half the jobs' default 50 (app/schemas/jobs.py): 2,016 images on two CPU cores
BATCH = 16  # images per UNet call in the card's service: one call per (condition, type) cell
RESOLUTION = 64


@dataclass(frozen=True)
class Photo:
    row: dict[str, str]  # its metadata.csv row
    skin_tone: int | None

    @property
    def label(self) -> str:
        return self.row["label"]


def _tone(row: dict[str, str]) -> int | None:
    for column in ("fitzpatrick_scale", "fitzpatrick_centaur"):  # as the upload reads it
        value = (row.get(column) or "").strip()
        if value.lstrip("-").isdigit() and 1 <= int(value) <= 6:
            return int(value)
    return None


def read_photos(data: Path, conditions: Sequence[str], per_split: int) -> list[Photo]:
    """The train and test photos of the conditions (the first `per_split` of each condition
    and split by path when set), sorted by path."""
    with (data / "metadata.csv").open(newline="") as handle:
        rows = sorted(csv.DictReader(handle), key=lambda r: r["path"])
    seen: Counter[tuple[str, str]] = Counter()
    photos = []
    for row in rows:
        key = (row["label"], row["split"])
        if row["label"] in conditions and row["split"] in ("train", "test"):
            seen[key] += 1
            if not per_split or seen[key] <= per_split:
                photos.append(Photo(row, _tone(row)))
    return photos


def commonest(data: Path, conditions: Sequence[str], n: int) -> list[str]:
    """The n conditions with the most training photos (ties by name)."""
    with (data / "metadata.csv").open(newline="") as handle:
        counts = Counter(r["label"] for r in csv.DictReader(handle) if r["split"] == "train")
    return sorted(conditions, key=lambda c: (-counts[c], c))[:n]


def cell_seed(seed: int, condition: str, skin_tone: int) -> int:
    """A fixed seed per (condition, type), whatever else is generated."""
    return int(hashlib.sha256(f"{seed}:{condition}:{skin_tone}".encode()).hexdigest()[:12], 16)


# --- the service ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cli(env: dict[str, str], *args: str, log_to: Path) -> str:
    with log_to.open("ab") as err:
        done = subprocess.run([sys.executable, "-m", "app.cli", *args], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=err, check=True)  # fmt: skip
    return done.stdout.decode()


@contextlib.contextmanager
def embedded_service(model: Path, home: Path) -> Iterator[Client]:
    """`synthderm run` on a data folder of its own, serving MODEL beside the tiny models; a
    client with a fresh key. Stopped on exit (SIGTERM, then SIGKILL of its process group)."""
    models = home / "models"
    models.mkdir(parents=True)
    for name, part in ((MODEL, "text-to-image"), (f"{MODEL}-inpaint", "inpaint")):
        (models / name).symlink_to((model / part).resolve(), target_is_directory=True)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNTHDERM_")}
    env |= {"SYNTHDERM_DATA_DIR": str(home), "SYNTHDERM_MODELS_DIR": str(models),
            "SYNTHDERM_API_PORT": str(port), "SYNTHDERM_PUBLIC_BASE_URL": url,
            "SYNTHDERM_GENERATION_BATCH_SIZE": str(BATCH), "SYNTHDERM_SHUTDOWN_GRACE_S": "5",
            "PYTHONUNBUFFERED": "1"}  # fmt: skip
    logs = home / "service.log"
    _cli(env, "models", "build-tiny", str(models), log_to=logs)
    _cli(env, "db", "upgrade", log_to=logs)
    key = _cli(env, "keys", "create", "--name", "default-model-card", log_to=logs).strip()
    with logs.open("ab") as out:
        service = subprocess.Popen([sys.executable, "-m", "app.cli", "run", "--no-build-tiny"],
                                   env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
    try:
        client = Client(url=url, key=key, timeout=120.0)
        deadline = time.monotonic() + 120
        while True:
            if service.poll() is not None:
                raise RuntimeError(f"the service exited with {service.returncode}; see {logs}")
            with contextlib.suppress(Exception):
                client.get("/readyz")
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"the service did not answer in 120 s; see {logs}")
            time.sleep(0.5)
        log.info("service up at %s (data in %s)", url, home)
        yield client
    finally:
        if service.poll() is None:
            service.send_signal(signal.SIGTERM)  # the supervisor stops its children
            try:
                service.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(service.pid, signal.SIGKILL)
                service.wait()
        log.info("service stopped")


# --- data --------------------------------------------------------------------------------


def square_64(path: Path) -> Any:
    """A photo as the generator sees it: short side to 64 (bicubic, as the training's
    prepare_source), then the centre square."""
    from PIL import Image

    image = Image.open(path).convert("RGB")
    scale = RESOLUTION / min(image.size)
    size = (
        max(RESOLUTION, round(image.width * scale)),
        max(RESOLUTION, round(image.height * scale)),
    )
    image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (image.width - RESOLUTION) // 2, (image.height - RESOLUTION) // 2
    return image.crop((left, top, left + RESOLUTION, top + RESOLUTION))


def _wait(client: Client, job: dict[str, Any], what: str) -> dict[str, Any]:
    done = client.wait_job(job["id"], interval=1.0)
    if done["status"] != "succeeded":
        raise RuntimeError(f"{what}: job {job['id']} {done['status']}: {done.get('error')}")
    return done


def upload_real(client: Client, photos: list[Photo], data: Path, work: Path) -> dict[str, str]:
    """Two real datasets: the photos as they are (metadata.csv's rows, its format) and at
    64 px (a generic CSV); both keep the skin types and the train/test split."""
    work.mkdir(parents=True, exist_ok=True)
    full_csv, full_tar = work / "real.csv", work / "real.tar"
    with full_csv.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(photos[0].row))
        writer.writeheader()
        writer.writerows(p.row for p in photos)
    with tarfile.open(full_tar, "w") as tar:
        for p in photos:
            tar.add(data / p.row["path"], arcname=p.row["path"])
    small_csv, small_tar = work / "real-64px.csv", work / "real-64px.tar"
    small_dir = work / "real-64px"
    small_dir.mkdir(exist_ok=True)
    with small_csv.open("w", newline="") as handle, tarfile.open(small_tar, "w") as tar:
        rows = csv.writer(handle)
        rows.writerow(["file", "label", "fitzpatrick", "split"])
        for p in photos:
            name = f"{p.row['md5hash']}.png"
            square_64(data / p.row["path"]).save(small_dir / name)
            tar.add(small_dir / name, arcname=name)
            rows.writerow([name, p.label, p.skin_tone or "", p.row["split"]])
    ids = {}
    uploads = (("full", full_tar, full_csv, "fitz17k-real"),
               ("64px", small_tar, small_csv, "fitz17k-real-64px"))  # fmt: skip
    for kind, archive, metadata, name in uploads:
        # two training photos appear twice with two Fitzpatrick types: the upload leaves
        # those four rows out (the README says why), as a user uploading them would
        form: dict[str, str | None] = {"name": name, "on_error": "skip"}
        job = client.upload_dataset(archive, metadata=metadata, form=form)
        ids[kind] = _wait(client, job, f"upload {name}")["dataset_id"]
        log.info("uploaded %s: dataset %s", name, ids[kind])
    return ids


def generate(client: Client, *, model: str, conditions: Sequence[str], per_cell: int, seed: int,
             steps: int, name: str) -> dict[str, Any]:  # fmt: skip
    """per_cell text-to-image images of every (condition, type) into one synthetic dataset."""
    jobs: list[dict[str, Any]] = []
    dataset: str | None = None
    started = time.perf_counter()
    for condition in conditions:
        for skin_tone in SKIN_TONES:
            body = {"condition": condition, "skin_tone": skin_tone, "count": per_cell,
                    "model": model, "strategy": "text-to-image",
                    "seed": cell_seed(seed, condition, skin_tone), "num_inference_steps": steps,
                    "dataset_id": dataset,
                    "dataset_name": None if dataset else name}  # fmt: skip
            job = client.submit_job(body)
            dataset = job["dataset_id"]
            jobs.append(job)
    for job in jobs:
        _wait(client, job, f"generation with {model}")
    seconds = time.perf_counter() - started
    log.info("%s: %d images in %.0f s", model, per_cell * len(jobs), seconds)
    # each model samples at its own default guidance (its synthderm.json), else the service's
    own = {m["id"]: m["sampling_defaults"] or {} for m in client.get("/models")["items"]}
    guidance = own[model].get("guidance_scale", DEFAULT_GUIDANCE_SCALE)
    return {"dataset_id": dataset, "model": model, "conditions": list(conditions),
            "per_cell": per_cell, "images": per_cell * len(jobs), "steps": steps,
            "guidance_scale": guidance, "guidance_interval": own[model].get("guidance_interval"),
            "batch_size": BATCH, "seconds": round(seconds, 1),
            "seeds": {f"{j['condition']}/{j['skin_tone']}": j["seed"] for j in jobs}}  # fmt: skip


def evaluate(client: Client, *, name: str, body: dict[str, Any], work: Path) -> dict[str, Any]:
    """One evaluation, followed to its end; its report (`evaluations report`) into WORK/NAME."""
    started = time.perf_counter()
    state = client.post("/evaluations", body)
    while state["status"] not in TERMINAL:
        time.sleep(2.0)
        state = client.get(f"/evaluations/{state['id']}")
    if state["status"] != "succeeded":
        raise RuntimeError(f"evaluation {name} ({state['id']}) {state['status']}: {state['error']}")
    env = {**os.environ, "SYNTHDERM_API_URL": client.url, "SYNTHDERM_API_KEY": client.key or ""}
    report = subprocess.run([sys.executable, "-m", "app.cli", "evaluations", "report",
                             state["id"], "--out", str(work / name)], env=env, cwd=ROOT,
                            capture_output=True, text=True)  # fmt: skip
    if report.returncode:
        raise RuntimeError(f"evaluations report {state['id']}: {report.stderr[-2000:]}")
    seconds = time.perf_counter() - started
    log.info("evaluation %s (%s) done in %.0f s", name, state["id"], seconds)
    return {"id": state["id"], "request": body, "seconds": round(seconds, 1),
            "result": state["result"], "report": str(work / name)}  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, Any]:
    training = json.loads((args.model / "training.json").read_text())
    with (args.data / "metadata.csv").open(newline="") as handle:
        every = sorted({r["label"] for r in csv.DictReader(handle) if r["split"] == "train"})
    conditions = sorted(args.conditions) if args.conditions else every
    unknown = sorted(set(conditions) - set(every))
    if unknown:
        raise SystemExit(f"--conditions: not Fitzpatrick17k training labels: {unknown}")
    common = commonest(args.data, conditions, COMMONEST)
    photos = read_photos(args.data, conditions, args.real_per_split)
    args.work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="model-card-") as home, \
            embedded_service(args.model, Path(home) / "service") as client:  # fmt: skip
        timings["service_start_s"] = time.perf_counter() - clock
        real = upload_real(client, photos, args.data, Path(home) / "upload")
        timings["upload_s"] = time.perf_counter() - clock - sum(timings.values())
        made = generate(client, model=MODEL, conditions=conditions, per_cell=args.per_cell,
                        seed=args.seed, steps=args.steps, name=f"{MODEL}-card")  # fmt: skip
        baseline = generate(client, model=BASELINE, conditions=common, per_cell=args.per_cell,
                            seed=args.seed, steps=args.steps, name=f"{BASELINE}-card")  # fmt: skip
        synthetic = made["dataset_id"]

        def body(dataset: str, real_dataset: str, which: list[str]) -> dict[str, Any]:
            # the reference (fidelity, ITA, the real utility baseline, the audit) is the train
            # split: the service refuses a reference that is also the test split the utility
            # score is tested on, and the test split stays the held-out one
            return {"synthetic_dataset": dataset, "real_dataset": real_dataset,
                    "real_split": "train", "test_split": "test", "conditions": which,
                    "seed": args.seed}  # fmt: skip

        # fidelity against the held-out test photos too: its reference is the test split, so
        # its utility score is tested on the train split and is not reported
        held_out = {**body(synthetic, real["full"], common), "real_split": "test",
                    "test_split": "train"}  # fmt: skip
        evaluations = {}
        for name, request in (
            ("full-size", body(synthetic, real["full"], common)),
            ("vs-test", held_out),
            ("64px", body(synthetic, real["64px"], common)),
            ("privacy", body(synthetic, real["full"], conditions)),
            ("tiny-random", body(baseline["dataset_id"], real["full"], common)),
        ):
            evaluations[name] = evaluate(client, name=name, body=request, work=args.work)
        sheet = model_card.fetch_sheet_images(client, synthetic, args.work / "sheet")
    timings["total_s"] = time.perf_counter() - clock
    facts = {
        "model_dir": str(args.model), "training": training,
        "conditions": conditions, "commonest": common,
        "real": {"datasets": real, "photos": len(photos),
                 "by_split": dict(Counter(p.row["split"] for p in photos)),
                 "per_split_limit": args.real_per_split or None},
        "generation": {MODEL: made, BASELINE: baseline}, "evaluations": evaluations,
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "command": "python -m workers.default_model_card " + " ".join(args.argv),
    }  # fmt: skip
    model_card.write_card(facts, out=args.out, sheet=sheet)
    return facts


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_OUT,
                        help="Folder with text-to-image/, inpaint/ and training.json.")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="Default: --model.")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK,
                        help="The reports (they show patients' photos: never commit).")  # fmt: skip
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--per-cell", type=int, default=16, help="Images per condition x type.")
    parser.add_argument("--conditions", nargs="+", default=None, help="Default: all 21.")
    parser.add_argument("--real-per-split", type=int, default=0,
                        help="At most N photos per condition and split (0: all).")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=STEPS, help="Sampler steps per image.")
    parser.add_argument(
        "--rewrite",
        action="store_true",
        help="Only write MODEL_CARD.md again from card/results.json (after editing "
        "card/observations.md): nothing generated or evaluated.",
    )
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(raw)
    args.argv = raw
    args.out = args.out or args.model
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per poll otherwise
    # a SIGTERM (kill, a CI timeout) unwinds like an error: the embedded service is stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.rewrite:
        model_card.rewrite_card(out=args.out, model=args.model)
        log.info("card rewritten: %s", args.out / "MODEL_CARD.md")
        return
    facts = run(args)
    shutil.rmtree(args.work / "sheet", ignore_errors=True)
    log.info("card written to %s in %.0f s", args.out / "MODEL_CARD.md",
             facts["timings"]["total_s"])  # fmt: skip


if __name__ == "__main__":
    main()
