"""Backbones: the packaged Lite0 weights load strictly and recognise a photo, features are frozen,
deterministic and concat-pooled, names resolve (or fail clearly), and real dermatology images of
two modalities separate on the features alone.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
from pathlib import Path

import matplotlib.cbook
import pytest
import torch

from models.backbones import (
    Backbone,
    available_backbones,
    file_sha256,
    load_backbone,
)
from models.efficientnet_lite import (
    EfficientNetLite,
    FoldedEfficientNetLite,
    fold_for_inference,
    lite0_weights_path,
    load_efficientnet_lite0,
)
from models.transforms import decode_image, resize_crop

DATA = Path("/work/shared/data")
MILITARY_UNIFORM = 652  # ImageNet class of matplotlib's Grace Hopper portrait


@pytest.fixture(scope="module")
def lite0() -> Backbone:
    return load_backbone("efficientnet-lite0")


@pytest.fixture(scope="module")
def grace_hopper() -> torch.Tensor:
    path = Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    return resize_crop(decode_image(path.read_bytes()))[None]  # (1, 3, 224, 224)


def test_packaged_weights_load_strictly_and_are_identified_by_their_sha256(
    lite0: Backbone,
) -> None:
    path = lite0_weights_path()
    state_dict = torch.load(path, map_location="cpu", weights_only=True)

    result = EfficientNetLite().load_state_dict(state_dict, strict=True)

    assert result.missing_keys == [] and result.unexpected_keys == []
    assert state_dict["_fc.weight"].shape == (1000, 1280)  # the ImageNet head is in the file
    assert lite0.weights_id == hashlib.sha256(path.read_bytes()).hexdigest()


def test_lite0_recognises_grace_hoppers_uniform(
    lite0: Backbone, grace_hopper: torch.Tensor
) -> None:
    logits = lite0.classify(grace_hopper)

    probabilities = logits.softmax(dim=1)[0]
    top = probabilities.topk(2)
    assert logits.shape == (1, 1000)
    assert int(top.indices[0]) == MILITARY_UNIFORM
    # Measured 0.30 (runner-up: mortarboard, 0.09) with TF "same" padding and 127/128
    # normalisation; symmetric padding gives 0.23.
    assert float(top.values[0]) > 0.25
    assert float(top.values[0]) > 2 * float(top.values[1])


def test_feature_map_is_7x7_at_224(lite0: Backbone, grace_hopper: torch.Tensor) -> None:
    assert isinstance(lite0.module, FoldedEfficientNetLite)
    with torch.inference_mode():
        feature_map = lite0.module.forward_features(grace_hopper)

    assert feature_map.shape == (1, 1280, 7, 7)


def test_folded_network_computes_what_the_loaded_one_does(
    lite0: Backbone, grace_hopper: torch.Tensor
) -> None:
    loaded = load_efficientnet_lite0()  # the strictly loaded network, BatchNorm unfolded
    pixels = torch.cat(
        [grace_hopper, torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))]
    )
    # an odd side exercises the symmetric stride-2 padding the convolution does by itself
    odd = torch.rand(1, 3, 225, 199, generator=torch.Generator().manual_seed(4))
    normalized = lite0._normalize(pixels)

    with torch.inference_mode():
        reference = loaded.forward_features(normalized)
        folded = lite0.module.forward_features(normalized)
        reference_logits, folded_logits = loaded(normalized), lite0.module(normalized)
        odd_reference = loaded.forward_features(lite0._normalize(odd))
        odd_folded = lite0.module.forward_features(lite0._normalize(odd))

    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in lite0.module.modules())
    assert folded.shape == reference.shape == (3, 1280, 7, 7)
    assert odd_folded.shape == odd_reference.shape == (1, 1280, 8, 7)
    # ReLU6 outputs in [0, 6]: equal up to float rounding
    torch.testing.assert_close(folded, reference, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(odd_folded, odd_reference, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(folded_logits, reference_logits, atol=2e-4, rtol=1e-4)


def test_folding_refuses_a_network_in_training_mode() -> None:
    with pytest.raises(ValueError, match="eval mode"):
        fold_for_inference(EfficientNetLite().train())


def test_feature_cache_key_names_the_weights_and_the_folded_computation(lite0: Backbone) -> None:
    assert lite0.cache_key == f"efficientnet-lite0@{lite0.weights_id[:16]}+bn-folded"


def test_features_are_concat_pooled_max_then_average_and_deterministic(lite0: Backbone) -> None:
    pixels = torch.rand(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))

    features = lite0.features(pixels)
    again = lite0.features(pixels.clone())

    assert features.shape == (3, 2 * lite0.feature_dim) == (3, 2560)
    assert features.dtype == torch.float32
    assert torch.equal(features, again)
    max_pool, avg_pool = features[:, :1280], features[:, 1280:]
    assert bool((max_pool >= avg_pool).all()) and bool((max_pool > avg_pool).any())


def test_features_can_feed_a_trainable_head(lite0: Backbone) -> None:
    features = lite0.features(torch.rand(2, 3, 224, 224))
    head = torch.nn.Linear(features.shape[1], 2)

    head(features).sum().backward()  # inference tensors would refuse this

    assert head.weight.grad is not None and not features.requires_grad


def test_backbone_stays_frozen_and_in_eval_mode(lite0: Backbone) -> None:
    pixels = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    before = lite0.features(pixels)

    lite0.module.train()  # e.g. a parent module's .train()
    after = lite0.features(pixels)

    assert not lite0.module.training
    assert all(not parameter.requires_grad for parameter in lite0.module.parameters())
    assert torch.equal(before, after)  # batch statistics would have changed the features


def test_features_reject_pixels_outside_unit_range_or_of_wrong_shape(lite0: Backbone) -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        lite0.features(torch.full((1, 3, 224, 224), 255.0))
    with pytest.raises(ValueError, match="shape"):
        lite0.features(torch.rand(3, 224, 224))


def test_unknown_name_lists_the_available_backbones() -> None:
    with pytest.raises(ValueError, match="efficientnet-lite0") as error:
        load_backbone("resnet-9000")

    assert "unknown backbone 'resnet-9000'" in str(error.value)
    assert "efficientnet-lite0" in available_backbones()


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="installed")
def test_torchvision_backbone_says_torchvision_is_missing() -> None:
    assert "efficientnet-v2-m" not in available_backbones()
    with pytest.raises(RuntimeError, match="needs torchvision, which is not installed"):
        load_backbone("efficientnet-v2-m")


@pytest.mark.skipif(importlib.util.find_spec("timm") is not None, reason="installed")
def test_timm_backbone_says_timm_is_missing() -> None:
    with pytest.raises(RuntimeError, match="needs timm, which is not installed"):
        load_backbone("timm:resnet50")


def test_load_backbone_caches_per_name_and_device(lite0: Backbone) -> None:
    assert load_backbone("efficientnet-lite0") is lite0
    assert load_backbone("efficientnet-lite0", device=torch.device("cpu")) is lite0


def test_file_sha256_rehashes_a_changed_file(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"first")
    first = file_sha256(path)
    path.write_bytes(b"second, longer")

    assert first == hashlib.sha256(b"first").hexdigest()
    assert file_sha256(path) == hashlib.sha256(b"second, longer").hexdigest()


def _dataset_pixels(folder: Path, *, count: int) -> torch.Tensor:
    """`count` images spread evenly over a dataset's metadata.csv, resize-cropped to 224."""
    with (folder / "metadata.csv").open(newline="") as file:
        paths = sorted(row["path"] for row in csv.DictReader(file))
    step = len(paths) // count
    chosen = paths[::step][:count]
    return torch.stack([resize_crop(decode_image((folder / p).read_bytes())) for p in chosen])


