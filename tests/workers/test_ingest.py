"""Uploading real datasets: each CSV format as it is, every bad input refused with a report by
row and nothing kept (or the good rows kept with on_error=skip), through the API and a worker."""

from __future__ import annotations

import collections
import csv
import io
import json
import zipfile

import httpx
import pytest
from sqlalchemy import text

from app.datasets.ingest_csv import FITZPATRICK17K_COLUMNS
from tests.conftest import Stack, count_rows
from tests.factories import SHARED_DATA
from tests.helpers import csv_text, make_tar, make_zip, png, upload


def counts(client, dataset_id: str) -> dict[tuple[str, int | None], int]:
    body = client.get(f"/datasets/{dataset_id}").json()
    return {(c["condition"], c["skin_tone"]): c["count"] for c in body["counts"]}


def test_generic_zip_with_split_and_duplicates(stack: Stack) -> None:
    client = stack.client(stack.new_key())
    images = {f"img/{i}.png": png(i) for i in range(6)}
    images["img/dup.png"] = images["img/0.png"]  # the same bytes again
    rows = [
        ["img/0.png", "Basal cell carcinoma", 2, "train"],
        ["img/1.png", "Basal cell carcinoma", 2, "train"],
        ["img/2.png", "basal cell carcinoma", 5, "test"],
        ["3.png", "Psoriasis", "", "validation"],  # a base name is enough when unique
        ["img/4.png", "Granuloma_Annulare", 6, "train"],  # an identifier: a name in words
        ["img/5.png", "psoriasis", 1, "train"],
        ["img/dup.png", "basal cell carcinoma", 2, "test"],  # row 2's image, in another split
    ]
    images["metadata.csv"] = csv_text(["file", "label", "fitzpatrick", "split"], rows)
    job = upload(client, make_zip(images), name="clinic-a")
    done = stack.wait_job(client, job["id"])
    result = done["result"]
    assert result["accepted"] == 6
    assert result["duplicate_count"] == 1
    assert result["duplicates"] == [  # kept once, under the first row and in its split
        {"row": 8, "file": "img/dup.png", "duplicate_of_row": 2, "split": "test",
         "kept_split": "train"}]  # fmt: skip
    assert result["conditions_added"] == ["granuloma-annulare"]
    names = {c["slug"]: c["name"] for c in client.get("/conditions").json()["items"]}
    assert names["granuloma-annulare"] == "granuloma annulare"  # the prompt's words
    dataset_id = done["dataset_id"]
    assert counts(client, dataset_id) == {
        ("basal-cell-carcinoma", 2): 2,
        ("basal-cell-carcinoma", 5): 1,
        ("granuloma-annulare", 6): 1,
        ("psoriasis", None): 1,
        ("psoriasis", 1): 1,
    }
    dataset = client.get(f"/datasets/{dataset_id}").json()
    assert dataset["kind"] == "real" and dataset["name"] == "clinic-a"
    assert dataset["splits"] == [  # by condition x split; row 8's copy stays in row 2's train
        {"condition": "basal-cell-carcinoma", "split": "test", "count": 1},
        {"condition": "basal-cell-carcinoma", "split": "train", "count": 2},
        {"condition": "granuloma-annulare", "split": "train", "count": 1},
        {"condition": "psoriasis", "split": "train", "count": 1},
        {"condition": "psoriasis", "split": "validation", "count": 1},
    ]
    slugs = {c["slug"] for c in client.get("/conditions").json()["items"]}
    assert "granuloma-annulare" in slugs
    with stack.session() as session:
        splits = dict(
            session.execute(
                text("SELECT split, count(*) FROM images WHERE dataset_id = :d GROUP BY split"),
                {"d": dataset_id},
            ).all()
        )
    assert splits == {"train": 4, "test": 1, "validation": 1}
    # the staged upload is gone, the images are stored with their bytes
    assert list(stack.store.iter_keys(f"uploads/{job['id']}/")) == []
    assert len(list(stack.store.iter_keys(f"datasets/{dataset_id}/"))) == 6


