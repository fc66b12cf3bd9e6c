"""Condition slugs: Unicode-aware (any script's letters and digits, accents folded), and every
ASCII label keeps the slug it has always had (stored images and conditions depend on it)."""

from __future__ import annotations

import random
import re
import string

import pytest

from app.vocabulary import slugify


def ascii_slug(label: str) -> str:
    """The slug every ASCII label has had since the first release."""
    return re.sub(r"[^a-z0-9]+", "-", label.strip().lower()).strip("-")


@pytest.mark.parametrize(
    ("label", "slug"),
    [
        ("湿疹", "湿疹"),  # eczema
        ("銀屑病", "銀屑病"),  # psoriasis
        ("café au lait macule", "cafe-au-lait-macule"),
        ("cafe au lait macule", "cafe-au-lait-macule"),
        ("Café-au-lait  Macule", "cafe-au-lait-macule"),
        ("Naevus de Ota (naevo-fusco-céruléen)", "naevus-de-ota-naevo-fusco-ceruleen"),
        ("Экзема кожи", "экзема-кожи"),
        ("Straße", "strasse"),  # casefolded
        ("アトピー性皮膚炎", "アトピー性皮膚炎"),  # a mark of the script (゚) is kept
        ("त्वचा रोग", "त्वचा-रोग"),  # Devanagari's vowel signs and virama are kept
        ("습진", "습진"),  # Hangul stays composed
        ("  eczema 2 ", "eczema-2"),
        ("Basal cell carcinoma", "basal-cell-carcinoma"),
        ("Acne_Vulgaris", "acne-vulgaris"),
        ("---", ""),
    ],
)
def test_slugs(label: str, slug: str) -> None:
    assert slugify(label) == slug


@pytest.mark.parametrize(
    "label",
    ["basal-cell-carcinoma", "Basal cell carcinoma", "t-cell lymphoma", "lupus_erythematosus",
     "  Squamous   cell carcinoma (SCC) ", "Lichen planus / lichenoid", "melanoma-in-situ--2",
     "Fitzpatrick_17k: ACNE!", "a\tb\nc", "_x_", ""],
)  # fmt: skip
def test_ascii_labels_keep_their_slug(label: str) -> None:
    assert slugify(label) == ascii_slug(label)


def test_every_ascii_label_keeps_its_slug() -> None:
    rng = random.Random(2026)
    alphabet = string.printable + "\x00\x01\x1f\x7f"
    for _ in range(20_000):
        label = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 24)))
        assert slugify(label) == ascii_slug(label), repr(label)
