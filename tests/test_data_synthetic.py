"""SyntheticFaces: shapes, labels, bit-exact determinism, disjoint splits, identity structure, fine cues lost at 8x."""

import itertools

import pytest
import torch
from PIL import Image

from askd.data import SyntheticFaces, degrade, synthetic


@pytest.fixture(scope="module")
def faces() -> SyntheticFaces:
    return SyntheticFaces(num_identities=10, samples_per_identity=4, seed=0)


def test_items_are_uint8_rgb_with_identity_labels(faces):
    assert len(faces) == 40 and faces.num_classes == 10
    for i, label in [(0, 0), (3, 0), (4, 1), (39, 9)]:
        img, got = faces[i]
        assert got == label and isinstance(got, int)
        assert img.shape == (3, 112, 112) and img.dtype == torch.uint8
        assert img.float().std() > 10  # a picture, not a flat fill


def test_render_batches_and_other_sizes():
    small = SyntheticFaces(3, 2, size=48)
    out = small.render(torch.tensor([0, 2, 1]), torch.tensor([1, 0, 5]))  # sample 5 > samples_per_identity is allowed
    assert out.shape == (3, 3, 48, 48) and out.dtype == torch.uint8
    assert small.render(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long)).shape == (0, 3, 48, 48)


def test_same_item_is_bit_identical(faces):
    assert torch.equal(faces[13][0], faces[13][0])
    assert torch.equal(SyntheticFaces(10, 4, seed=0)[13][0], faces[13][0])  # a fresh instance too


def test_render_does_not_depend_on_batch_composition_order_or_threads(faces):
    items = [2, 13, 27, 39]
    expected = torch.stack([faces[i][0] for i in items])
    ids, sams = torch.tensor(items) // 4, torch.tensor(items) % 4
    # more images than one drawing chunk, the wanted ones scattered among others, in another order
    others = torch.arange(16) % 10
    order = torch.tensor([3, 1, 0, 2])
    all_ids = torch.cat([others[:7], ids[order], others[7:]])
    all_sams = torch.cat([others[:7] % 4, sams[order], (others[7:] + 1) % 4])
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            got = faces.render(all_ids, all_sams)[7:11]
            assert torch.equal(got, expected[order])
    finally:
        torch.set_num_threads(threads)


def test_seeds_and_splits_give_different_faces(faces):
    ids, sams = torch.arange(4), torch.zeros(4, dtype=torch.long)
    base = faces.render(ids, sams).float()
    for other in (SyntheticFaces(10, 4, seed=1), SyntheticFaces(10, 4, seed=0, split="eval")):
        assert (other.render(ids, sams).float() - base).abs().mean() > 10


def test_identities_differ_more_than_samples_of_one_identity(faces):
    n = 6
    ids = torch.arange(n).repeat_interleave(4)
    x = faces.render(ids, torch.arange(4).repeat(n)).float().view(n, 4, 3, 112, 112)[..., 28:92, 28:84]  # the face
    within = [(x[i, s] - x[i, t]).abs().mean() for i in range(n) for s, t in itertools.combinations(range(4), 2)]
    between = [(x[i, s] - x[j, s]).abs().mean() for i, j in itertools.combinations(range(n), 2) for s in range(4)]
    assert torch.stack(between).mean() > 1.1 * torch.stack(within).mean()


def _low_res(x: torch.Tensor, variant: str) -> torch.Tensor:
    """degrade() on 0..255 float images, back in 0..255."""
    return degrade(x / 127.5 - 1, 14, variant) * 127.5 + 127.5


def test_fine_marks_are_lost_at_8x(faces):
    """The fine-mark difference between two identities, F = (x_a - plain_a) - (x_b - plain_b), does not survive 14 px.

    "paper" (antialiased) removes its energy. "official" (nearest) keeps energy but aliases it: what is left
    at LR no longer looks like F, measured as the share of F retained, <F, D> / <F, F> with D the same
    difference after degrade. The coarse difference between the two plain faces is mostly retained.
    """
    a, b, s = torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5, 6, 7]), torch.zeros(4, dtype=torch.long)
    xa, xb = faces.render(a, s).float(), faces.render(b, s).float()
    pa, pb = faces.render(a, s, detail=False).float(), faces.render(b, s, detail=False).float()
    fine, coarse = (xa - pa) - (xb - pb), pa - pb
    assert fine.pow(2).mean().sqrt() > 2  # the marks are there at 112 px

    def retained(hr: torch.Tensor, low_res: torch.Tensor) -> torch.Tensor:
        return ((hr * low_res).sum((1, 2, 3)) / (hr * hr).sum((1, 2, 3))).mean()

    low_res_fine = (_low_res(xa, "paper") - _low_res(pa, "paper")) - (_low_res(xb, "paper") - _low_res(pb, "paper"))
    assert low_res_fine.pow(2).sum() < 0.15 * fine.pow(2).sum()
    for variant in ("official", "paper"):
        low_res_fine = (_low_res(xa, variant) - _low_res(pa, variant)) - (_low_res(xb, variant) - _low_res(pb, variant))
        assert retained(fine, low_res_fine) < 0.3, variant
        assert retained(coarse, _low_res(pa, variant) - _low_res(pb, variant)) > 0.6, variant


def test_detail_false_changes_only_the_marks(faces):
    ids, sams = torch.arange(4), torch.arange(4)
    with_marks, plain = faces.render(ids, sams).float(), faces.render(ids, sams, detail=False).float()
    changed = (with_marks - plain).abs().amax(1) > 0  # (B,H,W)
    assert 0 < changed.float().mean() < 0.1  # small marks on the face only


def test_drawing_windows_hold_every_shape(faces, monkeypatch):
    """Shapes are drawn only inside per-group windows; drawing everything on the whole image changes no bit."""
    ids, sams = torch.arange(16) % 10, torch.arange(16) % 4
    windowed = faces.render(ids, sams)
    monkeypatch.setattr(synthetic.dataset, "_windows",
                        lambda rows, boxes, size: {g: (slice(None),) * 2 for g in boxes[0]})
    assert torch.equal(faces.render(ids, sams), windowed)


@pytest.mark.parametrize("kwargs, message", [
    ({"num_identities": 0}, "num_identities"),
    ({"samples_per_identity": 2.5}, "samples_per_identity"),
    ({"split": "test"}, "split"),
    ({"size": 8}, "size"),
])
def test_bad_construction(kwargs, message):
    args = {"num_identities": 2, "samples_per_identity": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        SyntheticFaces(**args)


def test_bad_render_indices(faces):
    with pytest.raises(ValueError, match=r"identities must be in \[0, 10\)"):
        faces.render(torch.tensor([10]), torch.tensor([0]))
    with pytest.raises(ValueError, match="samples must be >= 0"):
        faces.render(torch.tensor([1]), torch.tensor([-1]))
    with pytest.raises(ValueError, match="one shape"):
        faces.render(torch.tensor([1, 2]), torch.tensor([0]))
    with pytest.raises(ValueError, match="integer"):
        faces.render(torch.tensor([1.0]), torch.tensor([0]))
    with pytest.raises(IndexError):
        faces[40]


def test_main_writes_a_grid_png(tmp_path):
    out = tmp_path / "grid.png"
    synthetic.main([str(out), "--identities", "2", "--samples", "3", "--size", "32"])
    with Image.open(out) as img:
        assert img.size == (96, 64) and img.mode == "RGB"