def test_fitzpatrick17k_csv_as_is(deployed: Stack) -> None:
    """Real Fitzpatrick17k photos and rows, with -1 skin types and labels with spaces."""
    metadata = SHARED_DATA / "metadata.csv"
    if not metadata.is_file():
        pytest.skip("../shared/data is not here")
    with metadata.open() as handle:
        records = [r for r in csv.DictReader(handle) if r["label"] in (
            "basal-cell-carcinoma", "squamous-cell-carcinoma", "folliculitis")]  # fmt: skip
    unknown = [r for r in records if r["fitzpatrick_scale"] == "-1"][:3]
    known = [r for r in records if r["fitzpatrick_scale"] != "-1"][:9]
    chosen = unknown + known
    header = FITZPATRICK17K_COLUMNS
    rows = [
        [r["md5hash"], r["fitzpatrick_scale"], r["fitzpatrick_centaur"],
         r["label"].replace("-", " "), r["nine_partition_label"], r["three_partition_label"],
         r["qc"], "https://example.org/x", "x"]
        for r in chosen
    ]  # fmt: skip
    files = {
        f"finalfitz17k/{r['md5hash']}.jpg": (SHARED_DATA / r["path"]).read_bytes() for r in chosen
    }
    client = deployed.client(deployed.new_key())
    job = upload(client, make_tar(files), filename="fitz.tar.gz",
                 metadata=csv_text(header, rows))  # fmt: skip
    done = deployed.wait_job(client, job["id"])
    assert done["result"]["format"] == "fitzpatrick17k"
    assert done["result"]["accepted"] == len(chosen)

    def tone(r: dict) -> int | None:
        for column in ("fitzpatrick_scale", "fitzpatrick_centaur"):
            if int(r[column]) > 0:
                return int(r[column])
        return None

    expected = collections.Counter((r["label"], tone(r)) for r in chosen)
    assert counts(client, done["dataset_id"]) == dict(expected)
    rows_out = [
        json.loads(x)
        for x in client.get(f"/datasets/{done['dataset_id']}/manifest").text.splitlines()
    ]
    assert {r["sha256"] for r in rows_out} == {
        __import__("hashlib").sha256(data).hexdigest() for data in files.values()
    }


def test_ddi_csv_keeps_the_group_and_malignancy(deployed: Stack) -> None:
    client = deployed.client(deployed.new_key())
    files = {f"ddi_images/{i:06d}.png": png(100 + i) for i in range(1, 5)}
    rows = [
        [1, "000001.png", 12, "True", "melanoma-in-situ"],
        [2, "000002.png", 34, "False", "verruca-vulgaris"],
        [3, "000003.png", 56, "True", "melanoma-in-situ"],
        [4, "000004.png", 56, "False", "seborrheic keratosis"],
    ]
    archive = make_zip(files | {"ddi_metadata.csv": csv_text(
        ["DDI_ID", "DDI_file", "skin_tone", "malignant", "disease"], rows)})  # fmt: skip
    done = deployed.wait_job(client, upload(client, archive)["id"])
    assert done["result"]["format"] == "ddi"
    assert counts(client, done["dataset_id"]) == {
        ("melanoma-in-situ", None): 2,
        ("verruca-vulgaris", None): 1,
        ("seborrheic-keratosis", None): 1,
    }
    with deployed.session() as session:
        got = session.execute(
            text("SELECT original_name, skin_tone_group, labels FROM images WHERE dataset_id = :d"),
            {"d": done["dataset_id"]},
        ).all()
    by_name = {name: (group, labels if isinstance(labels, dict) else json.loads(labels))
               for name, group, labels in got}  # fmt: skip
    assert by_name["000001.png"][0] == "I-II" and by_name["000001.png"][1]["malignant"] is True
    assert by_name["000002.png"][0] == "III-IV" and by_name["000002.png"][1]["malignant"] is False
    assert by_name["000004.png"][0] == "V-VI"


