#!/usr/bin/python3
"""Simulated nvcc: `nvcc --version` in the real five-line format.

It reads the toolkit's version.json two levels up from its own resolved path, as installed:
/usr/local/cuda-X.Y/bin/nvcc -> /usr/local/cuda-X.Y/version.json.
"""

from __future__ import annotations

import json
import os
import sys


def main(argv: list[str]) -> int:
    """Print the version banner for --version/-V; anything else is an input error, as with no sources."""
    root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    with open(os.path.join(root, "version.json")) as f:
        nvcc = json.load(f)["cuda_nvcc"]
    if argv[:1] not in (["--version"], ["-V"]):
        sys.stderr.write("nvcc fatal   : No input files specified; use option --help for more information\n")
        return 1
    release = ".".join(nvcc["version"].split(".")[:2])
    sys.stdout.write(
        "nvcc: NVIDIA (R) Cuda compiler driver\n"
        f"Copyright (c) 2005-{nvcc['copyright_year']} NVIDIA Corporation\n"
        f"Built on {nvcc['built_on']}\n"
        f"Cuda compilation tools, release {release}, V{nvcc['version']}\n"
        f"Build {nvcc['build']}\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
