"""RandAugment as the paper's ViT recipe uses it (randaugment.py): each operation against values
worked out by hand, against PIL (what the reference repository runs) and torchvision where
they are installed, and the batch-level draws."""

import math
import os
import random
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from plumbing import randaugment as ra  # noqa: E402

OP_NAMES = {id(f): name for name, f in vars(ra).items() if callable(f)}
M14 = {OP_NAMES[id(op)]: ra.magnitude(14, low, high) for op, low, high, _ in ra.OPS}  # the values at M = 14


def u8(rows):
    """A (1, C, H, W) uint8 batch from nested lists (C, H, W) or (H, W)."""
    t = torch.tensor(rows, dtype=torch.uint8)
    return (t if t.dim() == 3 else t.unsqueeze(0)).unsqueeze(0)


def val(v):
    return torch.tensor([v], dtype=torch.float64)


def test_magnitudes_at_m14_are_the_reference_values():
    assert ra.magnitude(14, 0, 30) == pytest.approx(14.0)  # rotate: 14 degrees
    assert int(ra.magnitude(14, 0, 4)) == 1  # posterize keeps 1 bit
    assert ra.magnitude(14, 0, 256) == pytest.approx(119.4667, abs=1e-4)  # solarize threshold
    assert ra.magnitude(14, 0.1, 1.9) == pytest.approx(0.94)  # colour, contrast, brightness, sharpness
    assert ra.magnitude(14, 0, 100) == pytest.approx(46.667, abs=1e-3)  # translate: more than 32 pixels
    assert len(ra.OPS) == 16


def test_auto_contrast_stretches_each_channel_and_leaves_flat_ones():
    # channel 0: lo 10, hi 60: scale 255/50 = 5.1, offset -51 -> 10: 0, 20: int(102 - 51) = 51, 60: 255
    # channel 1: one level only: unchanged
    x = u8([[[10, 20], [60, 60]], [[7, 7], [7, 7]]])
    assert ra.auto_contrast(x, val(0)).tolist() == [[[[0, 51], [255, 255]], [[7, 7], [7, 7]]]]


def test_equalize_uses_pils_step_and_clips():
    # 16x32 = 512 pixels: 255 at 10, 255 at 50, 2 at 90. step = (512 - 2) // 255 = 2, so
    # lut[i] = (1 + pixels below i) // 2: 10 -> 0, 50 -> (1 + 255) // 2 = 128, 90 -> 511 // 2 = 255
    x = torch.tensor([10] * 255 + [50] * 255 + [90] * 2, dtype=torch.uint8).view(1, 1, 16, 32)
    out = ra.equalize(x, val(0)).flatten()
    assert out[:255].eq(0).all() and out[255:510].eq(128).all() and out[510:].eq(255).all()
    few = u8([[0, 0], [100, 200]])  # step = 3 // 255 = 0: PIL leaves it alone
    assert torch.equal(ra.equalize(few, val(0)), few)


def test_invert_posterize_solarize():
    x = u8([[0, 119, 120], [127, 128, 255]])
    assert ra.invert(x, val(0)).tolist() == [[[[255, 136, 135], [128, 127, 0]]]]
    assert ra.posterize(x, val(M14["posterize"])).tolist() == [[[[0, 0, 0], [0, 128, 128]]]]  # 1 bit kept
    assert ra.posterize(x, val(0.0)).tolist() == [[[[0, 0, 0], [0, 128, 128]]]]  # int(0) -> at least 1 bit
    # threshold 119.47: 119 is kept, 120 and above are inverted
    assert ra.solarize(x, val(M14["solarize"])).tolist() == [[[[0, 119, 135], [128, 127, 0]]]]


def test_solarize_add_truncates_then_solarizes_at_128():
    # + 51.33: 10 -> 61 (kept), 76 -> int(127.33) = 127 (kept), 77 -> 128 -> 127, 210 -> 255 (clipped) -> 0
    x = u8([[10, 76, 77, 210]])
    assert ra.solarize_add(x, val(M14["solarize_add"])).tolist() == [[[[61, 127, 127, 0]]]]


