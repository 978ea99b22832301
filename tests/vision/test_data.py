"""Offline vision data (IDX parsing on the real Fashion-MNIST files, digits, clips, captions),
the SeqIO tasks through `trainer.data`, and augmentation invariants (flip, crop, mixup,
RandAugment ops against PIL)."""

import gzip

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageOps

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


def test_idx_parser_round_trip_and_errors():
    arr = np.arange(24, dtype=">i4").reshape(2, 3, 4)
    raw = bytes([0, 0, 0x0C, 3]) + np.asarray([2, 3, 4], ">i4").tobytes() + arr.tobytes()
    np.testing.assert_array_equal(data.parse_idx(raw), np.arange(24).reshape(2, 3, 4))
    with pytest.raises(data.DataError, match="truncated"):
        data.parse_idx(raw[:-1])
    with pytest.raises(data.DataError, match="Not an IDX"):
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
    from moetx.vision import tasks  # noqa: F401  (registers the tasks)

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
