"""The bundle: every pinned version a host runs, rolled out and rolled back as one unit.

A bundle is a release manifest, `releases/YYYY-MM.yaml`. Images are named only by `sha256:` digest
and model weights only with their sha256, so what was tested is exactly what runs.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from infra.model.errors import load_yaml
from infra.model.fleet import GPU_MEMORY_MIB
from infra.model.strict import StrictModel, validate
from patching.release.rules import fabric_manager_package, nscq_package

Version = Annotated[str, Field(pattern=r"^\d+(\.\d+)+$")]
DebVersion = Annotated[str, Field(pattern=r"^\d+(\.\d+)+-\d+[A-Za-z0-9.+~]*$")]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]

CONTAINER_TOOLKIT_PACKAGES = (
    "nvidia-container-toolkit",
    "nvidia-container-toolkit-base",
    "libnvidia-container-tools",
    "libnvidia-container1",
)


class Driver(StrictModel):
    """The NVIDIA datacenter driver release a bundle pins."""

    version: str = Field(pattern=r"^\d{3}\.\d{2,3}(\.\d{2})?$")

    @property
    def branch(self) -> int:
        """The driver branch, 580 for 580.95.05."""
        return int(self.version.split(".")[0])


class Weights(StrictModel):
    """A model's weights: repository revision, path in the artifact store, sha256 and size."""

    revision: str = Field(min_length=7, description="the model repository revision (commit)")
    path: str = Field(pattern=r"^[A-Za-z0-9._/-]+$", description="path under the site's artifacts_url")
    sha256: Sha256
    size_bytes: int = Field(gt=0)


class Model(StrictModel):
    """A model the bundle serves, with its weights."""

    name: str
    weights: Weights


class Serving(StrictModel):
    """The serving engine (vLLM or SGLang): its release and its image, pinned by digest."""

    engine: Literal["vllm", "sglang"]
    version: str = Field(pattern=r"^\d+\.\d+\.\d+$", description="serving release (upstream version)")
    image: str = Field(description="the serving image, by digest only")

    @field_validator("image")
    @classmethod
    def _digest(cls, value: str) -> str:
        name, sep, digest = value.partition("@")
        if not sep:
            raise ValueError("images are pinned by digest: expected NAME@sha256:<64 hex>, found a tag")
        if not digest.startswith("sha256:") or len(digest) != 71 or not _is_hex(digest[7:]):
            raise ValueError("the digest must be sha256: followed by 64 lowercase hex digits")
        if not name:
            raise ValueError("missing image name before '@'")
        return value


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


class Advisory(StrictModel):
    """A security advisory the bundle fixes (CVE, GHSA or NVIDIA bulletin)."""

    id: str = Field(pattern=r"^(CVE-\d{4}-\d{4,}|GHSA-[\w-]+|NVIDIA-\d+)$")
    component: Literal["driver", "fabric_manager", "cuda", "nccl", "ofed", "efa", "container_toolkit",
                       "serving", "model"]
    severity: Literal["low", "medium", "high", "critical"]
    summary: str
    url: str = Field(pattern=r"^https://")


class Bundle(StrictModel):
    """A release manifest: every version a host runs, from driver to model weights, as one unit."""

    release: str = Field(pattern=r"^\d{4}-\d{2}(\.\d+)?(-[a-z0-9-]+)?$")
    published: dt.date
    summary: str
    driver: Driver
    fabric_manager: str = Field(description="must equal the driver version")
    nscq: str = Field(description="libnvidia-nscq, must equal the driver version")
    cuda: Version
    nccl: DebVersion = Field(description="libnccl2 version without the +cudaX.Y suffix")
    ofed: str = Field(pattern=r"^\d+\.\d+-\d+(\.\d+)+$")
    efa_installer: Version
    container_toolkit: dict[str, DebVersion]
    serving: Serving
    models: list[Model] = Field(min_length=1)
    gpus: list[str] = Field(min_length=1, description="GPU models this bundle is qualified on")
    advisories: list[Advisory] = []

    @field_validator("container_toolkit")
    @classmethod
    def _four_packages(cls, value: dict[str, str]) -> dict[str, str]:
        missing = [p for p in CONTAINER_TOOLKIT_PACKAGES if p not in value]
        extra = [p for p in value if p not in CONTAINER_TOOLKIT_PACKAGES]
        if missing or extra:
            raise ValueError(
                "the container toolkit is exactly these four packages: " + ", ".join(CONTAINER_TOOLKIT_PACKAGES)
                + (f"; missing {missing}" if missing else "") + (f"; unknown {extra}" if extra else "")
            )
        return value

    @field_validator("gpus")
    @classmethod
    def _known_gpus(cls, value: list[str]) -> list[str]:
        unknown = [g for g in value if g not in GPU_MEMORY_MIB]
        if unknown:
            raise ValueError(f"unknown GPU model(s) {unknown} (known: {', '.join(GPU_MEMORY_MIB)})")
        return value

    @property
    def digest(self) -> str:
        """The bundle's identity by content: sha256 (64 hex digits) of its canonical JSON.

        Canonical: the validated model as JSON values (`model_dump(mode="json")`), keys sorted, no
        whitespace, so YAML formatting, key order, quoting and comments do not change it and any changed
        value does. Fields left at their default are omitted (`exclude_defaults`): a field added to the
        schema later with a default keeps the digests hosts already recorded. The converge stamps it beside
        the release in the host manifest (playbooks/filter_plugins `fleet_bundle_digest` calls this), and a
        release name already on hosts with another digest is another bundle (patching/rollout/identity.py).
        """
        canonical = json.dumps(self.model_dump(mode="json", exclude_defaults=True), sort_keys=True,
                               separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    @property
    def cuda_minor(self) -> str:
        """CUDA as major.minor ('12.8' for 12.8.1), the way package names carry it."""
        return ".".join(self.cuda.split(".")[:2])

    def model(self, name: str) -> Model | None:
        """The bundle's model of that name, None when it serves no such model."""
        return next((m for m in self.models if m.name == name), None)

    def packages(self, *, nvswitch: bool = True, ib: bool = False) -> dict[str, str]:
        """Debian package -> exact version this bundle pins on a host of that kind."""
        branch = self.driver.branch
        pkgs = {
            f"cuda-drivers-{branch}": f"{self.driver.version}-1",
            f"cuda-toolkit-{self.cuda_minor.replace('.', '-')}": f"{self.cuda}-1",
            "libnccl2": f"{self.nccl}+cuda{self.cuda_minor}",
            **self.container_toolkit,
            f"{self.serving.engine}-serving": f"{self.serving.version}-1",
        }
        if nvswitch:
            pkgs[fabric_manager_package(branch)] = f"{self.fabric_manager}-1"
            pkgs[nscq_package(branch)] = f"{self.nscq}-1"
        if ib:
            pkgs["mlnx-ofed-basic"] = self.ofed
        return pkgs


def is_digest(value: Any) -> bool:
    """Whether `value` has the shape of a `Bundle.digest`: 64 lowercase hex digits."""
    return isinstance(value, str) and len(value) == 64 and _is_hex(value)


def parse_bundle(data: Any, source: str) -> Bundle:
    """Validate release-manifest data into a Bundle; any problem is an InputError naming file and field."""
    return validate(Bundle, data, source, "a release manifest")


def load_bundle(path: str | Path) -> Bundle:
    """Read and validate a release manifest; any problem is an InputError naming file and field."""
    return parse_bundle(load_yaml(path), str(path))