def test_brightness_contrast_color_blend_in_float32_and_truncate():
    f = val(M14["brightness"])  # 0.94
    # brightness: int(0.94 x): 100 -> 94, 255 -> int(239.7) = 239, 1 -> 0
    assert ra.brightness(u8([[100, 255, 1]]), f).tolist() == [[[[94, 239, 0]]]]
    # contrast on grey: mean 100 -> int(100.5) = 100; 0 -> int(100 - 94) = 6, 200 -> 194, 101 -> int(100.94) = 100
    assert ra.contrast(u8([[0, 100], [200, 100]]), f).tolist() == [[[[6, 100], [194, 100]]]]
    assert ra.contrast(u8([[101, 99], [100, 100]]), f).tolist() == [[[[100, 99], [100, 100]]]]
    # colour on RGB (200, 100, 0): grey (19595 * 200 + 38470 * 100 + 32768) >> 16 = 118;
    # 118 + 0.94 * 82 = 195.08 -> 195, 118 - 0.94 * 18 = 101.08 -> 101, 118 - 0.94 * 118 = 7.08 -> 7
    assert ra.color(u8([[[200]], [[100]], [[0]]]), f).flatten().tolist() == [195, 101, 7]
    grey = u8([[3, 200]])
    assert torch.equal(ra.color(grey, f), grey)  # PIL's Color does nothing to a grey image


def test_sharpness_blends_with_smooth_and_keeps_the_border():
    x = u8([[0, 0, 0], [0, 130, 0], [0, 0, 0]])
    # SMOOTH at the centre: int(130 * 5 / 13 + 0.5) = int(50.5) = 50; blend: 50 + 0.94 * 80 = 125.2 -> 125
    assert ra.smooth(x).tolist() == [[[[0, 0, 0], [0, 50, 0], [0, 0, 0]]]]
    assert ra.sharpness(x, val(M14["sharpness"])).tolist() == [[[[0, 0, 0], [0, 125, 0], [0, 0, 0]]]]


def grid(h, w):
    return torch.arange(1, h * w + 1, dtype=torch.uint8).view(1, 1, h, w)


def test_shear_x_samples_pixel_centres_and_fills_zero():
    # output (x, y) reads input column floor(x + 0.5 + 0.14 (y + 0.5)): row 3 reads x (x + 0.99),
    # row 4 reads x + 1 (x + 1.13), the last column of row 4 falls outside: 0
    out = ra.shear_x(grid(5, 5), val(0.14))[0, 0]
    assert out[3].tolist() == [16, 17, 18, 19, 20]
    assert out[4].tolist() == [22, 23, 24, 25, 0]
    assert ra.shear_y(grid(5, 5), val(0.14))[0, 0][:, 4].tolist() == [10, 15, 20, 25, 0]  # the same along y


def test_translate_shifts_by_whole_pixels_and_m14_blanks_a_32px_image():
    out = ra.translate_x(grid(3, 4), val(1.0))[0, 0]  # column x reads x + 1: a shift to the left
    assert out.tolist() == [[2, 3, 4, 0], [6, 7, 8, 0], [10, 11, 12, 0]]
    assert ra.translate_y(grid(3, 4), val(-1.0))[0, 0].tolist() == [[0, 0, 0, 0], [1, 2, 3, 4], [5, 6, 7, 8]]
    images = torch.full((2, 3, 32, 32), 200, dtype=torch.uint8)
    v = M14["translate_x"]
    assert ra.translate_x(images, torch.tensor([v, -v], dtype=torch.float64)).eq(0).all()


def test_rotate_about_the_centre_with_pils_matrix():
    x = grid(5, 5)  # values 1..25, row by row
    assert torch.equal(ra.rotate(x, val(0.0)), x)
    # +14 degrees: PIL's inverse matrix sends output pixel (col, row), centre offset (dx, dy) from
    # (2.5, 2.5), to input (c dx - s dy + 2.5, s dx + c dy + 2.5), floored; c = 0.9703, s = 0.2419.
    # (2, 2): itself, 13.  (4, 2): (2, 0) -> (4.44, 2.98) -> input (4, 2) = 15.
    # (4, 0): (2, -2) -> (4.92, 1.04) -> input (4, 1) = 10.  (0, 0): (-2, -2) -> (1.04, 0.08) -> (1, 0) = 2.
    out = ra.rotate(x, val(14.0))[0, 0]
    assert [out[2, 2], out[2, 4], out[0, 4], out[0, 0]] == [13, 15, 10, 2]
    # 30 degrees: (0, 0) -> x = -2 (0.866) + 2 (0.5) + 2.5 = 1.77, y = -1 - 1.73 + 2.5 = -0.23: outside, 0
    assert ra.rotate(x, val(30.0))[0, 0, 0, 0] == 0


