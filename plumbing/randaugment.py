"""
RandAugment(N, M) on batches of uint8 images, in torch, on any device.

The paper's ViT recipe (section 5.2) is that of kentaroy47/vision-transformers-cifar10,
whose train_cifar10.py puts RandAugment(N=2, M=14) from its randomaug.py in front of the
random crop and flip. That file applies, per image, N operations drawn with replacement
from 16, each at the value `M / 30 * (max - min) + min` of its range; rotations, shears
and translations flip the sign of that value with probability 1/2. It works on PIL images;
here every operation reproduces what PIL computes, pixel for pixel (the tests compare
them where Pillow is installed), on a (batch, channels, H, W) uint8 tensor:

    op               range       at M = 14             what PIL does
    auto_contrast    -           -                     stretch each channel to 0..255
    equalize         -           -                     histogram equalisation per channel
    invert           -           -                     255 - x
    rotate           0..30       +-14 degrees          about the centre, nearest pixel, fill 0
    posterize        0..4        keep 1 bit            int(v), at least 1 bit kept
    solarize         0..256      threshold 119.5       x >= threshold -> 255 - x
    solarize_add     0..110      add 51.3              min(x + v, 255), then solarize at 128
    color            0.1..1.9    factor 0.94           blend with the grey image
    contrast         0.1..1.9    factor 0.94           blend with the mean grey level
    brightness       0.1..1.9    factor 0.94           blend with black
    sharpness        0.1..1.9    factor 0.94           blend with PIL's SMOOTH filter
    shear_x/y        0..0.3      +-0.14                affine (1, v, 0, 0, 1, 0), nearest, fill 0
    cutout           0..40       18.7 pixel square     random position, colour (125, 123, 114)
    translate_x/y    0..100      +-46.7 pixels         shift by v pixels (at 32x32: a blank image)

Where the reference cannot run, a choice is made and said: on one-channel images (it
handles only RGB) the cutout fill is the grey level of its colour, 123, and colour is the
identity (as PIL's Color is for grey images). Its random numbers come from Python's and
NumPy's generators; here they come from the torch.Generator passed in, so a fixed seed
gives the same batch on every run and a resumed run replays its epochs exactly.
"""

import math

import torch

# -----------------------------------------------------------------------------
# Colour operations. Each takes x (b, C, H, W) uint8 and v, a (b,) float64 CPU tensor of
# values (one per image), and returns uint8.


def per_image(v, x):
    """v on x's device, shaped to broadcast over each image."""
    return v.to(x.device).view(-1, 1, 1, 1)


def auto_contrast(x, v):
    """PIL ImageOps.autocontrast: per channel, lo..hi -> 0..255 by int(i * scale + offset)."""
    lo = x.amin(dim=(-2, -1), keepdim=True).double()
    hi = x.amax(dim=(-2, -1), keepdim=True).double()
    scale = torch.full_like(lo, 255.0) / (hi - lo).clamp_min(1)  # not 255.0 / t: torch takes 1/t first
    offset = -lo * scale
    stretched = (x.double() * scale + offset).trunc().clamp(0, 255).to(torch.uint8)
    return torch.where(hi > lo, stretched, x)  # a flat channel is left alone


