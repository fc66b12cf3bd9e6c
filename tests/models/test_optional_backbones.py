"""The registry's optional backbones (timm models, torchvision's EfficientNetV2-M) load their
weights from the local caches only, strictly, and say what is missing.

Neither package imports beside this project's torch, so these tests stand small stand-ins in
their place (a module with the same entry points building a tiny real torch network) and run
the project's own loading code against real files in a temporary torch hub and Hugging Face
cache: which file is found, that it loads strictly, what the backbone computes, what the
errors say.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import sys
import types
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants as hub_constants
from safetensors.torch import save_file
from torch import nn

from models import backbones
from models.backbones import file_sha256

HUB_URL = "https://weights.example/models/tinynet_a1-0123abcd.pth"


class TinyNet(nn.Module):
    """A small convolutional network shaped like a timm model (forward_features, num_features,
    num_classes, pretrained_cfg)."""

    def __init__(self, pretrained_cfg: dict, *, channels: int = 8, num_classes: int = 1000) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 6, 3, stride=2), nn.ReLU(), nn.Conv2d(6, channels, 1)
        )
        self.fc = nn.Linear(channels, num_classes)
        self.num_features = channels
        self.num_classes = num_classes
        self.pretrained_cfg = pretrained_cfg

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)  # (B, 8, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x).mean(dim=(2, 3)))


def _fake_package(monkeypatch: pytest.MonkeyPatch, name: str) -> types.ModuleType:
    """An importable module `name` (find_spec sees it) for the duration of a test."""
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
    monkeypatch.setitem(sys.modules, name, module)
    return module


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Empty torch hub and Hugging Face caches in a temporary folder."""
    torch_hub = tmp_path / "torch-hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(torch_hub))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    monkeypatch.setattr(backbones, "_loaded", {})  # no backbone of another test reused
    return tmp_path


@pytest.fixture
def fake_timm(monkeypatch: pytest.MonkeyPatch) -> dict[str, dict]:
    """A `timm` whose create_model builds a TinyNet with the pretrained config registered."""
    configs: dict[str, dict] = {}
    timm = _fake_package(monkeypatch, "timm")

    def create_model(name: str, pretrained: bool = False) -> TinyNet:
        assert pretrained is False, "the service must never ask timm to download"
        if name not in configs:
            raise RuntimeError(f"Unknown model ({name})")
        return TinyNet(dict(configs[name]))

    timm.create_model = create_model  # type: ignore[attr-defined]
    return configs


def _trained_state(seed: int, *, channels: int = 8) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return TinyNet({}, channels=channels).state_dict()