def test_mapped_columns(deployed: Stack) -> None:
    client = deployed.client(deployed.new_key())
    files = {"a.png": png(1), "b.png": png(2)}
    rows = [["a.png", "psoriasis", 3, "x"], ["b.png", "lichen planus", 4, ""]]
    meta = csv_text(["image", "diagnosis", "fst", "notes"], rows)
    done = deployed.wait_job(client, upload(
        client, make_zip(files), metadata=meta, file_column="image", label_column="diagnosis",
        skin_tone_column="fst")["id"])  # fmt: skip
    assert counts(client, done["dataset_id"]) == {("psoriasis", 3): 1, ("lichen-planus", 4): 1}
    assert done["result"]["columns"] == {
        "file": "image", "label": "diagnosis", "skin_tone": "fst", "split": None}  # fmt: skip
    assert done["result"]["ignored_columns"] == ["notes"]

    # a dermoscopy CSV as it comes (ISIC's: no skin type, other columns): read, others ignored
    rows = [["a.png", "nevus", "train", 40, "ab"], ["b.png", "melanoma", "test", 40, "cd"]]
    meta = csv_text(["path", "label", "split", "width", "sha1"], rows)
    done = deployed.wait_job(client, upload(
        client, make_zip(files), metadata=meta, file_column="path")["id"])  # fmt: skip
    assert counts(client, done["dataset_id"]) == {("nevus", None): 1, ("melanoma", None): 1}
    assert done["result"]["columns"] == {
        "file": "path", "label": "label", "skin_tone": None, "split": "split"}  # fmt: skip
    assert done["result"]["ignored_columns"] == ["width", "sha1"]

    # PH2's CSV says split "all": refused by row, with the way out; split_column=none reads
    # no split, skin_tone_column=none no skin tone (the fitzpatrick column is then ignored)
    rows = [["a.png", "melanoma", "all", 3], ["b.png", "common nevus", "all", 4]]
    meta = csv_text(["file", "label", "split", "fitzpatrick"], rows)
    refused = deployed.wait_job(client, upload(client, make_zip(files), metadata=meta)["id"],
                                statuses=("failed",))  # fmt: skip
    first = refused["result"]["errors"][0]
    assert (first["row"], first["file"]) == (2, "a.png")
    assert first["reason"] == (
        "split 'all' is not train, validation or test (split_column=none reads no split)"
    )
    done = deployed.wait_job(client, upload(
        client, make_zip(files), metadata=meta, split_column="none",
        skin_tone_column="none")["id"])  # fmt: skip
    assert counts(client, done["dataset_id"]) == {("melanoma", None): 1, ("common-nevus", None): 1}
    assert done["result"]["columns"] == {
        "file": "file", "label": "label", "skin_tone": None, "split": None}  # fmt: skip
    assert done["result"]["ignored_columns"] == ["split", "fitzpatrick"]


def bad_cases() -> list:
    good = {"ok1.png": png(1), "ok2.png": png(2)}
    header = ["file", "label", "fitzpatrick"]
    ok_rows = [["ok1.png", "psoriasis", 2], ["ok2.png", "psoriasis", 3]]

    def z(extra_files: dict, extra_rows: list, hdr=header) -> bytes:
        return make_zip(good | extra_files | {"metadata.csv": csv_text(hdr, ok_rows + extra_rows)})

    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("bomb.png", b"\0" * (20 << 20))
        archive.writestr("metadata.csv", csv_text(header, [["bomb.png", "psoriasis", 1]]))
    return [
        pytest.param(z({}, [["missing.png", "psoriasis", 1]]), "data.zip", [4],
                     "no such file", id="missing-file"),
        pytest.param(z({"broken.png": b"not an image at all"}, [["broken.png", "psoriasis", 1]]),
                     "data.zip", [4], "unreadable image", id="unreadable-image"),
        pytest.param(z({"x.png": png(3)}, [["x.png", "psoriasis", 9]]), "data.zip", [4],
                     "skin type", id="bad-skin-type"),
        pytest.param(make_zip(good | {"metadata.csv": csv_text(
                         ["file", "label", "Fitzpatrick_type"], ok_rows)}), "data.zip", [None],
                     "skin_tone_column: the CSV has no column 'fitzpatrick' but has "
                     "'Fitzpatrick_type'", id="skin-tone-column-lookalike"),
        pytest.param(make_zip(good | {"metadata.csv": csv_text([*header, "Split"], [
            [*r, "test"] for r in ok_rows])}), "data.zip", [None],
                     "send split_column=Split", id="split-column-lookalike"),
        pytest.param(make_tar(good | {"../evil.png": png(4),
                                      "metadata.csv": csv_text(header, ok_rows)}),
                     "data.tar.gz", [None], "escapes the archive", id="path-escape"),
        pytest.param(make_tar(good | {"metadata.csv": csv_text(header, ok_rows)},
                              links={"link.png": "/etc/passwd"}),
                     "data.tar.gz", [None], "link", id="symlink"),
        pytest.param(bomb.getvalue(), "bomb.zip", [None], "archive bomb", id="archive-bomb"),
        pytest.param(b"this is not an archive" * 10, "data.zip", [None], "not a zip or tar",
                     id="not-an-archive"),
    ]  # fmt: skip