def equalize(x, v):
    """PIL ImageOps.equalize: per channel, lut[i] = (step // 2 + #pixels below i) // step with
    step = (#pixels - #pixels at the highest level) // 255, clipped to 255."""
    b, c, h, w = x.shape
    flat = x.reshape(b * c, h * w).long()
    hist = torch.zeros(b * c, 256, dtype=torch.long, device=x.device).scatter_add_(1, flat, torch.ones_like(flat))
    top = 255 - (hist.flip(1) > 0).long().argmax(dim=1, keepdim=True)  # the highest level present
    step = (h * w - hist.gather(1, top)) // 255
    below = hist.cumsum(1) - hist  # pixels strictly below each level
    lut = ((step // 2 + below) // step.clamp_min(1)).clamp(max=255)
    equalized = lut.gather(1, flat).to(torch.uint8)
    keep = (step == 0) | ((hist > 0).sum(1, keepdim=True) <= 1)  # PIL leaves these channels alone
    return torch.where(keep, flat.to(torch.uint8), equalized).view(b, c, h, w)


def invert(x, v):
    return 255 - x


def posterize(x, v):
    """PIL ImageOps.posterize(max(1, int(v))): keep the top bits of each value."""
    bits = v.trunc().clamp(1, 8).long()
    return x & per_image((256 - (1 << (8 - bits))).to(torch.uint8), x)


def solarize(x, v):
    """PIL ImageOps.solarize(threshold v): values >= v are inverted."""
    threshold = per_image(v.ceil(), x)  # i < v  <=>  i < ceil(v) for integers i
    return torch.where(x < threshold, x, 255 - x)


def solarize_add(x, v):
    """randomaug.py's SolarizeAdd: uint8(clip(x + v, 0, 255)), then solarize at 128."""
    added = (x.double() + per_image(v, x)).clamp(0, 255).trunc().to(torch.uint8)
    return torch.where(added < 128, added, 255 - added)


def blend(degenerate, x, v):
    """PIL Image.blend(degenerate, x, v), in float32 as PIL's C code: uint8(d + v (x - d)),
    truncated and clipped. PIL's colour, contrast, brightness and sharpness are all this."""
    d = degenerate.float()
    return (d + per_image(v.float(), x) * (x.float() - d)).clamp(0, 255).trunc().to(torch.uint8)


def grey(x):
    """PIL's RGB -> L conversion, (19595 R + 38470 G + 7471 B + 2^15) >> 16; L stays L."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.long().unbind(1)
    return ((19595 * r + 38470 * g + 7471 * b + 32768) >> 16).to(torch.uint8).unsqueeze(1)


def color(x, v):
    """PIL ImageEnhance.Color: blend with the grey image (the identity for grey images)."""
    return blend(grey(x).expand_as(x), x, v)


def contrast(x, v):
    """PIL ImageEnhance.Contrast: blend with the mean grey level, int(mean + 0.5)."""
    g = grey(x)
    mean = (g.sum(dim=(1, 2, 3), dtype=torch.float64) / g[0].numel() + 0.5).floor()
    return blend(mean.view(-1, 1, 1, 1).expand_as(x), x, v)


def brightness(x, v):
    """PIL ImageEnhance.Brightness: blend with black."""
    return blend(torch.zeros_like(x), x, v)


def smooth(x):
    """PIL's ImageFilter.SMOOTH, kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, as its C code
    sums it in float32 (row below, centre row, row above; +0.5, then truncated); the
    one-pixel border is copied unchanged."""
    edge, centre = torch.tensor(1 / 13, dtype=torch.float32), torch.tensor(5 / 13, dtype=torch.float32)
    p = x.float()

    def row(r, k):  # PIL's KERNEL1x3: x[i-1] k[0] + x[i] k[1] + x[i+1] k[2], left to right
        return p[..., r, :-2] * edge + p[..., r, 1:-1] * k + p[..., r, 2:] * edge

    h = x.shape[-2]
    below, middle, above = row(slice(2, h), edge), row(slice(1, h - 1), centre), row(slice(0, h - 2), edge)
    inner = (((0.5 + below) + middle) + above).clamp(0, 255).trunc().to(torch.uint8)
    out = x.clone()
    out[..., 1:-1, 1:-1] = inner
    return out


def sharpness(x, v):
    """PIL ImageEnhance.Sharpness: blend with the smoothed image."""
    return blend(smooth(x), x, v)


# -----------------------------------------------------------------------------
# Geometric operations: PIL's nearest-neighbour affine transform, as integer index tables.
# PIL maps each output pixel (x, y) to the input pixel at
#     (a0 (x + 1/2) + a1 (y + 1/2) + a2,  a3 (x + 1/2) + a4 (y + 1/2) + a5), floored,
# in 16.16 fixed point for rotations and shears (its affine_fixed) and in float64 for
# pure shifts (its ImagingScaleAffine); pixels that land outside are 0.


def fixed_point_tables(a, h, w):
    """Source rows and columns (h, w) of PIL's affine_fixed for the matrix a (6 floats)."""
    fix = lambda value: math.floor(value * 65536.0 + 0.5)  # noqa: E731  (PIL's FIX macro)
    a0, a1, a3, a4 = fix(a[0]), fix(a[1]), fix(a[3]), fix(a[4])
    a2, a5 = fix(a[2] + a[0] * 0.5 + a[1] * 0.5), fix(a[5] + a[3] * 0.5 + a[4] * 0.5)
    ys, xs = torch.arange(h).view(-1, 1), torch.arange(w).view(1, -1)
    return (a5 + ys * a4 + xs * a3) >> 16, (a2 + ys * a1 + xs * a0) >> 16


def shift_tables(dx, dy, h, w):
    """Source rows and columns of PIL's ImagingScaleAffine for the matrix (1, 0, dx, 0, 1, dy):
    its float64 running positions, floored, -1 where negative."""
    def positions(start, n):
        out, p = [], start + 0.5
        for _ in range(n):
            out.append(-1 if p < 0 else int(p))
            p += 1.0
        return torch.tensor(out)

    return positions(dy, h).view(-1, 1).expand(h, w), positions(dx, w).view(1, -1).expand(h, w)


def rotation_matrix(degrees, h, w):
    """The inverse affine matrix PIL's Image.rotate(degrees) builds: about (w/2, h/2)."""
    angle = -math.radians(degrees % 360.0)
    c, s = round(math.cos(angle), 15), round(math.sin(angle), 15)
    cx, cy = w / 2, h / 2
    return [c, s, c * -cx + s * -cy + 0.0 + cx, -s, c, -s * -cx + c * -cy + 0.0 + cy]


def remap(x, rows, cols):
    """out[..., i, j] = x[..., rows[i, j], cols[i, j]], 0 where the source lies outside."""
    h, w = x.shape[-2:]
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    index = torch.where(inside, rows * w + cols, h * w).to(x.device)  # h * w: an appended 0 pixel
    flat = torch.cat([x.flatten(-2), x.new_zeros(*x.shape[:-2], 1)], dim=-1)
    return flat[..., index.flatten()].view_as(x)


def by_value(tables):
    """An op that remaps each image with tables(v, h, w), the images that share a value at once
    (v is per image: a magnitude with a random sign, so at most two distinct values)."""
    def op(x, v):
        h, w = x.shape[-2:]
        out = torch.empty_like(x)
        for value in v.unique().tolist():
            same = (v == value).nonzero().flatten().to(x.device)
            out[same] = remap(x[same], *tables(value, h, w))
        return out

    return op


rotate = by_value(lambda v, h, w: fixed_point_tables(rotation_matrix(v, h, w), h, w))
shear_x = by_value(lambda v, h, w: fixed_point_tables([1, v, 0, 0, 1, 0], h, w))
shear_y = by_value(lambda v, h, w: fixed_point_tables([1, 0, 0, v, 1, 0], h, w))
translate_x = by_value(lambda v, h, w: shift_tables(v, 0.0, h, w))
translate_y = by_value(lambda v, h, w: shift_tables(0.0, v, h, w))

CUTOUT_RGB = (125, 123, 114)  # randomaug.py's fill colour; grey images get its grey level, 123


def cutout(x, v, u):
    """randomaug.py's CutoutAbs: a square of side v filled with CUTOUT_RGB. Its corner is
    int(max(0, c - v / 2)) for a centre c drawn by np.random.uniform(w), which is NumPy's
    uniform(low=w, high=1): c = w + (1 - w) u lies in (1, w], not in [0, w). u (b, 2): the
    uniforms for x and y. PIL fills columns x0..int(min(w, x0 + v)) inclusive, rows alike."""
    b, c, h, w = x.shape
    size = torch.tensor([w, h], dtype=torch.float64)
    centre = size + (1 - size) * u  # (b, 2): x, y
    start = (centre - v.view(-1, 1) / 2).clamp_min(0).trunc()
    stop = torch.minimum(start + v.view(-1, 1), size).trunc()  # inclusive
    cols, rows = torch.arange(w), torch.arange(h)
    in_cols = (cols >= start[:, :1]) & (cols <= stop[:, :1])
    in_rows = (rows >= start[:, 1:]) & (rows <= stop[:, 1:])
    square = (in_rows[:, :, None] & in_cols[:, None, :]).unsqueeze(1).to(x.device)  # (b, 1, h, w)
    fill = torch.tensor(CUTOUT_RGB if c == 3 else [123] * c, dtype=torch.uint8, device=x.device)
    return torch.where(square, fill.view(1, c, 1, 1), x)


# -----------------------------------------------------------------------------
# RandAugment

# randomaug.py's augment_list(): (operation, min, max, draws a random sign), in its order.
OPS = [
    (auto_contrast, 0, 1, False),
    (equalize, 0, 1, False),
    (invert, 0, 1, False),
    (rotate, 0, 30, True),
    (posterize, 0, 4, False),
    (solarize, 0, 256, False),
    (solarize_add, 0, 110, False),
    (color, 0.1, 1.9, False),
    (contrast, 0.1, 1.9, False),
    (brightness, 0.1, 1.9, False),
    (sharpness, 0.1, 1.9, False),
    (shear_x, 0.0, 0.3, True),
    (shear_y, 0.0, 0.3, True),
    (cutout, 0, 40, False),
    (translate_x, 0.0, 100, True),
    (translate_y, 0.0, 100, True),
]


def magnitude(m, low, high):
    """randomaug.py's value of an op at magnitude m (0..30): m / 30 * (max - min) + min."""
    return (float(m) / 30) * float(high - low) + low


def rand_augment(images, n, m, generator):
    """Apply n operations, drawn per image with replacement from OPS, at magnitude m, to a
    uint8 batch (b, C, H, W) on any device. Every random number is drawn on the CPU from
    `generator` (so a GPU batch needs no host sync), in one fixed order per batch."""
    b = images.shape[0]
    ops = torch.randint(len(OPS), (b, n), generator=generator)
    signs = torch.where(torch.rand(b, n, generator=generator) < 0.5, -1.0, 1.0).double()
    corners = torch.rand(b, n, 2, generator=generator, dtype=torch.float64)
    out = images.clone()
    for j in range(n):
        for k, (op, low, high, signed) in enumerate(OPS):
            chosen = (ops[:, j] == k).nonzero().flatten()
            if len(chosen) == 0:
                continue
            v = torch.full((len(chosen),), magnitude(m, low, high), dtype=torch.float64)
            if signed:
                v = v * signs[chosen, j]
            rows = chosen.to(images.device)
            out[rows] = cutout(out[rows], v, corners[chosen, j]) if op is cutout else op(out[rows], v)
    return out
