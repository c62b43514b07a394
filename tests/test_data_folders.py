"""ImageFolderFaces / list_identities: layout, labels, modes, the shorter-side resize + centre crop, errors; the
held-out and validation splits of an image folder (``val_fraction``)."""

import numpy as np
import pytest
import torch
from PIL import Image

from askd.config import Config, ConfigError, validate
from askd.data import ImageFolderFaces, list_identities
from askd.data.folders import DataError
from askd.data.sources import build_data


def _save(path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)


@pytest.fixture
def tree(tmp_path):
    """alice: grey PGM 92x112 + RGBA PNG + a stray .txt; bob: JPEG + upper-case .JPEG; empty: only a .txt."""
    root = tmp_path / "faces"
    grey = np.zeros((112, 92), np.uint8)  # ORL-like portrait, (H, W)
    grey[:10], grey[-10:] = 255, 255  # white bands that the centre crop removes
    grey[:, 44:48] = 200  # a vertical bar through the middle that survives
    _save(root / "alice" / "01.pgm", grey)
    rgba = np.zeros((112, 112, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 255
    _save(root / "alice" / "02.PNG", rgba, "RGBA")
    (root / "alice" / "notes.txt").write_text("not an image")
    rgb = np.zeros((100, 150, 3), np.uint8)  # landscape, (H, W, C)
    rgb[:, :20, 0] = 255  # a red band on the left that the crop removes
    rgb[:, 20:, 2] = 255
    _save(root / "bob" / "a.jpg", rgb)
    _save(root / "bob" / "b.JPEG", rgb)
    (root / "empty").mkdir()
    (root / "empty" / "readme.txt").write_text("no images here")
    return root


def test_identities_are_folders_with_images_sorted(tree):
    assert list_identities(tree) == ["alice", "bob"]
    data = ImageFolderFaces(tree)
    assert data.classes == ["alice", "bob"] and data.num_classes == 2
    assert [(p.name, label) for p, label in data.samples] == [("01.pgm", 0), ("02.PNG", 0), ("a.jpg", 1), ("b.JPEG", 1)]
    assert len(data) == 4


def test_items_are_uint8_rgb_of_the_requested_size(tree):
    data = ImageFolderFaces(tree)
    for i in range(len(data)):
        img, label = data[i]
        assert img.shape == (3, 112, 112) and img.dtype == torch.uint8 and isinstance(label, int)
    assert ImageFolderFaces(tree, size=64)[2][0].shape == (3, 64, 64)
    red = data[1][0]  # RGBA -> RGB
    assert (red[0] == 255).all() and (red[1:] == 0).all()


def test_grey_becomes_three_identical_channels(tree):
    img = ImageFolderFaces(tree)[0][0]
    assert torch.equal(img[0], img[1]) and torch.equal(img[0], img[2])


def test_shorter_side_resized_then_centre_cropped(tree):
    # 92x112 -> 112x136, 12 rows cropped top and bottom: the 10-row white bands (12.2 rows scaled) are gone
    portrait = ImageFolderFaces(tree)[0][0][0].int()
    assert portrait[2:-2].max() <= 200  # only the grey bar, no white band, away from the antialiased edge rows
    assert (portrait[:, 55:57] >= 190).all()  # the bar at columns 44..47 of 92 is now at about 53..58 of 112
    assert portrait[:, :50].float().mean() < 20  # nothing squashed in from the top or bottom bands
    # 150x100 -> 168x112, 28 columns cropped left and right: the 20-column red band (22.4 scaled) is gone
    landscape = ImageFolderFaces(tree)[2][0].int()
    assert landscape[0, :, 1:].max() < 60 and landscape[2, :, 1:].min() > 200


def test_identity_subset_is_relabelled_in_the_given_order(tree):
    data = ImageFolderFaces(tree, identities=["bob", "alice"])
    assert data.classes == ["bob", "alice"] and data.num_classes == 2
    assert [(p.parent.name, label) for p, label in data.samples][:3] == [("bob", 0), ("bob", 0), ("alice", 1)]
    assert data[0][1] == 0 and data[3][1] == 1
    assert ImageFolderFaces(tree, identities=["bob"]).samples[-1][1] == 0


def test_unknown_identities_are_named(tree):
    with pytest.raises(ValueError, match=r"\['carol', 'empty'\] have no images"):
        ImageFolderFaces(tree, identities=["alice", "carol", "empty"])
    with pytest.raises(ValueError, match="duplicates"):
        ImageFolderFaces(tree, identities=["alice", "alice"])


def test_missing_root(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere.*does not exist"):
        ImageFolderFaces(missing)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_identities(missing)


def test_root_that_is_a_file(tmp_path):
    file = tmp_path / "faces.zip"
    file.write_bytes(b"PK")
    with pytest.raises(NotADirectoryError, match="faces.zip.*is not a directory"):
        ImageFolderFaces(file)


def test_root_without_images(tmp_path):
    (tmp_path / "someone").mkdir()
    (tmp_path / "someone" / "list.txt").write_text("x")
    message = r"no images found under .*; expected ROOT/<identity>/<image>\.\{pgm,png,jpg,jpeg\}"
    with pytest.raises(FileNotFoundError, match=message):
        ImageFolderFaces(tmp_path)
    with pytest.raises(FileNotFoundError, match=message):
        list_identities(tmp_path)


def test_corrupt_image_is_named_when_loaded(tree):
    (tree / "bob" / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really a png")
    jpeg = (tree / "bob" / "a.jpg").read_bytes()
    (tree / "bob" / "d.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # truncated
    data = ImageFolderFaces(tree)  # listing does not decode
    names = [p.name for p, _ in data.samples]
    with pytest.raises(ValueError, match=r"cannot read image .*c\.png"):
        data[names.index("c.png")]
    with pytest.raises(ValueError, match=r"cannot read image .*d\.jpg"):
        data[names.index("d.jpg")]


@pytest.fixture
def ten_people(tmp_path):
    """p0..p9, 3 grey 16x16 PNGs each, every pixel of person k at grey level 20k (so an image names its person)."""
    root = tmp_path / "people"
    for k in range(10):
        for i in range(3):
            _save(root / f"p{k}" / f"{i}.png", np.full((16, 16), 20 * k, np.uint8))
    return root


def _people(images: torch.Tensor) -> set[int]:
    return {int(v) // 20 for v in images[:, 0, 0, 0]}


def test_val_fraction_holds_out_the_last_training_identities(ten_people):
    cfg = Config(data=str(ten_people), eval_fraction=0.2, val_fraction=0.25, eval_pairs=20)
    data = build_data(cfg)
    assert list(data.eval_sets) == ["held-out", "val"]  # held-out first: it feeds the attention correlations
    assert data.num_classes == 6  # 10 people - 2 held out - round(8 * 0.25) = 2 for validation
    assert _people(torch.stack([img for img, _ in data.train])) == set(range(6))
    assert _people(data.eval_sets["val"].images) == {6, 7}
    assert _people(data.eval_sets["held-out"].images) == {8, 9}
    val = data.eval_sets["val"]
    assert len(val) == 12 and int(val.issame.sum()) == 6  # 2 people x 3 genuine pairs each: 6 genuine, 6 not


def test_without_val_fraction_only_the_held_out_set(ten_people):
    data = build_data(Config(data=str(ten_people), eval_fraction=0.2, eval_pairs=20))
    assert list(data.eval_sets) == ["held-out"] and data.num_classes == 8


def test_val_fraction_too_large_names_the_key(ten_people):
    with pytest.raises(DataError, match=r"need at least 9 \(7 held out at val_fraction=0.9"):
        build_data(Config(data=str(ten_people), eval_fraction=0.2, val_fraction=0.9))


def test_val_fraction_needs_an_image_folder():
    with pytest.raises(DataError, match="val_fraction=0.2 splits an image folder's training identities"):
        build_data(Config(val_fraction=0.2))


@pytest.mark.parametrize("value", [-0.1, 1.0])
def test_val_fraction_outside_the_range_is_refused(value):
    with pytest.raises(ConfigError, match=r"'val_fraction': got .*expected in \[0, 1\)"):
        validate(Config(val_fraction=value))
