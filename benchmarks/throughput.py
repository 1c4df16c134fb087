"""Training and inference throughput of nin's engine against a plain PyTorch port (see nin.tools.bench).

    NIN_DATA=../shared/data .venv/bin/python benchmarks/throughput.py --steps 20
    .venv/bin/python benchmarks/throughput.py --quick --json
"""

from __future__ import annotations

import argparse

from nin.errors import NinError
from nin.tools import bench

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    bench.add_arguments(parser)  # `nin bench`'s flags, checked as it checks them
    try:
        raise SystemExit(bench.run(parser.parse_args()))
    except NinError as error:  # one line, as `nin bench` says it
        raise SystemExit(f"throughput.py: error: {' '.join(str(error).split())}") from None
