"""Small model specs for tests that train on 2 shared CPU cores: the behaviour under test is the same at any width."""

# a small MNIST NiN: two MLPconv blocks, 16 wide, the last emitting the 10 class maps
TINY_NIN_BLOCKS = [{"kernel_size": 5, "widths": [16, 16], "pool": "max"},
                   {"kernel_size": 3, "widths": [16, 10], "pool": None, "dropout": False}]
