"""Issue 10, faithful media reading: 16-bit depth, EXIF orientation, alpha, greys and palettes,
multi-frame files, decompression bombs and video limits. Every file is made here (Pillow, a
hand-written 16-bit PNG, PyAV); expected pixels are computed plainly from what was written."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("PIL")
pytest.importorskip("av")

from PIL import Image  # noqa: E402

from atoken_rt import Limits, media  # noqa: E402
from atoken_rt.media import MediaError  # noqa: E402


def _png(path: Path, arr: np.ndarray | None, *, depth: int = 16, ctype: int | None = None,
         size: tuple[int, int] | None = None) -> Path:
    """A PNG written by hand (Pillow cannot write 16-bit colour): arr uint16 (H, W[, C]), filter
    0 on every row; or only a header of ``size`` (w, h) with an empty IDAT (never decoded)."""
    def chunk(tag, body):
        return struct.pack(">I", len(body)) + tag + body + \
            struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)
    if arr is None:
        (w, h), raw = size, b""
    else:
        arr = np.asarray(arr, dtype=">u2")
        h, w = arr.shape[:2]
        ch = 1 if arr.ndim == 2 else arr.shape[2]
        ctype = {1: 0, 2: 4, 3: 2, 4: 6}[ch]
        raw = zlib.compress(b"".join(b"\x00" + arr[r].tobytes() for r in range(h)))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth,
                                                                      ctype or 0, 0, 0, 0))
                     + chunk(b"IDAT", raw) + chunk(b"IEND", b""))
    return path


def _ramp(h=16, w=64):
    return np.tile(np.linspace(0, 65535, w).round().astype(np.uint16), (h, 1))


def _f(v16):
    """The full-precision reading: x / 65535 * 2 - 1 (float64 math, then float32)."""
    return (np.asarray(v16, np.float64) / 65535 * 2 - 1).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# bit depth
# ------------------------------------------------------------------------------------------------

def test_16bit_grey_ramp_keeps_full_precision(tmp_path):
    ramp = _ramp()
    notes = []
    got = media.read_image(_png(tmp_path / "g.png", ramp), notes=notes)
    assert got.dtype == np.float32 and got.shape == (16, 64, 3)
    np.testing.assert_array_equal(got, np.repeat(_f(ramp)[..., None], 3, axis=2))
    assert len(np.unique(got[0, :, 0])) == 64  # nothing saturates (was: 99.6% at 255)
    assert any("16-bit" in n for n in notes)


def test_16bit_rgb_ramp_keeps_full_precision(tmp_path):
    ramp = _ramp()
    rgb = np.stack([ramp, ramp[:, ::-1], (ramp // 3)], -1)
    got = media.read_image(_png(tmp_path / "rgb.png", rgb))
    np.testing.assert_array_equal(got, _f(rgb))


def test_16bit_rgba_composites_over_white(tmp_path):
    ramp = _ramp()
    alpha = np.full_like(ramp, 32768)
    rgba = np.stack([ramp, ramp, ramp, alpha], -1)
    notes = []
    got = media.read_image(_png(tmp_path / "rgba.png", rgba), notes=notes)
    a = 32768 / 65535
    want = _f(ramp.astype(np.float64) * a + 65535 * (1 - a))
    np.testing.assert_allclose(got, np.repeat(want[..., None], 3, axis=2), atol=1e-6)
    assert any("alpha composited over white" in n for n in notes)


def test_cli_reads_16bit_as_float_for_the_session(tmp_path):
    loaded = media.load(_png(tmp_path / "g.png", _ramp()))
    assert loaded.kind == "image" and loaded.data.dtype == np.float32
    assert loaded.mode == "I;16"


# ------------------------------------------------------------------------------------------------
# EXIF orientation
# ------------------------------------------------------------------------------------------------

def _upright(stored: np.ndarray, orient: int) -> np.ndarray:
    """The displayed image for an EXIF orientation, pixel by pixel (index formulas)."""
    h, w = stored.shape[:2]
    swap = orient in (5, 6, 7, 8)
    oh, ow = (w, h) if swap else (h, w)
    out = np.empty((oh, ow, 3), stored.dtype)
    for i in range(oh):
        for j in range(ow):
            r, c = {1: (i, j), 2: (i, w - 1 - j), 3: (h - 1 - i, w - 1 - j), 4: (h - 1 - i, j),
                    5: (j, i), 6: (h - 1 - j, i), 7: (h - 1 - j, w - 1 - i),
                    8: (j, w - 1 - i)}[orient]
            out[i, j] = stored[r, c]
    return out


@pytest.mark.parametrize("orient", range(1, 9))
def test_exif_orientation_is_applied(tmp_path, orient):
    stored = np.random.default_rng(orient).integers(0, 256, (16, 32, 3), dtype=np.uint8)
    im = Image.fromarray(stored)
    exif = Image.Exif()
    exif[0x0112] = orient
    path = tmp_path / "o.png"
    im.save(path, exif=exif)
    notes = []
    got = media.read_image(path, notes=notes)
    np.testing.assert_array_equal(got, _upright(stored, orient))
    with Image.open(path) as ref:  # the same as Pillow's own reference transform
        from PIL import ImageOps
        np.testing.assert_array_equal(got, np.asarray(ImageOps.exif_transpose(ref)))
    assert any("EXIF orientation" in n for n in notes) == (orient != 1)


def test_exif_rotated_jpeg_is_upright(tmp_path):
    stored = np.zeros((32, 64, 3), np.uint8)
    stored[:, :32] = 255  # left half white in the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # a phone held upright: shown rotated 90 degrees clockwise
    path = tmp_path / "phone.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    got = media.read_image(path)
    assert got.shape == (64, 32, 3)  # portrait, as shown
    want = _upright(stored, 6)
    assert np.abs(got.astype(int) - want.astype(int)).max() < 40  # JPEG ringing at the edge
    assert got[:28].min() > 200 and got[36:].max() < 60  # the white half is on top


# ------------------------------------------------------------------------------------------------
# alpha, greys, palettes
# ------------------------------------------------------------------------------------------------

def _over_white(rgb, a):
    a = a.astype(np.float64)[..., None] / 255
    return np.rint(rgb.astype(np.float64) * a + 255 * (1 - a)).astype(np.uint8)


def test_rgba_png_composited_over_white_and_noted(tmp_path):
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, (16, 16, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    loaded = media.load(tmp_path / "a.png")
    np.testing.assert_array_equal(loaded.data, _over_white(rgba[..., :3], rgba[..., 3]))
    assert loaded.mode == "RGBA"
    assert any(n.startswith("alpha composited over white") for n in loaded.notes)


def test_opaque_alpha_is_dropped_with_a_note(tmp_path):
    rgba = np.random.default_rng(2).integers(0, 256, (16, 16, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    notes = []
    np.testing.assert_array_equal(media.read_image(tmp_path / "a.png", notes=notes),
                                  rgba[..., :3])
    assert notes == ["alpha channel dropped (every pixel opaque)"]


def test_la_png(tmp_path):
    la = np.random.default_rng(3).integers(0, 256, (16, 16, 2), dtype=np.uint8)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    loaded = media.load(tmp_path / "la.png")
    grey = np.repeat(la[..., :1], 3, axis=2)
    np.testing.assert_array_equal(loaded.data, _over_white(grey, la[..., 1]))
    assert loaded.mode == "LA" and any("grayscale" in n for n in loaded.notes)


def test_grey_png_records_its_mode(tmp_path):
    g = np.random.default_rng(4).integers(0, 256, (16, 24), dtype=np.uint8)
    Image.fromarray(g, "L").save(tmp_path / "g.png")
    loaded = media.load(tmp_path / "g.png")
    np.testing.assert_array_equal(loaded.data, np.repeat(g[..., None], 3, axis=2))
    assert loaded.mode == "L"
    assert loaded.notes == ["grayscale (L) expanded to 3 equal channels"]


def test_palette_png_with_transparency(tmp_path):
    palette = [0, 0, 0, 255, 0, 0, 0, 255, 0, 10, 20, 30] + [0] * (256 * 3 - 12)
    idx = np.random.default_rng(5).integers(0, 4, (16, 16), dtype=np.uint8)
    im = Image.fromarray(idx, "P")
    im.putpalette(palette)
    im.save(tmp_path / "p.png", transparency=0)  # palette entry 0 fully transparent
    loaded = media.load(tmp_path / "p.png")
    pal = np.array(palette[:12], np.uint8).reshape(4, 3)
    alpha = np.where(idx == 0, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(loaded.data, _over_white(pal[idx], alpha))
    assert loaded.mode == "P"
    im.save(tmp_path / "q.png")  # no transparency: just the palette colours, no note
    loaded = media.load(tmp_path / "q.png")
    np.testing.assert_array_equal(loaded.data, pal[idx])
    assert loaded.notes == []


# ------------------------------------------------------------------------------------------------
# multi-frame files
# ------------------------------------------------------------------------------------------------

def _gif(path, n=5, duration=50):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (9, 9, 9)]
    frames = [np.full((16, 32, 3), colours[i % len(colours)], np.uint8) for i in range(n)]
    for i, f in enumerate(frames):
        f[:, i] = 255  # each frame differs in a column too (no frame is optimised away)
    ims = [Image.fromarray(f) for f in frames]
    ims[0].save(path, save_all=True, append_images=ims[1:], duration=duration, loop=0)
    return np.stack(frames)


def test_animated_gif_is_read_as_a_video(tmp_path):
    want = _gif(tmp_path / "a.gif")
    loaded = media.load(tmp_path / "a.gif")
    assert loaded.kind == "video" and loaded.shape == (5, 16, 32, 3)
    np.testing.assert_array_equal(loaded.data, want)
    assert loaded.fps == pytest.approx(20.0)
    assert any("5 frames read as a video" in n for n in loaded.notes)
    notes = []
    np.testing.assert_array_equal(media.read_image(tmp_path / "a.gif", notes=notes), want[0])
    assert "5 frames: frame 1 used, 4 dropped" in notes


def test_animation_within_limits(tmp_path):
    _gif(tmp_path / "a.gif", n=6)
    with pytest.raises(MediaError, match=r"a.gif: more than 5 frames \(Limits.max_frames\)"):
        media.load(tmp_path / "a.gif", Limits(max_frames=5))


def test_multipage_tiff_notes_the_dropped_pages(tmp_path):
    pages = [Image.fromarray(np.full((16, 16, 3), v, np.uint8)) for v in (10, 20, 30)]
    pages[0].save(tmp_path / "m.tif", save_all=True, append_images=pages[1:])
    loaded = media.load(tmp_path / "m.tif")
    assert loaded.kind == "image" and int(loaded.data.max()) == 10
    assert "3 frames: frame 1 used, 2 dropped" in loaded.notes


# ------------------------------------------------------------------------------------------------
# sizes: decompression bombs, limits, videos
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("side", [20000, 10000])  # Pillow's error (>178M px), its warning (>89M)
def test_decompression_bomb_is_a_clean_media_error(tmp_path, side):
    path = _png(tmp_path / "bomb.png", None, depth=1, size=(side, side))
    assert path.stat().st_size < 100
    with pytest.raises(MediaError, match=rf"bomb.png: .*{side}x{side}|bomb.png: refused as a "
                                         r"decompression bomb"):
        media.read_image(path, limits=Limits(max_pixels=10 ** 12))
    with pytest.raises(MediaError, match=r"bomb.png: .*(limit|max_pixels)"):
        media.read_image(path)


def test_image_over_max_pixels_fails_from_the_header(tmp_path):
    path = _png(tmp_path / "big.png", None, depth=8, size=(5000, 5000))  # 25M > 16.7M pixels
    with pytest.raises(MediaError, match=r"big.png: 5000x5000 = 25000000 pixels exceed the "
                                         r"limit of 16777216"):
        media.load(path)


def test_video_is_read_frame_by_frame_within_limits(tmp_path):
    frames = np.random.default_rng(0).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    path = media.write_video(tmp_path / "v.mp4", frames, 12)
    assert media.read_video(path)[0].shape == (12, 32, 32, 3)
    with pytest.raises(MediaError, match=r"v.mp4: more than 8 frames \(Limits.max_frames"):
        media.read_video(path, limits=Limits(max_frames=8))
    with pytest.raises(MediaError, match=r"v.mp4: 8 frames of 32x32 make 8 tokens, more than "
                                         r"the limit of 7"):
        media.load(path, Limits(max_tokens_per_sample=7))
    with pytest.raises(MediaError, match=r"v.mp4: 32x32 = 1024 pixels exceed the limit of 1000"):
        media.read_video(path, limits=Limits(max_pixels=1000))


def test_cli_records_source_mode_and_read_notes(tmp_path):
    from atoken_rt import cli

    from .conftest import WEIGHTS
    rgba = np.random.default_rng(1).integers(0, 256, (32, 32, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = tmp_path / "t.safetensors"
    assert cli.main(["encode", str(tmp_path / "a.png"), "--out", str(out), "--config",
                     "tiny-sod", "--checkpoint", str(WEIGHTS), "--device", "cpu", "--quiet"]) == 0
    from safetensors import safe_open
    with safe_open(str(out), framework="pt") as f:
        sample = json.loads(f.metadata()["atoken_rt"])["samples"][0]
    assert sample["source_mode"] == "RGBA"
    assert sample["read_notes"][0].startswith("alpha composited over white")


def test_missing_path_is_named_as_missing(tmp_path):
    """A typo'd path is "no such file", not an unsupported file type (what the CLI printed)."""
    with pytest.raises(MediaError, match=r"nope: no such file or folder"):
        media.kind_of(tmp_path / "nope")
    (tmp_path / "notes").write_text("x")
    with pytest.raises(MediaError, match=r"unsupported file type"):
        media.kind_of(tmp_path / "notes")