def test_cutout_square_fill_and_position():
    x = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    v = M14["cutout"]  # 18.67
    # u = 0.5 -> centre 32 + (1 - 32) 0.5 = 16.5 (NumPy's uniform(32)); start int(16.5 - 9.33) = 7,
    # stop int(7 + 18.67) = 25, inclusive: 19 pixels per side
    out = ra.cutout(x, val(v), torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    filled = out[0, 0] > 0
    assert filled.sum() == 19 * 19 and filled[7:26, 7:26].all()
    assert out[0, :, 10, 10].tolist() == [125, 123, 114]
    # v = 0 still fills one pixel: u = 0.5 -> centre 8 + (1 - 8) 0.5 = 4.5 -> pixel 4; grey images get 123
    grey = ra.cutout(torch.zeros(1, 1, 8, 8, dtype=torch.uint8), val(0.0), torch.full((1, 2), 0.5, dtype=torch.float64))
    assert grey.sum() == 123 and grey[0, 0, 4, 4] == 123


def test_rand_augment_is_reproducible_and_draws_per_image():
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    a = ra.rand_augment(images, 2, 14, torch.Generator().manual_seed(7))
    b = ra.rand_augment(images, 2, 14, torch.Generator().manual_seed(7))
    c = ra.rand_augment(images, 2, 14, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.uint8 and a.shape == images.shape
    assert torch.equal(ra.rand_augment(images, 0, 14, torch.Generator()), images)
    # per image: each result is one of the ops (N = 1) applied to that image alone
    gen = torch.Generator().manual_seed(3)
    one = ra.rand_augment(images[:16], 1, 14, gen)
    ops = torch.randint(len(ra.OPS), (16, 1), generator=torch.Generator().manual_seed(3))
    for i in range(16):
        op = ra.OPS[ops[i, 0]][0]
        if op in (ra.cutout, ra.rotate, ra.shear_x, ra.shear_y, ra.translate_x, ra.translate_y):
            continue  # these also draw a sign or a position
        assert torch.equal(one[i:i + 1], op(images[i:i + 1], val(ra.magnitude(14, *ra.OPS[ops[i, 0]][1:3]))))


# -----------------------------------------------------------------------------
# Against PIL, which the reference repository's randomaug.py calls (Pillow comes with matplotlib)


def pil_reference(name, image, v):
    """What randomaug.py does to a PIL image with value v (the sign already drawn)."""
    from PIL import Image, ImageEnhance, ImageOps

    affine = {"shear_x": (1, v, 0, 0, 1, 0), "shear_y": (1, 0, 0, v, 1, 0),
              "translate_x": (1, 0, v, 0, 1, 0), "translate_y": (1, 0, 0, 0, 1, v)}
    if name in affine:
        return image.transform(image.size, Image.AFFINE, affine[name])
    if name == "solarize_add":
        added = np.clip(np.array(image).astype(int) + v, 0, 255).astype(np.uint8)
        return ImageOps.solarize(Image.fromarray(added), 128)
    enhance = {"color": ImageEnhance.Color, "contrast": ImageEnhance.Contrast,
               "brightness": ImageEnhance.Brightness, "sharpness": ImageEnhance.Sharpness}
    if name in enhance:
        return enhance[name](image).enhance(v)
    return {"auto_contrast": lambda: ImageOps.autocontrast(image), "equalize": lambda: ImageOps.equalize(image),
            "invert": lambda: ImageOps.invert(image), "rotate": lambda: image.rotate(v),
            "posterize": lambda: ImageOps.posterize(image, max(1, int(v))),
            "solarize": lambda: ImageOps.solarize(image, v)}[name]()




def random_images(seed, channels, h=32, w=32, n=6):
    """Uniform noise, narrow ranges, two-level images and clipped normals: every op's edge cases."""
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (channels, h, w)), rng.integers(40, 90, (channels, h, w)),
              (rng.random((channels, h, w)) < 0.3) * 200 + 20, np.clip(rng.normal(128, 60, (channels, h, w)), 0, 255),
              np.full((channels, h, w), 77), rng.integers(0, 3, (channels, h, w)) * 127]
    return torch.tensor(np.stack(images[:n]), dtype=torch.uint8)


