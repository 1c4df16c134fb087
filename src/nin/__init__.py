"""nin: Network In Network (Lin, Chen & Yan, 2013) in PyTorch.

    from nin.models import get_model
    model = get_model("nin_cifar10")
"""

__version__ = "0.1.0"