def _hf_snapshot(root: Path, repo_id: str, filename: str, state: dict[str, torch.Tensor]) -> Path:
    """A file as huggingface_hub lays out a downloaded snapshot (refs/main -> commit)."""
    repo = Path(hub_constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    path = repo / "snapshots" / commit / filename
    path.parent.mkdir(parents=True)
    save_file(state, str(path))
    return path


def test_timm_backbone_loads_hugging_face_cached_weights_strictly(
    hub: Path, fake_timm: dict[str, dict]
) -> None:
    fake_timm["tinynet_a1"] = {
        "hf_hub_id": "timm/tinynet_a1.in1k",
        "input_size": (3, 96, 96),
        "mean": (0.5, 0.5, 0.5),
        "std": (0.25, 0.25, 0.25),
    }
    state = _trained_state(seed=7)
    path = _hf_snapshot(hub, "timm/tinynet_a1.in1k", "model.safetensors", state)

    backbone = backbones.load_backbone("timm:tinynet_a1")

    assert backbone.name == "timm:tinynet_a1"
    assert backbone.weights_id == file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert backbone.cache_key == f"timm:tinynet_a1@{backbone.weights_id[:16]}"
    assert (backbone.input_size, backbone.mean, backbone.std) == (96, (0.5,) * 3, (0.25,) * 3)
    assert backbone.imagenet_head and backbone.feature_dim == 8
    for key, value in backbone.module.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    # the features: concat pool (max, then mean) of the body on (pixels - mean) / std
    pixels = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        feature_map = backbone.module.forward_features((pixels - 0.5) / 0.25)
    expected = torch.cat([feature_map.amax(dim=(2, 3)), feature_map.mean(dim=(2, 3))], dim=1)
    torch.testing.assert_close(backbone.features(pixels), expected)
    assert backbones.load_backbone("timm:tinynet_a1") is backbone  # built once per process


def test_timm_backbone_falls_back_to_the_torch_hub_checkpoint(
    hub: Path, fake_timm: dict[str, dict]
) -> None:
    fake_timm["tinynet_a1"] = {"hf_hub_id": "timm/not-cached", "url": HUB_URL}
    path = hub / "torch-hub" / "checkpoints" / "tinynet_a1-0123abcd.pth"
    path.parent.mkdir(parents=True)
    torch.save(_trained_state(seed=3), path)

    backbone = backbones.load_backbone("timm:tinynet_a1")

    assert backbone.weights_id == file_sha256(path)
    assert backbone.input_size == 224  # timm's default when the config names none
    assert backbone.mean == backbones.IMAGENET_MEAN


def test_timm_backbone_without_cached_weights_never_downloads(
    hub: Path, fake_timm: dict[str, dict]
) -> None:
    fake_timm["tinynet_a1"] = {"hf_hub_id": "timm/tinynet_a1.in1k", "url": HUB_URL}

    with pytest.raises(RuntimeError, match="not in the local Hugging Face or torch hub cache"):
        backbones.load_backbone("timm:tinynet_a1")


def test_timm_weights_that_do_not_load_strictly_are_refused(
    hub: Path, fake_timm: dict[str, dict]
) -> None:
    fake_timm["tinynet_a1"] = {"hf_hub_id": "timm/tinynet_a1.in1k"}
    state = _trained_state(seed=0)
    state["head.weight"] = state.pop("fc.weight")  # keys of another timm version
    _hf_snapshot(hub, "timm/tinynet_a1.in1k", "model.safetensors", state)

    with pytest.raises(RuntimeError, match="does not load strictly"):
        backbones.load_backbone("timm:tinynet_a1")


def test_unknown_timm_model_is_timms_error(hub: Path, fake_timm: dict[str, dict]) -> None:
    with pytest.raises(RuntimeError, match=r"Unknown model \(nosuchnet\)"):
        backbones.load_backbone("timm:nosuchnet")


class V2Net(TinyNet):
    """torchvision's EfficientNet calls its body `features`."""

    @property
    def features(self) -> nn.Module:
        return self.body


@pytest.fixture
def fake_torchvision(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision.models with EfficientNetV2-M's entry points, building a TinyNet whose
    `features` is its body, and the weights enum's url and eval preset."""
    _fake_package(monkeypatch, "torchvision")
    models = _fake_package(monkeypatch, "torchvision.models")

    class Preset:
        crop_size = [480]
        mean = [0.485, 0.456, 0.406]
        std = [0.229, 0.224, 0.225]

    class Weights:
        url = "https://weights.example/models/efficientnet_v2_m-dc08266a.pth"

        @staticmethod
        def transforms() -> Preset:
            return Preset()

    def efficientnet_v2_m(weights: object = None) -> V2Net:
        assert weights is None, "the service must never ask torchvision to download"
        return V2Net({}, channels=1280)  # EfficientNetV2's last 1x1 conv has 1280 channels

    models.EfficientNet_V2_M_Weights = types.SimpleNamespace(IMAGENET1K_V1=Weights)  # type: ignore[attr-defined]
    models.efficientnet_v2_m = efficientnet_v2_m  # type: ignore[attr-defined]


def test_efficientnet_v2_m_loads_the_torch_hub_checkpoint(hub: Path, fake_torchvision) -> None:
    path = hub / "torch-hub" / "checkpoints" / "efficientnet_v2_m-dc08266a.pth"
    path.parent.mkdir(parents=True)
    state = _trained_state(seed=5, channels=1280)
    torch.save(state, path)

    backbone = backbones._torchvision_efficientnet_v2_m(device=torch.device("cpu"))

    assert backbone.name == "efficientnet-v2-m"
    assert backbone.input_size == 480  # the preset the weights were validated with
    assert backbone.weights_id == file_sha256(path)
    torch.testing.assert_close(backbone.module.state_dict()["fc.weight"], state["fc.weight"])
    assert backbone.features(torch.rand(1, 3, 64, 64)).shape == (1, 2 * 1280)


def test_efficientnet_v2_m_without_the_checkpoint_names_where_to_put_it(
    hub: Path, fake_torchvision
) -> None:
    with pytest.raises(RuntimeError, match=r"efficientnet_v2_m-dc08266a\.pth there"):
        backbones._torchvision_efficientnet_v2_m(device=torch.device("cpu"))
