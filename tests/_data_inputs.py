"""Generated datasets for the tests of atoken_rt.data, and the oracle: ``Session.encode`` of each
sample alone, from inputs decoded independently of the data package (PIL / media / tarfile /
pyarrow), and a reader of the shards that uses pyarrow and numpy only."""

from __future__ import annotations

import io
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from atoken_rt import media

CLIP = 16


def _png(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def build(root: Path) -> dict:
    """Write the inputs under ``root``; returns {"sources": [...], "items": {key: reference}}.

    reference: ("image", HxWx3 uint8) or ("video", TxHxWx3 uint8) or ("broken", None).
    """
    rng = np.random.default_rng(42)
    folder = root / "folder"
    folder.mkdir(parents=True)
    items: dict[str, tuple] = {}
    for i, (h, w) in enumerate([(24, 40), (48, 32), (16, 16), (40, 56)]):
        p = folder / f"img{i}.png"
        p.write_bytes(_png(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
        items[str(p)] = ("image", None)
    for i, t in enumerate([20, 6]):  # 20 frames: one 16-frame clip and a ragged 4-frame tail
        frames = rng.integers(0, 256, (t, 32, 32, 3), dtype=np.uint8)
        p = media.write_video(folder / f"vid{i}.mp4", frames, fps=8)
        items[str(p)] = ("video", None)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    items[str(folder / "broken.png")] = ("broken", None)
    items[str(folder / "broken.mp4")] = ("broken", None)
    for key in list(items):  # decode the references as `encode` reads files
        kind = items[key][0]
        if kind == "image":
            items[key] = ("image", media.read_image(key))
        elif kind == "video":
            items[key] = ("video", media.read_video(key)[0])

    tar = root / "shard-000.tar"  # WebDataset: __key__ + extension members
    with tarfile.open(tar, "w") as tf:
        for i, (ext, fmt) in enumerate([("png", "PNG"), ("jpg", "JPEG"), ("webp", "WEBP"),
                                        ("jpg", None)]):
            data = (_png(rng.integers(0, 256, (24 + 8 * i, 32, 3), dtype=np.uint8), fmt)
                    if fmt else b"not a jpeg")
            for name, blob in ((f"s{i:03d}.{ext}", data), (f"s{i:03d}.json", b"{}")):
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tf.addfile(info, io.BytesIO(blob))
            items[f"s{i:03d}"] = (("image", media.read_image(f"s{i}.{ext}", data=data))
                                  if fmt else ("broken", None))

    pqf = root / "hf.parquet"  # Hugging Face datasets image layout: struct<bytes, path>
    cells, labels = [], []
    for i in range(3):
        data = _png(rng.integers(0, 256, (32, 16 + 8 * i, 3), dtype=np.uint8))
        cells.append({"bytes": data, "path": f"p{i}.png"})
        items[f"{pqf}#{i}"] = ("image", media.read_image(f"p{i}.png", data=data))
        labels.append(i)
    cells.append({"bytes": b"garbage", "path": "p3.png"})
    items[f"{pqf}#3"] = ("broken", None)
    labels.append(3)
    img_t = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({"image": pa.array(cells, img_t), "label": labels}), pqf,
                   row_group_size=2)

    extra = root / "extra"
    extra.mkdir()
    listed = []
    for i in range(2):
        p = extra / f"listed{i}.png"
        p.write_bytes(_png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)))
        items[str(p)] = ("image", media.read_image(p))
        listed.append(str(p))
    missing = str(extra / "missing.png")
    items[missing] = ("broken", None)
    (root / "list.txt").write_text("\n".join(listed + [missing]) + "\n")
    return {"sources": [str(folder), str(tar), str(pqf), str(root / "list.txt")],
            "items": items}


def _matrix(col, i: int) -> np.ndarray:
    cell = col[i]
    flat = cell.values.flatten().to_numpy(zero_copy_only=False)
    return np.asarray(flat).reshape(-1, cell.values.type.list_size)


def shard_rows(out: Path) -> dict:
    """{(key, clip): {"kind", "frame_start", "frames_used", "coords", "indices", "embedding"}}
    from every shard, with pyarrow and numpy only; duplicates raise."""
    rows = {}
    for p in sorted(Path(out).glob("shard-*.parquet")):
        t = pq.read_table(p)
        for i in range(t.num_rows):
            k = (t["key"][i].as_py(), t["clip"][i].as_py())
            assert k not in rows, f"duplicate row {k}"
            rows[k] = {"kind": t["kind"][i].as_py(), "frame_start": t["frame_start"][i].as_py(),
                       "frames_used": t["frames_used"][i].as_py(),
                       "coords": _matrix(t["coords"], i), "indices": _matrix(t["indices"], i),
                       "embedding": np.asarray(t["embedding"][i].values.to_numpy())}
    return rows


def failure_keys(out: Path) -> list[str]:
    return pq.read_table(Path(out) / "failures.parquet")["key"].to_pylist()


def reference_rows(sess, items: dict) -> dict:
    """{(key, clip): (coords, indices, embedding)}: each sample (each clip) encoded alone."""
    ref = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for key, (kind, arr) in items.items():
            if kind == "image":
                parts = [arr]
            elif kind == "video":
                parts = [arr[s:s + CLIP] for s in range(0, len(arr), CLIP)]
            else:
                continue
            for clip, x in enumerate(parts):
                e = sess.encode([x])
                ref[(key, clip)] = (e.coords[0].numpy(), e.indices[0].numpy(),
                                    e.embedding[0].numpy())
    return ref


def assert_rows_equal(rows: dict, ref: dict) -> None:
    assert set(rows) == set(ref)
    for k, (coords, indices, emb) in ref.items():
        r = rows[k]
        assert np.array_equal(r["coords"], coords), k
        assert np.array_equal(r["indices"], indices), k
        assert np.array_equal(r["embedding"], emb), k  # bit for bit (deterministic mode)


def table_dump(out: Path) -> list:
    """Every shard's full contents (all columns) as Python rows, in shard order."""
    return [pq.read_table(p).to_pylist() for p in sorted(Path(out).glob("shard-*.parquet"))]
