"""Every PIL mode reaches the model as 8-bit RGB with its values scaled by the mode's range, checked
pixel by pixel on real files written and reopened by Pillow."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fp8vl.errors import FP8VLError
from fp8vl.inputs.images import load_image, open_rgb, to_rgb
from fp8vl.inputs.prompts import open_image
from helpers import _exif_rotated, _photo

WHITE = (255, 255, 255)


def rgb(im) -> np.ndarray:
    out = to_rgb(im)
    assert out.mode == "RGB"
    return np.asarray(out).astype(int)


def gray(a: np.ndarray) -> np.ndarray:
    """The R channel, after checking R = G = B."""
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
    return a[..., 0]


def test_mid_grey_16_bit_png_arrives_mid_grey(tmp_path):
    Image.fromarray(np.full((64, 48), 32768, np.uint16)).save(tmp_path / "grey16.png")
    with Image.open(tmp_path / "grey16.png") as im:
        assert im.mode.startswith("I")              # Pillow keeps the 16 bits
    for im in (load_image(tmp_path / "grey16.png"), open_rgb(tmp_path / "grey16.png"),
               open_image(str(tmp_path / "grey16.png"))):
        a = gray(np.asarray(im).astype(int))
        assert abs(a.mean() - 127.5) <= 0.5 and a.min() == a.max()


def test_16_bit_ramp_is_scaled_by_65535_in_both_byte_orders(tmp_path):
    ramp = np.linspace(0, 65535, 256 * 4).astype(np.uint16).reshape(4, 256)
    want = np.rint(ramp / 257).astype(int)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    assert (gray(np.asarray(open_rgb(tmp_path / "ramp.png")).astype(int)) == want).all()
    big = Image.frombytes("I;16B", (256, 4), ramp.astype(">u2").tobytes())
    assert big.mode == "I;16B" and (gray(rgb(big)) == want).all()
    Image.frombytes("I;16", (256, 4), ramp.astype("<u2").tobytes()).save(tmp_path / "ramp.tif")
    assert (gray(np.asarray(open_rgb(tmp_path / "ramp.tif")).astype(int)) == want).all()


def test_32_bit_integer_and_float_modes():
    ramp = np.linspace(0, 65535, 512).reshape(2, 256)
    i16 = Image.fromarray(ramp.astype(np.int32), "I")             # how older Pillow opens 16-bit PNGs
    assert (gray(rgb(i16)) == np.rint(ramp.astype(np.int32) / 257)).all()
    wide = Image.fromarray(np.array([[-1000, 0], [1000, 3000]], np.int32), "I")   # not 16-bit: its own range
    assert gray(rgb(wide)).tolist() == [[0, 64], [128, 255]]
    unit = Image.fromarray(np.array([[0.0, 0.5], [0.25, 1.0]], np.float32), "F")
    assert gray(rgb(unit)).tolist() == [[0, 128], [64, 255]]
    bytes_f = Image.fromarray(np.array([[0.0, 17.0], [128.0, 255.0]], np.float32), "F")
    assert gray(rgb(bytes_f)).tolist() == [[0, 17], [128, 255]]
    odd = Image.fromarray(np.array([[-2.0, np.nan], [0.0, 2.0]], np.float32), "F")   # NaN as 0, then min-max
    assert gray(rgb(odd)).tolist() == [[0, 128], [128, 255]]


def test_alpha_modes_go_onto_white_with_the_right_weight():
    la = Image.fromarray(np.array([[[0, 0], [0, 255], [0, 128]]], np.uint8), "LA")   # black: clear, opaque, half
    assert gray(rgb(la))[0].tolist() == [255, 0, 127]
    rgba = Image.new("RGBA", (2, 1), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (255, 0, 0, 0))
    assert rgb(rgba)[0].tolist() == [[255, 0, 0], list(WHITE)]
    assert rgb(rgba.convert("RGBa"))[0].tolist() == [[255, 0, 0], list(WHITE)]
    assert gray(rgb(la.convert("La")))[0].tolist()[:2] == [255, 0]
    p = Image.new("P", (2, 1))
    p.putpalette([0, 0, 255] + [10, 200, 10] * 255)
    p.putpixel((1, 0), 1)
    p.info["transparency"] = 0                                    # palette entry 0 (blue) is transparent
    assert rgb(p)[0].tolist() == [list(WHITE), [10, 200, 10]]
    pa = Image.new("PA", (1, 1), (1, 255))
    pa.putpalette([0, 0, 0, 9, 99, 199] + [0, 0, 0] * 254)
    assert rgb(pa)[0].tolist() == [[9, 99, 199]]


def test_other_modes_convert_as_pillow_defines_them():
    cmyk = Image.new("CMYK", (1, 1), (0, 0, 0, 128))              # half black ink: mid grey
    assert abs(rgb(cmyk)[0, 0] - 127).max() <= 1
    one = Image.fromarray(np.array([[True, False]]))
    assert one.mode == "1" and gray(rgb(one)).tolist() == [[255, 0]]
    ycc = Image.new("YCbCr", (1, 1), (128, 128, 128))              # Y = 128, no chroma: grey 128
    assert abs(rgb(ycc)[0, 0] - 128).max() <= 1
    assert rgb(Image.new("L", (1, 1), 77))[0, 0].tolist() == [77, 77, 77]
    assert rgb(Image.new("RGB", (1, 1), (1, 2, 3)))[0, 0].tolist() == [1, 2, 3]


@pytest.mark.parametrize("name", ["horse", "shepp_logan_phantom", "logo", "stereo_motorcycle", "camera"])
def test_bundled_photos_of_every_dtype_open_as_rgb(name):
    a = np.asarray(open_image(f"skimage:{name}")).astype(int)
    assert a.ndim == 3 and a.shape[2] == 3 and a.max() > 200 and a.min() < 60   # not blank, not clipped


def test_load_image_applies_exif_and_never_upscales(tmp_path):
    im = load_image(_exif_rotated(tmp_path / "r.jpg"), 512)
    assert im.size == (200, 300)                                 # stored 300x200, shown upright
    px = np.asarray(im)
    assert px[5, -5, 0] > 200 and px[5, -5, 1] < 60              # the red corner went to the top right
    assert not (px[5, 5, 0] > 200 and px[5, 5, 1] < 60)
    _photo("coffee").save(tmp_path / "coffee.png")               # 600x400
    assert load_image(tmp_path / "coffee.png", 300).size == (300, 200)
    assert load_image(tmp_path / "coffee.png", 4096).size == (600, 400)
    _photo("logo").save(tmp_path / "logo.png")                   # RGBA: transparent parts on white
    logo = load_image(tmp_path / "logo.png", 64)
    assert logo.mode == "RGB" and max(logo.size) == 64 and logo.getpixel((0, 0)) == (255, 255, 255)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(FP8VLError, match="bad.jpg"):
        load_image(tmp_path / "bad.jpg")