@pytest.mark.parametrize("channels, h, w", [(3, 32, 32), (1, 32, 32), (3, 7, 9)])
def test_every_op_matches_pil_pixel_for_pixel(channels, h, w):
    Image = pytest.importorskip("PIL.Image")
    images = random_images(channels + h, channels, h, w)
    rng = random.Random(0)
    for op, low, high, signed in ra.OPS:
        name = OP_NAMES[id(op)]
        if op is ra.cutout:
            continue  # below: it draws its position
        for m in (0, 7, 14, 22, 30):
            v = ra.magnitude(m, low, high) * (rng.choice([-1, 1]) if signed else 1)
            ours = op(images, torch.full((len(images),), v, dtype=torch.float64))
            for image, mine in zip(images, ours):
                array = image.permute(1, 2, 0).numpy()
                pil = pil_reference(name, Image.fromarray(array[:, :, 0] if channels == 1 else array), v)
                theirs = torch.from_numpy(np.array(pil)).view(h, w, channels).permute(2, 0, 1)
                assert torch.equal(mine, theirs), f"{name} at M={m} (v={v:.4f}) differs from PIL"


def test_cutout_matches_pil_rectangle():
    Image = pytest.importorskip("PIL.Image")
    from PIL import ImageDraw

    images = random_images(5, 3, 32, 32)
    u = torch.rand(len(images), 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for m in (0, 14, 30):
        v = ra.magnitude(m, 0, 40)
        ours = ra.cutout(images, torch.full((len(images),), v, dtype=torch.float64), u)
        for image, mine, (ux, uy) in zip(images, ours, u.tolist()):
            pil = Image.fromarray(image.permute(1, 2, 0).numpy())
            cx, cy = 32 + (1 - 32) * ux, 32 + (1 - 32) * uy  # np.random.uniform(32) with these uniforms
            x0, y0 = int(max(0, cx - v / 2.0)), int(max(0, cy - v / 2.0))
            ImageDraw.Draw(pil).rectangle((x0, y0, min(32, x0 + v), min(32, y0 + v)), ra.CUTOUT_RGB)
            assert torch.equal(mine, torch.from_numpy(np.array(pil)).permute(2, 0, 1)), f"cutout at M={m}"


# -----------------------------------------------------------------------------
# Against torchvision.transforms.v2.functional on tensors, where it is installed. Its tensor
# kernels follow PIL closely but not to the last level everywhere: where they round and PIL
# truncates (auto_contrast's float32 scale, the blends of colour and contrast, sharpness) the
# two may differ by one level; its rotation samples with grid_sample in float32 where PIL uses
# 16.16 fixed point, so a few pixels whose source lies on a pixel boundary differ.


def torchvision_reference(F, name, x, v):
    shear = math.degrees(math.atan(v)) if name.startswith("shear") else 0.0
    return {
        "auto_contrast": lambda: F.autocontrast(x), "equalize": lambda: F.equalize(x), "invert": lambda: F.invert(x),
        "rotate": lambda: F.rotate(x, v), "posterize": lambda: F.posterize(x, max(1, int(v))),
        "solarize": lambda: F.solarize(x, v), "color": lambda: F.adjust_saturation(x, v),
        "contrast": lambda: F.adjust_contrast(x, v), "brightness": lambda: F.adjust_brightness(x, v),
        "sharpness": lambda: F.adjust_sharpness(x, v),
        "shear_x": lambda: F.affine(x, angle=0.0, translate=[0, 0], scale=1.0, shear=[shear, 0.0], center=[0, 0]),
        "shear_y": lambda: F.affine(x, angle=0.0, translate=[0, 0], scale=1.0, shear=[0.0, shear], center=[0, 0]),
        "translate_x": lambda: F.affine(x, angle=0.0, translate=[-v, 0], scale=1.0, shear=[0.0, 0.0]),
        "translate_y": lambda: F.affine(x, angle=0.0, translate=[0, -v], scale=1.0, shear=[0.0, 0.0]),
    }[name]()


@pytest.mark.parametrize("channels", [3, 1])
def test_ops_against_torchvision(channels):
    F = pytest.importorskip("torchvision.transforms.v2.functional")
    images = random_images(channels, channels)
    for op, low, high, signed in ra.OPS:
        name = OP_NAMES[id(op)]
        if name in ("cutout", "solarize_add"):
            continue  # not in torchvision
        for m, sign in ((5, 1), (14, -1), (27, 1)):
            v = ra.magnitude(m, low, high) * (sign if signed else 1)
            ours = op(images, torch.full((len(images),), v, dtype=torch.float64)).int()
            theirs = torchvision_reference(F, name, images, v).int()
            if name == "rotate":
                assert (ours != theirs).float().mean() < 0.01, f"rotate at M={m}"
            elif name in ("auto_contrast", "color", "contrast", "sharpness"):
                assert (ours - theirs).abs().max() <= 1, f"{name} at M={m}"
            else:
                assert torch.equal(ours, theirs), f"{name} at M={m}"
