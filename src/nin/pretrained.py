"""Pretrained weights by name, shipped inside the package, each with what it is and how it scored.

    from nin.models import get_model
    model = get_model("nin_cifar10", weights="DEFAULT")        # or weights="fast-cifar10", or pretrained=True
    from nin.pretrained import get_weights, list_pretrained
    weights = get_weights("fast-cifar10")
    batch = weights.transforms()(pil_image)                     # the preprocessing these weights were trained with
    print(weights.model_card())

`nin predict fast-cifar10 photo.jpg`, `nin evaluate fast-cifar10` and every command that takes a weights file
also take a tag. The files live in ``nin/weights/`` of the installed package; each entry's sha256 is checked
when the file is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from nin.errors import CheckpointError, NinError

__all__ = ["Weights", "PRETRAINED", "list_pretrained", "get_weights"]


@dataclass(frozen=True)
class Weights:
    """One shipped weights file and its record."""

    tag: str  # the name users type: nin predict <tag> ...
    model: str  # the registered architecture it belongs to (nin.models)
    dataset: str
    recipe: str
    command: str  # exactly how it was trained (or imported)
    sha256: str
    accuracy: dict = field(default_factory=dict)  # test set -> accuracy, as `nin evaluate` measures it
    license: str = "MIT (the weights); the data set's own terms apply to what it was trained on"
    notes: str = ""

    @property
    def path(self) -> Path:
        """The file inside the installed package."""
        return Path(str(resources.files("nin") / "weights" / f"{self.tag}.safetensors"))

    def load(self, device="cpu"):
        """(model, preprocessing, meta), after checking the file's sha256."""
        from nin.checkpoint import load_weights
        from nin.data.readers import file_digest

        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: the pretrained file {self.tag!r} is missing from this install")
        if file_digest(self.path, "sha256") != self.sha256:
            raise CheckpointError(f"{self.path}: sha256 differs from the registry's; the file is damaged")
        return load_weights(self.path, device)

    def transforms(self):
        """The preprocessing these weights expect, as an nn.Module taking tensors, PIL images or paths."""
        from nin.classifier import ImageTransform

        model, preprocessing, _ = self.load()
        return ImageTransform(preprocessing, model.config.input_size, model.config.in_channels)

    def model_card(self) -> str:
        """A short Markdown model card."""
        from nin.models import get_model

        parameters = sum(p.numel() for p in get_model(self.model).parameters())
        scores = "\n".join(f"| {name} | {value:.2%} |" for name, value in self.accuracy.items())
        return (f"# {self.tag}\n\n{self.notes}\n\n- architecture: `{self.model}` ({parameters:,} parameters in its "
                f"paper form)\n- data set: {self.dataset}\n- recipe: {self.recipe}\n- command: `{self.command}`\n"
                f"- sha256: `{self.sha256}`\n- license: {self.license}\n\n| test set | accuracy |\n|---|---|\n"
                f"{scores}\n\nLoad: `get_model(\"{self.model}\", weights=\"{self.tag}\")`, "
                f"`nin predict {self.tag} photo.jpg`.\n")


JPEG_10000 = "CIFAR-10 test, JPEG q75 copy (10,000)"
EXACT_1000 = "CIFAR-10 test, first 1,000 official images, exact pixels"

PRETRAINED: dict[str, Weights] = {w.tag: w for w in (
    Weights("fast-cifar10", "nin_cifar10", "cifar10", "fast, 32 epochs (the first 16 on 24 px images), no dropout",
            "nin train --dataset cifar10",
            "0951fb2ec0f911c021af87eef1e7a1a2630f6e0939d5a3965fc8dc6bb308a424",
            {JPEG_10000: 0.8971, EXACT_1000: 0.904},
            notes="NiN with batch norm, trained on the CIFAR-10 copy whose pixels went through JPEG q75, by the "
                  "fast recipe's default CIFAR-10 run (progressive resizing: 16 epochs at 24 px, 16 at 32 px; no "
                  "dropout); results/fast-cifar10.json records the command as run, with the same settings spelled "
                  "out."),
    Weights("fast-mnist", "nin_mnist", "mnist", "fast, 8 epochs",
            "nin train --dataset mnist --recipe fast --epochs 8",
            "bec4c013e01d0d1143d74262badcda6b467d1f229e0d3f397507c57c98bcafe3", {"MNIST test (10,000)": 0.9970},
            notes="NiN with batch norm on MNIST (paper: 0.47% error), from an 8-epoch run; the fast recipe's MNIST "
                  "default is now 6 epochs (0.34% in a run here)."),
    Weights("fast-fashion-mnist", "nin_mnist", "fashion-mnist", "fast, 10 epochs",
            "nin train --dataset fashion-mnist --recipe fast --epochs 10",
            "a27ea5fdc14e3d7aa9759f8f2ac564e13a25066b64ef9044678a2ad190d11b65",
            {"Fashion-MNIST test (10,000)": 0.9314}, notes="NiN with batch norm on Fashion-MNIST."),
    Weights("caffe-authors-cifar10", "nin_cifar10_caffe", "cifar10", "the authors' own (Caffe Model Zoo)",
            "nin import-caffe cifar10_nin.caffemodel --arch nin_cifar10_caffe --data-dir DATA "
            "--out caffe-authors-cifar10.safetensors",
            "0f8e8b4252945ec76e8c1746a7880cb1ca3b752c55cf6d95086a42a49fb00aab",
            {EXACT_1000: 0.8960, JPEG_10000: 0.8062},
            license="as published by the paper's authors in the Caffe Model Zoo",
            notes="The paper authors' trained CIFAR-10 NiN, imported from Caffe, with GCN + ZCA fitted on the "
                  "CIFAR-10 copy's training images."),
)}

DEFAULTS = {"nin_cifar10": "fast-cifar10", "nin_mnist": "fast-mnist", "nin_cifar10_caffe": "caffe-authors-cifar10"}


def list_pretrained(model: str | None = None) -> list[str]:
    """Tags of the shipped weights (of one architecture when ``model`` is given)."""
    return [tag for tag, w in PRETRAINED.items() if model is None or w.model == model]


def get_weights(tag: str, model: str | None = None) -> Weights:
    """The entry of ``tag``; "DEFAULT" means ``model``'s default weights."""
    if tag == "DEFAULT":
        if model not in DEFAULTS:
            raise NinError(f"{model}: no pretrained weights; these models have some: {', '.join(sorted(DEFAULTS))}")
        tag = DEFAULTS[model]
    if tag not in PRETRAINED:
        raise NinError(f"unknown pretrained weights {tag!r}; choose one of: {', '.join(PRETRAINED)}")
    weights = PRETRAINED[tag]
    if model is not None and weights.model != model:
        raise NinError(f"weights {tag!r} are for {weights.model}, not {model}")
    return weights
