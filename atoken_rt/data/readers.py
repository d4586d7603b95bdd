"""Reading items: decode, resize, centre crop, cut videos into clips, check the limits.

:func:`read_chunk` turns a run of consecutive items into a stream of records, in item order:

* :class:`Sample`: one image, video clip or 3D asset ready for ``Session.encode`` (uint8
  pixels or :class:`~atoken_rt.Voxels`) with what was done to it;
* :class:`Failure`: an item (``clip = -1``) or one clip of it that could not be read or is over a
  limit, with the reason;
* :class:`ItemDone`: the item is finished (every Sample and Failure of it came before).

Images go through :func:`atoken_rt.media.read_image` (files, or the bytes of a tar member or a
Parquet cell). Videos are streamed frame by frame with PyAV (``media.read_video`` holds every
frame of a file, which hours of video cannot afford); frames are resized as they arrive and at
most one clip plus its stride is held. Clips: ``clip_frames`` frames starting every
``clip_stride`` frames, ending with the first clip that reaches the last frame (a shorter tail is
cut by the model's 4-frame rule, which the row reports). 16 is the model's temporal chunk, so
16-frame clips give exactly the tokens of the whole-video encode.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .. import media
from ..inputs import PATCH_H, PATCH_T, PATCH_W, Voxels
from ..limits import DEFAULT_LIMITS, Limits
from .sources import MAX_INPUT_BYTES, MAX_ROW_GROUP_BYTES, Item, find_image_column

CHUNK_FRAMES = 16  # frames per temporal chunk of the model (4 latent frames x 4)


@dataclass(frozen=True)
class Preprocess:
    """What is done to every sample before encoding (part of the dataset's fingerprint).

    resize: short side in pixels (aspect kept, bicubic, up or down), or None.
    crop: (height, width) centre crop after the resize (clamped to the frame), or None.
    clip_frames, clip_stride: video clips (a multiple of 4; 16 = the model's chunk, lossless).
    limits: per-sample size limits; a sample over one is a failure.
    image_column, key_column: Parquet columns (None: detect the image column / use file#row).
    """

    resize: int | None = None
    crop: tuple[int, int] | None = None
    clip_frames: int = CHUNK_FRAMES
    clip_stride: int = CHUNK_FRAMES
    limits: Limits = DEFAULT_LIMITS
    image_column: str | None = None
    key_column: str | None = None

    def __post_init__(self):
        if self.resize is not None and (not isinstance(self.resize, int) or self.resize < PATCH_H):
            raise ValueError(f"resize: a short side of at least {PATCH_H} pixels, got "
                             f"{self.resize!r}")
        if self.crop is not None:
            if (len(self.crop) != 2 or any(not isinstance(c, int) or c < PATCH_H
                                            for c in self.crop)):
                raise ValueError(f"crop: (height, width) of at least {PATCH_H} pixels each, got "
                                 f"{self.crop!r}")
        if not isinstance(self.clip_frames, int) or self.clip_frames < PATCH_T \
                or self.clip_frames % PATCH_T:
            raise ValueError(f"clip_frames: a positive multiple of {PATCH_T}, got "
                             f"{self.clip_frames!r}")
        if not isinstance(self.clip_stride, int) or self.clip_stride < 1:
            raise ValueError(f"clip_stride: a positive integer, got {self.clip_stride!r}")

    def as_dict(self) -> dict:
        return {"resize": self.resize, "crop": list(self.crop) if self.crop else None,
                "clip_frames": self.clip_frames, "clip_stride": self.clip_stride,
                "limits": dict(vars(self.limits)), "image_column": self.image_column,
                "key_column": self.key_column}


@dataclass
class Sample:
    """One sample for the encoder. pos: the item's position in the dataset; clip: clip number
    (0 for images and 3D). data: uint8 (H, W, 3) / (T, H, W, 3) or Voxels. meta: provenance
    columns (original_shape, resized_shape, crop, frame_start, fps). tokens, seqs: what it
    becomes (for batching)."""

    pos: int
    clip: int
    item: Item
    kind: str
    data: Any
    meta: dict
    tokens: int
    seqs: int


@dataclass
class Failure:
    pos: int
    clip: int
    key: str
    source: str
    error: str


@dataclass
class ItemDone:
    pos: int
    shard: int = field(default=-1)


# ------------------------------------------------------------------------------------------------
# geometry
# ------------------------------------------------------------------------------------------------

def resized_size(h: int, w: int, short: int) -> tuple[int, int]:
    """(h', w') with the short side ``short`` and the aspect ratio kept (rounded half up)."""
    if h <= w:
        return short, max(1, int(w * short / h + 0.5))
    return max(1, int(h * short / w + 0.5)), short


def centre_crop_box(h: int, w: int, crop: tuple[int, int] | None) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the centre crop (clamped to the frame)."""
    if crop is None:
        return 0, 0, h, w
    ch, cw = min(crop[0], h), min(crop[1], w)
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def preprocess_frame(frame: np.ndarray, prep: Preprocess) -> np.ndarray:
    """uint8 (H, W, 3) -> resized (Pillow bicubic) and centre-cropped uint8 (H', W', 3)."""
    if prep.resize is not None:
        h, w = frame.shape[:2]
        nh, nw = resized_size(h, w, prep.resize)
        if (nh, nw) != (h, w):
            from PIL import Image
            frame = np.asarray(Image.fromarray(frame).resize((nw, nh), Image.BICUBIC))
    top, left, ch, cw = centre_crop_box(frame.shape[0], frame.shape[1], prep.crop)
    return np.ascontiguousarray(frame[top:top + ch, left:left + cw])


def clip_starts(num_frames: int, clip_frames: int, stride: int) -> list[int]:
    """First frames of the clips of a video of ``num_frames`` frames (see the module docstring)."""
    starts, s = [], 0
    while s < num_frames:
        starts.append(s)
        if s + clip_frames >= num_frames:
            break
        s += stride
    return starts


def sample_size(kind: str, shape: tuple[int, ...]) -> tuple[int, int]:
    """(tokens, attention sequences) of a sample of this shape."""
    tokens = media.estimate_tokens(kind, shape)
    if kind != "video":
        return tokens, 1
    latent_t = max(shape[0], PATCH_T) // PATCH_T
    return tokens, math.ceil(latent_t / (CHUNK_FRAMES // PATCH_T))


def _check_pixels(name: str, h: int, w: int, limits: Limits) -> None:
    """A video's frame size, from its header (images: media.read_image checks its own)."""
    media._check_limits(name, h, w, limits)  # the same message as a file read by media.load
    if h < PATCH_H or w < PATCH_W:
        raise media.MediaError(f"{name}: {h}x{w} pixels (H x W) is smaller than one "
                               f"{PATCH_H}x{PATCH_W} patch")


def _check_tokens(name: str, tokens: int, limits: Limits) -> None:
    if tokens > limits.max_tokens_per_sample:
        raise media.MediaError(f"{name}: {tokens} tokens exceed the limit of "
                               f"{limits.max_tokens_per_sample} per sample "
                               "(max_tokens_per_sample; use --resize / --crop)")


# ------------------------------------------------------------------------------------------------
# per kind
# ------------------------------------------------------------------------------------------------

def _image_sample(pos: int, item: Item, name: str, data: bytes | None, prep: Preprocess
                  ) -> Sample:
    path = Path(item.source) if data is None else None
    # read_image checks the size from the header before decoding (max_pixels, Pillow's bomb
    # guard) and refuses images smaller than one patch.
    arr = media.read_image(path if data is None else name, data=data, limits=prep.limits)
    if arr.dtype != np.uint8:  # a 16-bit file (float32 in [-1, 1]): the engine resizes uint8
        arr = media.to_uint8(arr)
    h, w = arr.shape[:2]
    out = preprocess_frame(arr, prep)
    rh, rw = resized_size(h, w, prep.resize) if prep.resize else (h, w)
    top, left, ch, cw = centre_crop_box(rh, rw, prep.crop)
    tokens, seqs = sample_size("image", out.shape)
    _check_tokens(name, tokens, prep.limits)
    meta = {"original_shape": [h, w, 3], "resized_shape": [rh, rw, 3],
            "crop": [top, left, ch, cw], "frame_start": 0, "fps": None}
    return Sample(pos, 0, item, "image", out, meta, tokens, seqs)


def _video_records(pos: int, item: Item, name: str, data: bytes | None, prep: Preprocess
                   ) -> Iterator[Sample | Failure]:
    """Clips of a video, streamed (a decode error after some clips is a Failure of the next)."""
    import av

    src = item.source if data is None else io.BytesIO(data)
    clip = 0
    try:
        with av.open(src) as container:
            if not container.streams.video:
                raise media.MediaError(f"{name}: no video stream")
            stream = container.streams.video[0]
            if stream.codec_context.width and stream.codec_context.height:
                _check_pixels(name, stream.codec_context.height, stream.codec_context.width,
                              prep.limits)
            rate = stream.average_rate or stream.base_rate
            fps = float(rate) if rate else media.DEFAULT_FPS
            size, resized = None, None
            buf: list[np.ndarray] = []  # frames [buf_start, buf_start + len(buf))
            buf_start, next_start, last_end, n = 0, 0, 0, 0
            for frame in container.decode(stream):
                arr = frame.to_ndarray(format="rgb24")
                if size is None:
                    size = arr.shape
                    _check_pixels(name, size[0], size[1], prep.limits)
                    resized = resized_size(size[0], size[1], prep.resize) if prep.resize \
                        else size[:2]
                elif arr.shape != size:
                    raise media.MediaError(f"{name}: the frame size changes inside the video "
                                           f"(frame {n})")
                if n >= next_start:  # frames in a stride gap are never kept
                    if not buf:
                        buf_start = n
                    buf.append(preprocess_frame(arr, prep))
                n += 1
                while n >= next_start + prep.clip_frames:
                    lo = next_start - buf_start
                    yield _clip_sample(pos, item, name, clip, next_start,
                                       buf[lo:lo + prep.clip_frames], size, resized, fps, prep)
                    clip += 1
                    last_end = next_start + prep.clip_frames
                    next_start += prep.clip_stride
                    drop = min(len(buf), max(0, next_start - buf_start))
                    del buf[:drop]
                    buf_start += drop
            if n == 0:
                raise media.MediaError(f"{name}: the video has no frames")
            if last_end < n and next_start < n:  # the ragged tail
                lo = next_start - buf_start
                yield _clip_sample(pos, item, name, clip, next_start, buf[lo:], size, resized,
                                   fps, prep)
    except media.MediaError as exc:
        yield Failure(pos, clip if clip else -1, item.key, item.source, str(exc))
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        msg = f"{name}: cannot read the video ({exc})"
        if clip:
            msg += f" after {clip} clip(s)"
        yield Failure(pos, clip if clip else -1, item.key, item.source, msg)


def _clip_sample(pos, item, name, clip, start, frames, size, resized, fps, prep) -> Sample:
    arr = np.stack(frames)
    top, left, ch, cw = centre_crop_box(resized[0], resized[1], prep.crop)
    tokens, seqs = sample_size("video", arr.shape)
    _check_tokens(f"{name} clip {clip}", tokens, prep.limits)
    meta = {"original_shape": [len(frames), size[0], size[1], 3], "resized_shape": [int(resized[0]),
                                                                         int(resized[1]), 3],
            "crop": [top, left, ch, cw], "frame_start": start, "fps": fps}
    return Sample(pos, clip, item, "video", arr, meta, tokens, seqs)


def _voxel_sample(pos: int, item: Item, prep: Preprocess) -> Sample:
    path = Path(item.source)
    if path.is_file() and path.stat().st_size > MAX_INPUT_BYTES:
        raise media.MediaError(f"{path}: {path.stat().st_size} bytes, more than the "
                               f"{MAX_INPUT_BYTES} bytes read per input")
    vox = media.read_voxels(path, limits=prep.limits)  # checks max_voxels from the headers
    m = len(vox.coords)
    _check_tokens(str(path), m, prep.limits)
    meta = {"original_shape": [m, int(vox.feats.shape[1])], "resized_shape": None,
            "crop": None, "frame_start": 0, "fps": None}
    return Sample(pos, 0, item, "3d", vox, meta, m, 1)


def _kind_of_ext(ext: str) -> str | None:
    e = "." + ext.lower().rsplit(".", 1)[-1] if ext else ""
    if e in media.IMAGE_EXTS:
        return "image"
    if e in media.VIDEO_EXTS:
        return "video"
    if e in media.VOXEL_EXTS:
        return "3d"
    return None


def _sniff_kind(data: bytes) -> str:
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)):
            return "image"
    except Exception:
        return "video"


def _item_records(pos: int, item: Item, data: bytes | None, ext: str, prep: Preprocess
                  ) -> Iterator[Sample | Failure]:
    """Records of one item whose bytes (tar, Parquet) or file (data None) are at hand."""
    if item.kind == "file":
        name = item.source
        kind = media.kind_of(name)  # MediaError for an unsupported extension
    else:
        name = f"{item.source}:{item.key}"
        kind = _kind_of_ext(ext) or _sniff_kind(data)
        if kind == "3d":
            raise media.MediaError(f"{name}: 3D voxel members are read from files only")
    if kind == "video":
        yield from _video_records(pos, item, name, data, prep)
    elif kind == "image":
        if data is None:
            p = Path(item.source)
            if p.is_file() and p.stat().st_size > MAX_INPUT_BYTES:
                raise media.MediaError(f"{p}: {p.stat().st_size} bytes, more than the "
                                       f"{MAX_INPUT_BYTES} bytes read per input")
        yield _image_sample(pos, item, name, data, prep)
    else:
        yield _voxel_sample(pos, item, prep)


# ------------------------------------------------------------------------------------------------
# chunks of items
# ------------------------------------------------------------------------------------------------

def _tar_bytes(fd: int, item: Item) -> bytes:
    if item.size > MAX_INPUT_BYTES:
        raise media.MediaError(f"{item.source}:{item.key}: member of {item.size} bytes, more "
                               f"than the {MAX_INPUT_BYTES} bytes read per input")
    data = os.pread(fd, item.size, item.offset)
    if len(data) != item.size:
        raise media.MediaError(f"{item.source}:{item.key}: the tar is truncated")
    return data


class _ParquetCells:
    """The image cells of one Parquet file, read one row group at a time (cached: a chunk's
    items are consecutive rows)."""

    def __init__(self, path: str, prep: Preprocess):
        import pyarrow.parquet as pq

        import pyarrow as pa

        self.path = path
        schema = pq.read_schema(path)
        self.col = find_image_column(schema, prep.image_column, path)
        leaf = self.col + ".bytes" if pa.types.is_struct(schema.field(self.col).type) \
            else self.col
        # Dictionary-encoded cells stay one shared value: 1000 rows of the same 4 MB blob are a
        # 1 KB file, and dense they would be 4 GB.
        self.pf = pq.ParquetFile(path, read_dictionary=[leaf])
        self.col_index = self.pf.schema_arrow.names.index(self.col)
        self.group, self.cells = None, None

    def cell(self, group: int, row: int) -> tuple[bytes | None, str | None]:
        """(bytes, path) of one row (either may be None)."""
        if group != self.group:
            self.group, self.cells = group, None
            rg = self.pf.metadata.row_group(group)
            # Uncompressed: zstd makes a few KB of a GB of zeros.
            size = sum(rg.column(i).total_uncompressed_size for i in range(rg.num_columns)
                       if rg.column(i).path_in_schema.split(".")[0] == self.col)
            if size > MAX_ROW_GROUP_BYTES:
                raise media.MediaError(f"{self.path}: row group {group} holds {size} bytes of "
                                       f"images, more than {MAX_ROW_GROUP_BYTES}")
            self.cells = self.pf.read_row_group(group, columns=[self.col]).column(0)
        v = self.cells[row]
        if not v.is_valid:
            return None, None
        v = v.as_py()
        if isinstance(v, dict):
            return v.get("bytes"), v.get("path")
        return v, None


def _parquet_records(pos: int, item: Item, cells: _ParquetCells, prep: Preprocess
                     ) -> Iterator[Sample | Failure]:
    data, rel = cells.cell(item.offset, item.size)
    name = f"{item.source}:{item.key}"
    if data is None:
        if rel is None:
            raise media.MediaError(f"{name}: the image cell is null")
        p = Path(rel)
        if not p.is_absolute():
            p = Path(item.source).parent / p
        if not p.is_file():
            raise media.MediaError(f"{name}: no image bytes, and its path {rel!r} is not a file")
        if p.stat().st_size > MAX_INPUT_BYTES:
            raise media.MediaError(f"{name}: {p} is larger than {MAX_INPUT_BYTES} bytes")
        data = p.read_bytes()
    if len(data) > MAX_INPUT_BYTES:
        raise media.MediaError(f"{name}: {len(data)} bytes, more than {MAX_INPUT_BYTES}")
    ext = Path(rel).suffix.lstrip(".") if rel else ""
    yield from _item_records(pos, item, data, ext, prep)


def read_chunk(chunk: Sequence[tuple[int, Item]], prep: Preprocess
               ) -> Iterator[Sample | Failure | ItemDone]:
    """Records for consecutive (position, item) pairs of one source (see the module docstring).
    Never raises for a bad item: every error becomes a Failure naming it."""
    fd = None
    cells = None
    source_error = None
    first = chunk[0][1] if chunk else None
    try:
        if first is not None and first.kind == "tar":
            fd = os.open(first.source, os.O_RDONLY)
        elif first is not None and first.kind == "parquet":
            cells = _ParquetCells(first.source, prep)
    except Exception as exc:  # the source vanished or changed since it was indexed
        source_error = f"{first.source}: cannot open ({type(exc).__name__}: {exc})"
    try:
        for pos, item in chunk:
            try:
                if source_error is not None:
                    raise media.MediaError(source_error)
                if item.note:
                    raise media.MediaError(f"{item.source}:{item.key}: {item.note}")
                if item.kind == "tar":
                    recs = _item_records(pos, item, _tar_bytes(fd, item), item.ext, prep)
                elif item.kind == "parquet":
                    recs = _parquet_records(pos, item, cells, prep)
                else:
                    recs = _item_records(pos, item, None, "", prep)
                clip = -1
                for rec in recs:
                    clip = rec.clip
                    yield rec
            except (KeyboardInterrupt, SystemExit, GeneratorExit):
                raise
            except Exception as exc:  # hostile files raise all sorts of things
                msg = str(exc) if isinstance(exc, media.MediaError) else \
                    f"{item.source}:{item.key}: {type(exc).__name__}: {exc}"
                yield Failure(pos, clip + 1 if clip >= 0 else -1, item.key, item.source, msg)
            yield ItemDone(pos)
    finally:
        if fd is not None:
            os.close(fd)


def chunk_items(items: Sequence[Item], lo: int, hi: int, size: int = 32
                ) -> list[list[tuple[int, Item]]]:
    """Positions [lo, hi) cut into runs of at most ``size`` consecutive items of one source
    (for Parquet: of one row group, so a row group is read once per chunk)."""
    chunks: list[list[tuple[int, Item]]] = []
    cur: list[tuple[int, Item]] = []
    for pos in range(lo, hi):
        it = items[pos]
        if cur:
            last = cur[-1][1]
            same = last.source == it.source and (it.kind != "parquet" or last.offset == it.offset)
            if not same or (it.kind != "parquet" and len(cur) >= size):
                chunks.append(cur)
                cur = []
        cur.append((pos, it))
    if cur:
        chunks.append(cur)
    return chunks


__all__ = ["Preprocess", "Sample", "Failure", "ItemDone", "read_chunk", "chunk_items",
           "clip_starts", "resized_size", "centre_crop_box", "preprocess_frame", "sample_size"]
