"""app.storage_urls: the bulk signers make exactly the URLs the store makes, on both stacks,
and a signer that would not is never used."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from urllib.parse import urlsplit

from app.storage import LocalStore, S3Store
from app.storage_urls import LocalUrls, S3Urls, url_signer
from tests.conftest import Stack


def test_bulk_urls_are_the_stores_urls(stack: Stack) -> None:
    keys = [
        "datasets/d/psoriasis/0a.png",
        "datasets/d/odd condition/é+%&=,;~.png",
        "datasets/d/x/" + "y" * 200 + ".png",
    ]
    sign = url_signer(stack.store, stack.settings)
    if isinstance(stack.store, S3Store):
        assert isinstance(sign, S3Urls)
        for key in keys:
            # botocore signs at the current second: sign at the same one
            reference = stack.store.url(key)
            stamp = dict(p.split("=") for p in urlsplit(reference).query.split("&"))
            at = datetime.strptime(stamp["X-Amz-Date"], "%Y%m%dT%H%M%SZ")
            assert sign([key], now=at.replace(tzinfo=UTC)) == [reference]
    else:
        assert isinstance(stack.store, LocalStore) and isinstance(sign, LocalUrls)
        now = time.time()
        for key, url in zip(keys, sign(keys, now=now), strict=True):
            expires = int(now) + stack.store.expiry_s
            query = f"?expires={expires}&signature={stack.store.signature(key, expires)}"
            assert url.endswith(query)
            assert url.split("?")[0] == stack.store.url(key).split("?")[0]
        # a secret the store does not use: its own url(), one key at a time
        other = stack.settings.model_copy(update={"signing_secret": "not-the-store-secret"})
        slow = url_signer(stack.store, other)
        assert not isinstance(slow, LocalUrls)
        assert slow(keys[:1])[0].split("?")[0] == stack.store.url(keys[0]).split("?")[0]
