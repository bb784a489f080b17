"""Training augmentation: colour jitter keeps hue and grey, blur equals a naive 3×3 loop, the affine
warp with no crop/rotation is the identity, and every draw depends only on the generator's seed."""

import torch

from lipkit.data.transforms import augment, blur_some, jitter_colour


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_colour_jitter_keeps_grey_grey_and_hue_order():
    grey = torch.full((4, 3, 8, 8), 0.4)
    out = jitter_colour(grey, gen(), 0.4)
    assert torch.allclose(out[:, 0], out[:, 1], atol=1e-6) and torch.allclose(out[:, 1], out[:, 2], atol=1e-6)
    red = torch.zeros(4, 3, 8, 8)
    red[:, 0], red[:, 1], red[:, 2] = 0.8, 0.3, 0.1
    out = jitter_colour(red, gen(), 0.4)
    assert (out[:, 0] >= out[:, 1]).all() and (out[:, 1] >= out[:, 2]).all()  # still red-orange
    assert (out >= 0).all() and (out <= 1).all()
    assert torch.allclose(jitter_colour(red, gen(), 0.0), red, atol=1e-6)


def test_blur_matches_a_naive_loop_and_p_zero_is_identity():
    x = torch.rand(3, 3, 6, 5, generator=gen(1))
    out = blur_some(x, gen(), 1.0)
    w = [[1, 2, 1], [2, 4, 2], [1, 2, 1]]
    for b in range(3):
        for c in range(3):
            for i in range(6):
                for j in range(5):
                    acc = sum(
                        w[di + 1][dj + 1] * x[b, c, min(max(i + di, 0), 5), min(max(j + dj, 0), 4)]
                        for di in (-1, 0, 1)
                        for dj in (-1, 0, 1)
                    )
                    assert abs(float(out[b, c, i, j]) - float(acc) / 16) < 1e-6
    assert torch.equal(blur_some(x, gen(), 0.0), x)


def test_augment_identity_and_determinism():
    x = torch.rand(5, 3, 16, 16, generator=gen(2))
    same = augment(x, gen(), scale_min=1.0, rotate_deg=0.0)
    assert torch.allclose(same, x, atol=1e-5)
    a = augment(x, gen(7), 0.6, 10.0, True, 0.5, 0.3)
    b = augment(x, gen(7), 0.6, 10.0, True, 0.5, 0.3)
    assert torch.equal(a, b) and not torch.allclose(a, x)