@pytest.mark.parametrize(("archive", "filename", "bad_rows", "reason"), bad_cases())
def test_bad_uploads_are_refused_and_keep_nothing(
    deployed: Stack, archive: bytes, filename: str, bad_rows: list, reason: str
) -> None:
    client = deployed.client(deployed.new_key())
    images_before = count_rows(deployed, "SELECT count(*) FROM images")
    datasets_before = count_rows(deployed, "SELECT count(*) FROM datasets")
    job = upload(client, archive, filename=filename)
    done = deployed.wait_job(client, job["id"], statuses=("failed",))
    assert reason in done["error"], done["error"]
    errors = done["result"]["errors"]
    assert [e["row"] for e in errors] == bad_rows
    assert any(reason in e["reason"] for e in errors)
    assert done["dataset_id"] is None
    assert client.get(f"/datasets/{job['dataset_id']}").status_code == 404
    assert count_rows(deployed, "SELECT count(*) FROM images") == images_before
    assert count_rows(deployed, "SELECT count(*) FROM datasets") == datasets_before
    assert list(deployed.store.iter_keys(f"datasets/{job['dataset_id']}/")) == []
    assert list(deployed.store.iter_keys(f"uploads/{job['id']}/")) == []


def test_on_error_skip_keeps_the_good_rows(stack: Stack) -> None:
    client = stack.client(stack.new_key())
    files = {"ok1.png": png(1), "ok2.png": png(2), "broken.png": b"garbage"}
    rows = [
        ["ok1.png", "psoriasis", 2],
        ["missing.png", "psoriasis", 2],
        ["broken.png", "psoriasis", 2],
        ["ok2.png", "psoriasis", 7],
        ["ok2.png", "psoriasis", 3],
    ]
    archive = make_zip(files | {"metadata.csv": csv_text(["file", "label", "fitzpatrick"], rows)})
    done = stack.wait_job(client, upload(client, archive, on_error="skip")["id"])
    result = done["result"]
    assert result["accepted"] == 2
    assert result["skipped_count"] == 3
    assert [(s["row"], s["file"]) for s in result["skipped"]] == [
        (3, "missing.png"), (4, "broken.png"), (5, "ok2.png")]  # fmt: skip
    assert counts(client, done["dataset_id"]) == {("psoriasis", 2): 1, ("psoriasis", 3): 1}