@pytest.mark.slow
def test_features_separate_dermoscopy_from_clinical_photos(lite0: Backbone) -> None:
    folders = [DATA / "ph2", DATA / "fitzpatrick17k_ajl21"]
    for folder in folders:
        if not (folder / "metadata.csv").is_file():
            pytest.skip(f"needs the real images at {folder}")
    groups = [lite0.features(_dataset_pixels(folder, count=10)) for folder in folders]
    features = torch.cat(groups)  # (20, 2560)
    labels = torch.tensor([0] * 10 + [1] * 10)

    # Leave-one-out nearest centroid: each image against the centroids of the other 19.
    correct = 0
    for i in range(len(features)):
        keep = torch.arange(len(features)) != i
        centroids = torch.stack([features[keep & (labels == c)].mean(dim=0) for c in (0, 1)])
        predicted = int(torch.cdist(features[i : i + 1], centroids).argmin())
        correct += predicted == int(labels[i])

    assert correct / len(features) >= 0.9


def test_feature_batch_is_the_setting_or_the_devices_default() -> None:
    from app.config import Settings
    from workers.feature_bank import CPU_FEATURE_BATCH, GPU_FEATURE_BATCH, feature_batch

    assert feature_batch(Settings(), torch.device("cpu")) == CPU_FEATURE_BATCH == 8
    assert feature_batch(Settings(), torch.device("cuda")) == GPU_FEATURE_BATCH == 64
    chosen = Settings(classifier_feature_batch=20)
    assert (
        feature_batch(chosen, torch.device("cpu"))
        == feature_batch(chosen, torch.device("cuda"))
        == 20
    )


def test_the_api_knows_the_backbones_this_module_builds() -> None:
    """app/ cannot import models/ (no torch there), so it keeps the names itself."""
    from app.schemas import BACKBONE_NAMES, TIMM_BACKBONE_PREFIX
    from models import backbones

    known = set(backbones.BACKBONES) | set(backbones._NEEDS_PACKAGE)
    assert known == set(BACKBONE_NAMES)
    assert backbones.TIMM_PREFIX == TIMM_BACKBONE_PREFIX
