"""nin: Network In Network (Lin, Chen & Yan, 2013) in PyTorch.

    import nin
    model = nin.get_model("nin_cifar10")                          # the paper's model, freshly initialised
    model = nin.get_model("nin_cifar10", weights="DEFAULT")       # with the shipped weights
    classifier = nin.Classifier.load("fast-cifar10")              # weights + preprocessing + test-time flips
"""

from nin.__about__ import __version__
from nin.classifier import Classifier
from nin.models import list_models
from nin.pretrained import get_model, get_weights, list_pretrained

__all__ = ["__version__", "get_model", "get_weights", "list_models", "list_pretrained", "Classifier"]
