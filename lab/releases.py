"""The lab's copies of the bundles, pinning the serving images the lab built.

A bundle pins its serving image by digest (`serving.image: docker.io/vllm/vllm-openai@sha256:...`). The
checked-in bundles (releases/*.yaml, and the known-bad ones in lab/bundles/) name the digests of the real
images; the lab cannot pull those (no internet), so at `lab up` it builds one image per serving release it
simulates (lab/images.py), pushes them to its registry, and writes here a copy of every bundle whose
`serving.image` is the lab's build of that release: what a release engineer does when publishing a bundle
for an image they built. Everything else in a copy is the checked-in file, byte for byte. The lab's hosts pull
by digest through their mirror (registries.conf: the lab's registry for docker.io/vllm), so the lab's bundles
keep the image's real name.

Tests and the demo use these copies (`Lab.releases_dir`); `fleet release check` on the checked-in files is
unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import yaml

SOURCES = ("releases", "lab/bundles")
_IMAGE = re.compile(r'^(?P<indent>\s+)image:\s*"?(?P<name>[^"@\s]+)@sha256:[0-9a-f]{64}"?\s*$', re.MULTILINE)


class ReleaseRenderError(ValueError):
    """A bundle file the lab cannot copy: no serving image line, or a serving release the lab did not build."""


def bundle_sources(project_dir: Path) -> list[Path]:
    """Every bundle file the lab copies: the releases and the lab's known-bad bundles."""
    return sorted(p for d in SOURCES for p in (project_dir / d).glob("*.yaml"))


def render(text: str, digest: str, source: Path) -> str:
    """`text` (a bundle file) with its serving image's digest replaced by `digest` (sha256:<64 hex>)."""
    if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        raise ReleaseRenderError(f"{source}: not an image digest: {digest!r}")
    matches = list(_IMAGE.finditer(text))
    if len(matches) != 1:
        raise ReleaseRenderError(f"{source}: expected one `serving.image: NAME@sha256:...` line, found {len(matches)}")
    m = matches[0]
    line = f'{m["indent"]}image: "{m["name"]}@{digest}"'
    header = (f"# The lab's copy of {source.name} (written by `fleet lab up`): serving.image is the lab's build of\n"
              "# this serving release, in the lab's registry; the rest is the checked-in file.\n")
    return header + text[:m.start()] + line + text[m.end():]


def write_releases(project_dir: Path, out_dir: Path, digests: Mapping[str, str]) -> list[Path]:
    """Write the lab's copy of every bundle into `out_dir`, its image the built digest of its serving version."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for source in bundle_sources(project_dir):
        text = source.read_text()
        version = str(yaml.safe_load(text)["serving"]["version"])
        if version not in digests:
            raise ReleaseRenderError(f"{source}: serving.version {version}: the lab built no image for it")
        target = out_dir / source.name
        rendered = render(text, digests[version], source)
        if not target.exists() or target.read_text() != rendered:
            tmp = target.with_suffix(".tmp")
            tmp.write_text(rendered)
            tmp.replace(target)
        written.append(target)
    for stale in set(out_dir.glob("*.yaml")) - set(written):
        stale.unlink()
    return written
