"""Offline vision data (IDX parsing on the real Fashion-MNIST files, digits, clips, captions),
the SeqIO tasks through `trainer.data`, and augmentation invariants (flip, crop, mixup,
RandAugment ops against PIL)."""

import gzip
import os
import shutil
import stat
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageOps

from moetx.datasets import paths, registry
from moetx.datasets.registry import FetchError
from moetx.vision import augment, data


# ------------------------------------------------------------------------------- data
def test_idx_parsing_on_the_real_fashion_mnist_files():
    directory = data.fetch_fashion_mnist()
    labels = data.parse_idx(gzip.decompress(
        (directory / "train-labels-idx1-ubyte.gz").read_bytes()))
    assert labels.shape == (60000,) and labels.dtype == np.uint8
    np.testing.assert_array_equal(labels[:10], [9, 0, 0, 3, 0, 2, 7, 2, 5, 5])
    images, test_labels = data.load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(test_labels[:10], [9, 2, 1, 1, 6, 1, 4, 6, 5, 7])
    assert np.bincount(test_labels).tolist() == [1000] * 10
    assert int(images[0].sum()) == 33456


def _fake_apt_get(tmp_path, monkeypatch, deb):
    """An `apt-get` first on PATH that logs its arguments and "downloads" `deb` (None: refuses)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "apt-get"
    action = (f'cp "{deb}" "./{data.FASHION_MNIST_PACKAGE}_{data.FASHION_MNIST_VERSION}_all.deb"'
              if deb else 'echo "E: Unable to locate package" >&2; exit 100')
    script.write_text(f'#!/bin/sh\necho "$*" >> "{tmp_path}/calls.log"\n{action}\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return tmp_path / "calls.log"


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_fetch_fashion_mnist_copies_the_idx_files_out_of_the_pinned_package(tmp_path,
                                                                           monkeypatch):
    real_deb = registry.find_archive(data.FASHION_MNIST, paths.downloads_dir())
    assert real_deb is not None, "`python -m moetx.cli.data` fetches it"
    calls = _fake_apt_get(tmp_path, monkeypatch, real_deb)
    out = data.fetch_fashion_mnist(tmp_path / "cache")
    assert calls.read_text().split("\n")[:-1] == [
        f"download {data.FASHION_MNIST_PACKAGE}={data.FASHION_MNIST_VERSION}"]
    assert out == data.fashion_mnist_dir(tmp_path / "cache")
    for name in sorted(p.name for p in data.fashion_mnist_dir().iterdir()):
        assert (out / name).read_bytes() == (data.fashion_mnist_dir() / name).read_bytes()
    assert not list(out.glob(".*"))  # no temporary file left behind
    data.fetch_fashion_mnist(tmp_path / "cache")  # cached: apt-get does not run again
    assert len(calls.read_text().splitlines()) == 1


def test_fetch_fashion_mnist_refused_says_how_to_fix_it(tmp_path, monkeypatch):
    calls = _fake_apt_get(tmp_path, monkeypatch, None)
    with pytest.raises(FetchError) as info:
        data.fetch_fashion_mnist(tmp_path / "cache")
    message = str(info.value)
    assert "Unable to locate package" in message and "apt-get update" in message
    assert "four IDX .gz files into" in message and "python -m moetx.cli.data" in message
    # Pinned: no fallback to another version of the data.
    assert len(calls.read_text().splitlines()) == 1


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_fetch_fashion_mnist_reports_a_package_without_the_files(tmp_path, monkeypatch):
    root = tmp_path / "root"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {data.FASHION_MNIST_PACKAGE}\nVersion: 1\nArchitecture: all\n"
        "Maintainer: moetx tests <tests@example.com>\nDescription: one file only\n")
    member = root / "usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz"
    member.parent.mkdir(parents=True)
    member.write_bytes(gzip.compress(b"\0\0\x08\x01\0\0\0\0"))
    deb = tmp_path / "partial.deb"
    subprocess.run(["dpkg-deb", "-Zgzip", "--build", str(root), str(deb)], check=True,
                   capture_output=True)
    _fake_apt_get(tmp_path, monkeypatch, deb)
    with pytest.raises(FetchError, match=r"has no usr/share/datasets/fashion-mnist/.*--force"):
        data.fetch_fashion_mnist(tmp_path / "cache")


def test_fashion_mnist_files_with_other_content_are_reported(tmp_path):
    directory = data.fashion_mnist_dir(tmp_path)
    directory.mkdir(parents=True)
    idx = gzip.compress(bytes([0, 0, 0x08, 1]) + np.asarray([2], ">i4").tobytes() + b"\1\2")
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (directory / name).write_bytes(idx)
    with pytest.raises(FetchError, match=r"does not decode to the expected content.*moetx\.cli"):
        data.load_fashion_mnist("test", tmp_path)


def test_idx_parser_round_trip_and_errors():
    arr = np.arange(24, dtype=">i4").reshape(2, 3, 4)
    raw = bytes([0, 0, 0x0C, 3]) + np.asarray([2, 3, 4], ">i4").tobytes() + arr.tobytes()
    np.testing.assert_array_equal(data.parse_idx(raw), np.arange(24).reshape(2, 3, 4))
    with pytest.raises(FetchError, match="truncated"):
        data.parse_idx(raw[:-1])
    with pytest.raises(FetchError, match="Not an IDX"):
        data.parse_idx(b"\x1f\x8b\x08\x00")


def test_digits_clips_and_captions():
    train, train_y = data.load_digits("train")
    test, _ = data.load_digits("test")
    assert train.shape == (1500, 8, 8, 1) and test.shape == (297, 8, 8, 1)
    assert train.max() == 255
    clips, clip_y = data.digit_clips("test", num_frames=6)
    assert clips.shape == (297, 6, 32, 32, 1)
    again, _ = data.digit_clips("test", num_frames=6)
    np.testing.assert_array_equal(clips, again)
    # Every frame holds the whole 2x upscaled digit (nothing clipped at the borders) ...
    np.testing.assert_array_equal(clips.sum(axis=(2, 3, 4)),
                                  np.repeat(4 * test.sum(axis=(1, 2, 3))[:, None], 6, 1))
    # ... and it moves.
    assert (np.abs(np.diff(clips.astype(int), axis=1)).sum(axis=(1, 2, 3, 4)) > 0).all()
    images, text, labels = data.digit_captions("train")
    words = [data.CAPTION_VOCAB[i] for i in text[3] if i]
    assert " ".join(words) == data.CAPTION_TEMPLATES[3].format(data.DIGIT_WORDS[train_y[3]])
    np.testing.assert_array_equal(labels, train_y)


def test_tasks_feed_the_trainer_pipeline():
    from moetx.trainer import data as trainer_data
    from moetx.vision import model as vision_model
    from moetx.vision import tasks

    tasks.register_default_tasks()  # idempotent (the session fixture registered them already)

    model = vision_model.ImageClassificationModel(model_name="tiny/s")
    cfg = trainer_data.DatasetConfig("digits", {"image": (8, 8, 1)}, split="test",
                                     batch_size=128, shuffle=False)
    ds = trainer_data.get_dataset(cfg, model.feature_converter, 0, 1, 128, num_epochs=1)
    batches = [trainer_data.pad_batch(b, 128) for b in ds.as_numpy_iterator()]
    assert len(batches) == 3 and set(batches[0]) == {"image", "label", "mask"}
    assert batches[0]["image"].dtype == np.uint8 and batches[0]["image"].shape == (128, 8, 8, 1)
    # 297 real examples; the padding rows of the last batch have mask 0.
    assert sum(float(b["mask"].sum()) for b in batches) == 297.0
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[:297],
                                  data.load_digits("test")[1])
    with pytest.raises(ValueError, match="TASK_FEATURE_LENGTHS"):
        model.input_shapes(8, {"targets": 8})


# ------------------------------------------------------------------------- augmentation
def _images(n=4, size=12, channels=1, seed=0):
    return jax.random.uniform(jax.random.PRNGKey(seed), (n, size, size, channels))


def test_flip_twice_is_identity_and_crop_keeps_windows():
    x = _images()
    np.testing.assert_array_equal(augment.flip_left_right(augment.flip_left_right(x)), x)
    np.testing.assert_array_equal(augment.flip_left_right(x)[:, :, 0], x[:, :, -1])
    img = x[0]
    np.testing.assert_array_equal(augment.random_crop(jax.random.PRNGKey(1), img, 0), img)
    padded = np.pad(np.asarray(img), ((3, 3), (3, 3), (0, 0)))
    windows = {(dy, dx): padded[dy:dy + 12, dx:dx + 12] for dy in range(7) for dx in range(7)}
    for seed in range(5):
        crop = np.asarray(augment.random_crop(jax.random.PRNGKey(seed), img, 3))
        assert crop.shape == img.shape
        assert any(np.array_equal(crop, w) for w in windows.values())
    # A clip is cropped and flipped the same way in every frame.
    clip = jnp.repeat(img[None], 3, axis=0)
    out = jax.jit(augment.Augment(crop_padding=2, flip=True))(jax.random.PRNGKey(0),
                                                              clip[None])[0]
    assert out.shape == clip.shape
    np.testing.assert_array_equal(out[0], out[2])


def test_mixup_is_a_convex_combination_of_neighbours():
    x = _images(6)
    t = jax.nn.one_hot(jnp.arange(6) % 3, 3) * 0.9 + 0.1 / 3
    mx, mt, r = augment.mixup(jax.random.PRNGKey(3), x, t, alpha=0.4)
    assert 0.5 <= float(r) <= 1.0
    np.testing.assert_allclose(mt.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(mt, r * t + (1 - r) * jnp.roll(t, 1, 0), rtol=1e-6)
    np.testing.assert_allclose(mx, r * x + (1 - r) * jnp.roll(x, 1, 0), rtol=1e-6)


def _uint8(seed, shape=(10, 9, 3)):
    return np.random.RandomState(seed).randint(0, 256, shape).astype(np.uint8)


def _op(name, img_u8, level=0.0, sign=1.0, fill=0.0):
    out = augment.RANDAUGMENT_OPS[name](jnp.asarray(img_u8, jnp.float32) / 255.0, level=level,
                                        sign=sign, fill=fill)
    return np.asarray(jnp.round(out * 255.0)).astype(np.uint8)


@pytest.mark.parametrize("seed", [0, 1])
def test_randaugment_ops_match_pil(seed):
    img = _uint8(seed)
    pil = Image.fromarray(img)
    np.testing.assert_array_equal(_op("equalize", img), np.asarray(ImageOps.equalize(pil)))
    np.testing.assert_array_equal(_op("invert", img), np.asarray(ImageOps.invert(pil)))
    # Posterize at magnitude 5 drops 2 bits; solarize at 3 inverts pixels >= 0.7 * 255.
    np.testing.assert_array_equal(_op("posterize", img, 0.5), np.asarray(ImageOps.posterize(
        pil, 6)))
    ours = _op("solarize", (img // 5) * 5, 0.3)  # (levels away from the threshold)
    ref = np.where((img // 5) * 5 >= 178.5, 255 - (img // 5) * 5, (img // 5) * 5)
    np.testing.assert_array_equal(ours, ref)


def test_randaugment_geometry_and_strength():
    img = _images(1, 9, 1)[0]
    for name in ("rotate", "shear_x", "shear_y", "translate_x", "translate_y", "brightness",
                 "contrast", "sharpness", "color", "identity"):
        np.testing.assert_allclose(augment.RANDAUGMENT_OPS[name](img, level=0.0, sign=1.0,
                                                                 fill=0.5), img, atol=1e-5)
    # A quarter of a full turn (level 3 = 90 degrees) moves the corners around.
    rot = augment.rotate(img, 3.0, 1.0, 0.0)
    np.testing.assert_allclose(rot, jnp.rot90(img, k=-1), atol=1e-5)
    # Translating by a whole pixel count shifts and fills.
    shifted = augment.translate_x(img, 2.0 / (0.45 * 9), 1.0, 0.0)
    np.testing.assert_allclose(shifted[:, 2:], img[:, :-2], atol=1e-5)
    np.testing.assert_allclose(shifted[:, :2], 0.0)
    # A full RandAugment pass keeps shape and range; magnitude 0 with only geometric ops
    # is the identity.
    batch = _images(8, 9, 3)
    aug = augment.Augment(randaugment_layers=1, randaugment_magnitude=15.0,
                          randaugment_prob=1.0)
    out = jax.jit(aug)(jax.random.PRNGKey(0), batch)
    assert out.shape == batch.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    assert float(jnp.abs(out - batch).max()) > 0.1
    still = augment.Augment(randaugment_layers=2, randaugment_magnitude=0.0,
                            randaugment_prob=1.0, randaugment_ops=("rotate", "shear_x"))
    np.testing.assert_allclose(jax.jit(still)(jax.random.PRNGKey(0), batch), batch, atol=1e-5)
    with pytest.raises(ValueError, match="Unknown RandAugment ops"):
        augment.randaugment(jax.random.PRNGKey(0), batch[0], ops=("blur",))
