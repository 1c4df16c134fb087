"""Pretrained weights by tag: shipped in the package, checked by sha256, loadable by name, scored as recorded."""

from __future__ import annotations

from pathlib import Path

import pytest

from nin.cli import main
from nin.data.readers import file_digest
from nin.errors import NinError
from nin.models import get_model
from nin.pretrained import PRETRAINED, get_weights, list_pretrained

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("tag", list(PRETRAINED))
def test_every_tag_ships_its_file_and_loads(tag):
    weights = PRETRAINED[tag]
    assert file_digest(weights.path, "sha256") == weights.sha256
    model, preprocessing, meta = weights.load()
    assert len(meta["classes"]) == model.config.num_classes
    assert (REPO / "docs" / "model_cards" / f"{tag}.md").read_text() == weights.model_card()  # cards kept in step
    copy = REPO / "weights" / f"{tag}.safetensors"
    if copy.is_file():  # the checkout's copy is the same file
        assert file_digest(copy, "sha256") == weights.sha256


def test_get_model_by_tag_default_and_pretrained():
    assert get_model("nin_cifar10", pretrained=True).state_dict().keys() == \
        get_model("nin_cifar10", weights="fast-cifar10").state_dict().keys()
    assert "fast-cifar10" in list_pretrained("nin_cifar10") and "fast-mnist" not in list_pretrained("nin_cifar10")
    with pytest.raises(NinError, match="for nin_mnist"):
        get_weights("fast-mnist", model="nin_cifar10")
    with pytest.raises(NinError, match="unknown pretrained"):
        get_weights("fast-imagenet")
    with pytest.raises(ValueError, match="overrides"):
        get_model("nin_cifar10", weights="DEFAULT", dropout=0.1)


def test_a_damaged_shipped_file_is_refused(tmp_path, monkeypatch):
    import dataclasses

    damaged = tmp_path / "fast-mnist.safetensors"
    damaged.write_bytes(PRETRAINED["fast-mnist"].path.read_bytes()[:-10] + b"0" * 10)
    entry = dataclasses.replace(PRETRAINED["fast-mnist"])
    monkeypatch.setattr(type(entry), "path", property(lambda self: damaged))
    with pytest.raises(NinError, match="sha256"):
        entry.load()


def test_mnist_weights_by_tag_reproduce_their_recorded_accuracy(data_root, capsys):
    import json

    assert main(["evaluate", "fast-mnist", "--data-dir", str(data_root), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert round(result["accuracy"], 4) == get_weights("fast-mnist").accuracy["MNIST test (10,000)"]