def test_copies_annotated_differently_are_refused(stack: Stack) -> None:
    """Byte-identical images under two labels (as in ISIC's 9-class set) or two skin types
    cannot both be right: every row of them is a problem, not silently the first one."""
    client = stack.client(stack.new_key())
    files = {"a.png": png(1), "b.png": png(2), "c.png": png(3)}
    files |= {"a-again.png": png(1), "b-again.png": png(2), "b-third.png": png(2)}
    rows = [
        ["a.png", "melanoma", 2],
        ["a-again.png", "seborrheic keratosis", 2],  # another label
        ["b.png", "nevus", 4],
        ["b-again.png", "nevus", 4],  # a plain duplicate of row 4 on its own...
        ["b-third.png", "nevus", 2],  # ...but this copy has another skin type
        ["c.png", "nevus", 1],
    ]
    archive = make_zip(files | {"metadata.csv": csv_text(["file", "label", "fitzpatrick"], rows)})
    before = count_rows(stack, "SELECT count(*) FROM images")

    job = upload(client, archive)
    refused = stack.wait_job(client, job["id"], statuses=("failed",))
    errors = refused["result"]["errors"]
    assert [(e["row"], e["file"]) for e in errors] == [(2, "a.png"), (3, "a-again.png"),
        (4, "b.png"), (5, "b-again.png"), (6, "b-third.png")]  # fmt: skip
    assert errors[0]["reason"] == (
        "the same image (byte-identical) as row 3; the rows disagree on label: melanoma (row 2), "
        "seborrheic-keratosis (row 3): fix or drop them"
    )
    assert errors[2]["reason"].startswith("the same image (byte-identical) as rows 5, 6; ")
    assert (
        "skin tone: Fitzpatrick 4 (row 4), Fitzpatrick 4 (row 5), Fitzpatrick 2 (row 6)"
        in (errors[2]["reason"])
    )
    assert "5 bad rows; nothing was kept" in refused["error"]
    assert count_rows(stack, "SELECT count(*) FROM images") == before
    assert list(stack.store.iter_keys(f"datasets/{job['dataset_id']}/")) == []

    done = stack.wait_job(client, upload(client, archive, on_error="skip")["id"])
    result = done["result"]
    assert result["accepted"] == 1 and result["skipped_count"] == 5
    assert result["duplicate_count"] == 0  # row 5 agreed with row 4, but row 6 did not
    assert counts(client, done["dataset_id"]) == {("nevus", 1): 1}
    # the first copies were stored while reading; they are taken back out
    assert len(list(stack.store.iter_keys(f"datasets/{done['dataset_id']}/"))) == 1


def test_upload_form_validation(deployed: Stack) -> None:
    client = deployed.client(deployed.new_key())
    before = count_rows(deployed, "SELECT count(*) FROM jobs")
    no_archive = client.post("/datasets", data={"name": "x"})
    assert no_archive.status_code == 422
    assert "archive" in [e["field"] for e in no_archive.json()["errors"]]
    bad_format = client.post("/datasets", files={"archive": ("a.zip", b"PK..", "application/zip")},
                             data={"csv_format": "excel"})  # fmt: skip
    assert bad_format.status_code == 422
    assert "csv_format" in bad_format.json()["detail"]
    bad_mode = client.post("/datasets", files={"archive": ("a.zip", b"PK..", "application/zip")},
                           data={"on_error": "ignore"})  # fmt: skip
    assert bad_mode.status_code == 422
    assert "on_error" in bad_mode.json()["detail"]
    assert count_rows(deployed, "SELECT count(*) FROM jobs") == before
    unauthenticated = deployed.client().post("/datasets", files={"archive": ("a.zip", b"x", "x")})
    assert unauthenticated.status_code == 401


def test_cancel_a_queued_upload_keeps_nothing(deployed: Stack) -> None:
    client = deployed.client(deployed.new_key())
    deployed.worker.stop()
    try:
        archive = make_zip({"a.png": png(1), "metadata.csv": csv_text(
            ["file", "label", "fitzpatrick"], [["a.png", "psoriasis", 1]])})  # fmt: skip
        job = upload(client, archive)
        assert list(deployed.store.iter_keys(f"uploads/{job['id']}/"))  # staged
        canceled = client.post(f"/jobs/{job['id']}/cancel")
        assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
        assert client.get(f"/datasets/{job['dataset_id']}").status_code == 404
        assert list(deployed.store.iter_keys(f"uploads/{job['id']}/")) == []
    finally:
        deployed.worker.start()


@pytest.mark.parametrize(
    ("label", "name"),
    [
        ("Basal cell carcinoma", "basal cell carcinoma"),
        ("acne-vulgaris", "acne vulgaris"),  # the shared data's Fitzpatrick17k labels
        ("Acne_Vulgaris", "acne vulgaris"),
        ("  superficial-spreading--melanoma-ssm ", "superficial spreading melanoma ssm"),
        ("T-cell  lymphoma", "t-cell lymphoma"),  # words already: hyphens are meant
        ("eczema", "eczema"),
    ],
)
def test_condition_name_is_the_prompts_words(label: str, name: str) -> None:
    from app.vocabulary import condition_name, slugify

    assert condition_name(label) == name
    assert slugify(condition_name(label)) == slugify(label)  # the same condition either way


def truncated_cases() -> list:
    header = ["file", "label", "fitzpatrick"]
    files = {f"img/{i}.png": png(i, (64, 64)) for i in range(4)}
    files["metadata.csv"] = csv_text(header, [[f"img/{i}.png", "psoriasis", 2] for i in range(4)])
    tar_gz, plain_tar, zipped = make_tar(files), make_tar(files, gz=False), make_zip(files)
    damaged = bytearray(zipped)  # the central directory intact, a member's bytes not
    first = zipped.index(b"IDAT")  # inside img/0.png's deflated bytes
    damaged[first - 40 : first + 40] = bytes(80)
    return [
        pytest.param(tar_gz[: len(tar_gz) * 2 // 3], "data.tar.gz", id="tar-gz-cut"),
        pytest.param(tar_gz[:40], "data.tar.gz", id="tar-gz-cut-in-its-header"),
        pytest.param(plain_tar[: len(plain_tar) // 2 + 100], "data.tar", id="tar-cut"),
        pytest.param(zipped[: len(zipped) // 2], "data.zip", id="zip-cut"),
        pytest.param(bytes(damaged), "data.zip", id="zip-damaged"),
    ]


@pytest.mark.parametrize(("archive", "filename"), truncated_cases())
def test_truncated_or_corrupt_archives_are_reported(
    deployed: Stack, archive: bytes, filename: str
) -> None:
    client = deployed.client(deployed.new_key())
    job = upload(client, archive, filename=filename)
    done = deployed.wait_job(client, job["id"], statuses=("failed",))
    assert "truncated or corrupt" in done["error"], done["error"]
    assert done["result"] is not None, done
    [error] = done["result"]["errors"]
    assert error["row"] is None and error["file"] is None
    assert error["reason"].startswith("archive: the archive is truncated or corrupt"), error
    assert client.get(f"/datasets/{job['dataset_id']}").status_code == 404
    assert list(deployed.store.iter_keys(f"datasets/{job['dataset_id']}/")) == []
    assert list(deployed.store.iter_keys(f"uploads/{job['id']}/")) == []


def test_control_characters_in_the_csv_are_bad_rows(stack: Stack) -> None:
    client = stack.client(stack.new_key())
    images = {f"{i}.png": png(40 + i) for i in range(6)}
    rows = [
        ["0.png", "psoriasis", 2],
        ["1.png", "ecz\x00ema", 2],  # NUL: PostgreSQL cannot even store it
        ["2.png", "pso\x1briasis", 3],
        ["3.png", "ac\x85ne", 3],  # C1
        ["4\x01.png", "psoriasis", 3],
        ["5.png", "acne\x85", 3],  # NEL at an end: refused too, though strip() takes it
    ]
    images["metadata.csv"] = csv_text(["file", "label", "fitzpatrick"], rows)
    job = upload(client, make_zip(images))
    done = stack.wait_job(client, job["id"], statuses=("failed",))
    errors = done["result"]["errors"]
    assert [e["row"] for e in errors] == [3, 4, 5, 6, 7]
    assert all("control character" in e["reason"] for e in errors), errors
    assert [e["file"] for e in errors] == ["1.png", "2.png", "3.png", "4\\x01.png", "5.png"]
    assert errors[0]["reason"] == "label 'ecz\\x00ema' has a control character (U+0000)"
    assert errors[4]["reason"] == "label 'acne\\x85' has a control character (U+0085)"
    assert client.get(f"/datasets/{job['dataset_id']}").status_code == 404
    # with on_error=skip the good row is kept
    kept = upload(client, make_zip(images), on_error="skip")
    done = stack.wait_job(client, kept["id"])
    assert done["result"]["accepted"] == 1
    assert [e["row"] for e in done["result"]["skipped"]] == [3, 4, 5, 6, 7]
    assert counts(client, done["dataset_id"]) == {("psoriasis", 2): 1}


def test_labels_in_any_script_end_to_end(stack: Stack) -> None:
    """湿疹 (eczema) and 銀屑病 (psoriasis) are classes of their own, in storage keys and
    signed URLs on both stores; labels that differ by an accent are one class, and said so."""
    client = stack.client(stack.new_key())
    images = {f"{i}.png": png(60 + i) for i in range(5)}
    rows = [
        ["0.png", "湿疹", 2],
        ["1.png", "銀屑病", 5],
        ["2.png", "café au lait macule", 3],
        ["3.png", "cafe au lait macule", 3],
        ["4.png", "湿疹", 6],
    ]
    images["metadata.csv"] = csv_text(["file", "label", "fitzpatrick"], rows)
    job = upload(client, make_zip(images), name="多言語")
    done = stack.wait_job(client, job["id"])
    result = done["result"]
    assert result["accepted"] == 5
    assert result["merged_labels"] == {
        "cafe-au-lait-macule": ["café au lait macule", "cafe au lait macule"]
    }
    dataset_id = done["dataset_id"]
    assert client.get(f"/datasets/{dataset_id}").json()["name"] == "多言語"
    assert counts(client, dataset_id) == {
        ("湿疹", 2): 1,
        ("湿疹", 6): 1,
        ("銀屑病", 5): 1,
        ("cafe-au-lait-macule", 3): 2,
    }
    names = {c["slug"]: c["name"] for c in client.get("/conditions").json()["items"]}
    assert names["湿疹"] == "湿疹" and names["銀屑病"] == "銀屑病"
    # the manifest (filtered by a non-ASCII condition) and every image by its URL
    manifest = client.get(f"/datasets/{dataset_id}/manifest", params={"condition": "湿疹"})
    assert manifest.status_code == 200, manifest.text
    listed = [json.loads(line) for line in manifest.text.splitlines()]
    assert sorted(r["original_name"] for r in listed) == ["0.png", "4.png"]
    every = client.get(f"/datasets/{dataset_id}/manifest", params={"format": "csv"})
    by_csv = {r["original_name"]: r for r in csv.DictReader(io.StringIO(every.text))}
    assert len(by_csv) == 5
    for row in listed + list(by_csv.values()):
        assert f"/{row['condition']}/" in row["storage_key"]
        response = httpx.get(row["url"], timeout=30)  # no API key: the URL signs
        assert response.status_code == 200, (row["url"], response.text)
        assert response.content == images[row["original_name"]]
    # a job may name the new condition
    generate = client.post("/jobs", json={"condition": "湿疹", "count": 1, "dataset_name": "湿疹"})
    assert generate.status_code == 202, generate.text
    assert generate.json()["condition"] == "湿疹"
    client.post(f"/jobs/{generate.json()['id']}/cancel")


def test_a_failed_upload_leaves_no_empty_folder(embedded: Stack) -> None:
    """The local store prunes the folders a delete empties: a refused upload leaves no
    `uploads/{job}/` (nor `datasets/{id}/...`) folder behind."""
    client = embedded.client(embedded.new_key())
    images = {"a.png": png(61), "b.png": png(62)}
    images["metadata.csv"] = csv_text(
        ["file", "label", "fitzpatrick"], [["a.png", "psoriasis", 2], ["b.png", "eczema", 9]]
    )  # b's skin type is bad: the job fails once a.png is stored, and keeps nothing
    job = upload(client, make_zip(images))
    done = embedded.wait_job(client, job["id"], statuses=("failed",))
    assert [e["row"] for e in done["result"]["errors"]] == [3]
    root = embedded.store.root
    assert not (root / "uploads" / job["id"]).exists()
    assert not (root / "datasets" / job["dataset_id"]).exists()
