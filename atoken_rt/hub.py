"""Official checkpoints by name: download once into a cache, verify, reuse.

    path = atoken_rt.hub.download("atoken-sod")          # or Session.from_pretrained("atoken-sod")

The files and their URL are those of the official ``apple/ml-atoken`` README
(``download_checkpoints.sh``: ``https://ml-site.cdn-apple.com/models/atoken/<file>``).

* Cache: ``$ATOKEN_RT_HOME/checkpoints`` (default ``$XDG_CACHE_HOME/atoken_rt``, else
  ``~/.cache/atoken_rt``).
* Download: ``urllib`` with a tqdm progress bar (when tqdm is installed); an interrupted transfer
  keeps ``<file>.part`` and the next attempt resumes it with an HTTP ``Range`` request (only
  from the URL, ETag and size recorded in ``<file>.part.json``; see :func:`_fetch`). The file
  is verified, then moved into place atomically (``os.replace``): the cache never holds a partial
  or unverified file under the final name. One process downloads a file at a time (a lock file).
* Verification: the official README publishes no checksums, so :data:`REGISTRY` records none
  (``sha256=None``). We trust on first use: after the first complete download, its size and
  SHA-256 are recorded next to it (``<file>.json``), and every later load or download of that
  file must match the record, or is refused (:class:`ChecksumError`). Where a checksum is recorded
  in :data:`REGISTRY`, it is checked from the first download on. A later load re-hashes the file
  only when its size or modification time differs from the record's (hashing 3 GB takes seconds).
* Offline: ``offline=True`` or ``ATOKEN_RT_OFFLINE=1`` never touches the network: a file missing
  from the cache is an error.
"""

from __future__ import annotations

import http.client
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import file_sha256

BASE_URL = "https://ml-site.cdn-apple.com/models/atoken"
CHUNK = 1 << 20
TIMEOUT_S = 60
# No official checkpoint is near this (the largest is ~3 GB): a server that announces or streams
# more (no Content-Length, or a lying one) is cut off instead of filling the disk.
MAX_DOWNLOAD_BYTES = 32 << 30


@dataclass(frozen=True)
class Official:
    """One official checkpoint: registry name, file name, URL, the config it fits, and its
    SHA-256 and size when published (None: trust on first use, see the module docstring)."""

    name: str
    filename: str
    config: str
    url: str
    sha256: str | None = None
    size: int | None = None


def _entry(name: str, filename: str, config: str) -> Official:
    return Official(name, filename, config, f"{BASE_URL}/{filename}")


# From download_checkpoints.sh of apple/ml-atoken (no checksums are published there).
# atoken-soc-s2 is listed there too but has no published config, so no preset here.
REGISTRY: dict[str, Official] = {e.name: e for e in (
    _entry("atoken-soc", "atoken-soc.pt", "atoken-soc"),
    _entry("atoken-sod", "atoken-sod.pt", "atoken-sod"),
    _entry("atoken-soc-s1", "atoken-soc-s1.pt", "atoken-soc-s1"),
    _entry("3d-decode-gs", "3d_decode_gs.pt", "3d-decode-gs"),
)}


class DownloadError(OSError):
    """The file could not be fetched: network failure, HTTP error, interrupted transfer, or
    missing from the cache in offline mode."""


class _Interrupted(DownloadError):
    """A transfer that stopped part-way: worth resuming."""


class ChecksumError(ValueError):
    """A downloaded or cached file whose SHA-256 or size differs from the recorded one."""


def names() -> list[str]:
    return sorted(REGISTRY)


def is_official(name) -> bool:
    return isinstance(name, str) and name in REGISTRY


def cache_dir() -> Path:
    """Where checkpoints are cached: ``$ATOKEN_RT_HOME/checkpoints``."""
    home = os.environ.get("ATOKEN_RT_HOME")
    if not home:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"),
                                                                  ".cache")
        home = os.path.join(base, "atoken_rt")
    return Path(home) / "checkpoints"


def offline_mode(offline: bool | None = None) -> bool:
    if offline is not None:
        return bool(offline)
    return os.environ.get("ATOKEN_RT_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _record_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _read_record(path: Path) -> dict | None:
    try:
        rec = json.loads(_record_path(path).read_text())
    except (OSError, ValueError, RecursionError):  # "[[[[...]]]]": no record
        return None
    ok = isinstance(rec, dict) and isinstance(rec.get("sha256"), str) \
        and isinstance(rec.get("size"), int)
    return rec if ok else None


def _write_record(path: Path, entry: Official, sha: str, size: int) -> None:
    st = path.stat()
    rec = {"name": entry.name, "url": entry.url, "sha256": sha, "size": size,
           "mtime_ns": st.st_mtime_ns, "verified": "published" if entry.sha256 else "first-use"}
    tmp = _record_path(path).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rec, indent=1) + "\n")
    os.replace(tmp, _record_path(path))


def _expected(entry: Official, record: dict | None) -> tuple[str | None, int | None, str]:
    """The SHA-256 and size a file must have, and where they come from."""
    if entry.sha256:
        return entry.sha256, entry.size, "the published checksum"
    if record:
        return record["sha256"], record["size"], "the checksum recorded at its first download"
    return None, None, ""


def _verify_cached(path: Path, entry: Official) -> None:
    record = _read_record(path)
    sha, size, source = _expected(entry, record)
    st = path.stat()
    if size is not None and st.st_size != size:
        raise ChecksumError(f"checkpoint {path}: {st.st_size} bytes, but {source} is for "
                            f"{size} bytes; delete it to download again")
    if record and record.get("mtime_ns") == st.st_mtime_ns and record["size"] == st.st_size \
            and (entry.sha256 is None or record["sha256"] == entry.sha256):
        return  # unchanged since it was verified
    got = file_sha256(path)
    if sha is not None and got != sha:
        raise ChecksumError(f"checkpoint {path}: SHA-256 {got[:16]}... differs from {source} "
                            f"({sha[:16]}...); delete it to download again")
    try:
        _write_record(path, entry, got, st.st_size)
    except OSError:
        pass  # a read-only (shared) cache: verified now, re-hashed next time


class _Lock:
    """An exclusive lock file (POSIX flock; no-op where unavailable): one download per file."""

    def __init__(self, path: Path):
        self.path, self.fd = path, None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock


class _SafeRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to http(s), and never from https down to plain http (urllib alone
    also follows ``ftp://``, and any downgrade)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        old = urllib.parse.urlsplit(req.full_url).scheme.lower()
        new = urllib.parse.urlsplit(urllib.parse.urljoin(req.full_url, newurl)).scheme.lower()
        if new not in ("http", "https") or (old == "https" and new != "https"):
            raise urllib.error.HTTPError(req.full_url, code, f"refused redirect to {new}:// "
                                         f"({newurl[:200]})", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_SafeRedirects)


def _part_meta_path(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _read_part_meta(part: Path) -> dict | None:
    try:
        meta = json.loads(_part_meta_path(part).read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return meta if isinstance(meta, dict) else None


def _drop_part(part: Path) -> None:
    for p in (part, _part_meta_path(part)):
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def _fetch(entry: Official, part: Path, progress: bool) -> None:
    """Download ``entry.url`` into ``part``, resuming what is already there.

    A partial file is resumed only when ``<file>.part.json`` says it came from this URL; the
    range request carries the server's validator (``If-Range``: its strong ETag, else its
    Last-Modified) and the response must agree with the recorded ETag and total size, so the
    bytes of two different files (a URL changed, a file republished between attempts) are never
    spliced into one, which trust on first use would then record as the checkpoint."""
    have = part.stat().st_size if part.exists() else 0
    pmeta = _read_part_meta(part) if have else None
    if have and (pmeta is None or pmeta.get("url") != entry.url):
        _drop_part(part)  # bytes of unknown origin: start over
        have, pmeta = 0, None
    req = urllib.request.Request(entry.url, headers={"User-Agent": "atoken_rt"})
    if have:
        req.add_header("Range", f"bytes={have}-")
        etag, modified = pmeta.get("etag"), pmeta.get("last_modified")
        if isinstance(etag, str) and etag and not etag.startswith("W/"):
            req.add_header("If-Range", etag)
        elif isinstance(modified, str) and modified:
            req.add_header("If-Range", modified)
    try:
        resp = _OPENER.open(req, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the range starts at or past the end: start over
            _drop_part(part)
            return _fetch(entry, part, progress)
        raise DownloadError(f"{entry.name}: {entry.url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(f"{entry.name}: cannot reach {entry.url} ({reason}); set "
                            "ATOKEN_RT_OFFLINE=1 to use the cache only") from None
    with resp:
        if have and resp.status == 206:
            start = _range_start(resp.headers.get("Content-Range"))
            if start != have:
                raise DownloadError(f"{entry.name}: {entry.url}: the server resumed at byte "
                                    f"{start}, not {have}")
            etag, size = resp.headers.get("ETag"), _range_total(resp.headers.get("Content-Range"))
            if (etag and pmeta.get("etag") and etag != pmeta["etag"]) or (
                    size is not None and isinstance(pmeta.get("size"), int)
                    and size != pmeta["size"]):
                _drop_part(part)  # another file than the one the partial bytes came from
                raise _Interrupted(f"{entry.name}: {entry.url} changed since the partial "
                                   "download; starting over")
            mode = "ab"
        else:
            have, mode = 0, "wb"  # the server ignored the range: the whole file again
            length = resp.headers.get("Content-Length")
            _part_meta_path(part).write_text(json.dumps({
                "url": entry.url, "etag": resp.headers.get("ETag"),
                "last_modified": resp.headers.get("Last-Modified"),
                "size": int(length) if length and length.isdigit() else None}) + "\n")
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length and length.isdigit() else None
        if total is not None and total > MAX_DOWNLOAD_BYTES:
            _drop_part(part)
            raise DownloadError(f"{entry.name}: {entry.url}: the server announces {total} bytes, "
                                f"more than hub.MAX_DOWNLOAD_BYTES={MAX_DOWNLOAD_BYTES}")
        bar = _bar(entry, total, have, progress)
        got = have
        try:
            with open(part, mode) as f:
                while True:
                    try:
                        buf = resp.read(CHUNK)
                    except (OSError, ValueError, http.client.HTTPException) as exc:
                        # IncompleteRead, connection reset, timeout
                        raise _Interrupted(f"{entry.name}: transfer interrupted at {got} bytes "
                                            f"({type(exc).__name__}); run again to resume") \
                            from None
                    if not buf:
                        break
                    got += len(buf)
                    if got > MAX_DOWNLOAD_BYTES:
                        f.close()
                        _drop_part(part)
                        raise DownloadError(f"{entry.name}: {entry.url}: more than "
                                            f"hub.MAX_DOWNLOAD_BYTES={MAX_DOWNLOAD_BYTES} bytes; "
                                            "nothing was kept")
                    f.write(buf)
                    if bar is not None:
                        bar.update(len(buf))
        finally:
            if bar is not None:
                bar.close()
    if total is not None and got != total:
        raise _Interrupted(f"{entry.name}: transfer interrupted at {got} of {total} bytes; run "
                            "again to resume")


def _range_total(content_range: str | None) -> int | None:
    # "bytes 100-999/1000" -> 1000 (None for "*" or anything unparsable)
    try:
        return int(content_range.rsplit("/", 1)[1])
    except (AttributeError, IndexError, ValueError):
        return None


def _range_start(content_range: str | None) -> int | None:
    # "bytes 100-999/1000"
    try:
        return int(content_range.split()[1].split("-")[0])
    except (AttributeError, IndexError, ValueError):
        return None


def _bar(entry: Official, total, initial: int, progress: bool):
    if not progress:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024,
                desc=entry.filename, file=sys.stderr, disable=not sys.stderr.isatty())


def download(name: str, *, offline: bool | None = None, progress: bool = True,
             retries: int = 2) -> Path:
    """The local path of official checkpoint ``name`` (see :data:`REGISTRY`), downloading and
    verifying it first if it is not cached. ``retries``: further attempts (each resuming) after
    an interrupted transfer."""
    if not is_official(name):
        raise ValueError(f"unknown official checkpoint {name!r}; known: {names()}")
    entry = REGISTRY[name]
    d = cache_dir()
    path = d / entry.filename
    if path.is_file():
        _verify_cached(path, entry)
        return path
    if offline_mode(offline):
        raise DownloadError(f"{name}: not in the cache ({path}) and offline mode is on "
                            "(ATOKEN_RT_OFFLINE / offline=True)")
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(f"{name}: cannot create the cache folder {d} "
                            f"({exc.strerror or exc}); set ATOKEN_RT_HOME") from None
    try:
        return _download_locked(entry, path, progress, retries)
    except DownloadError:
        raise
    except OSError as exc:  # the cache itself: unwritable, disk full, ...
        raise DownloadError(f"{name}: cannot write into the cache {d} "
                            f"({exc.strerror or exc}); set ATOKEN_RT_HOME") from None


def _download_locked(entry: Official, path: Path, progress: bool, retries: int) -> Path:
    name = entry.name
    part = path.with_name(path.name + ".part")
    with _Lock(path.with_name(path.name + ".lock")):
        if path.is_file():  # another process finished it while we waited for the lock
            _verify_cached(path, entry)
            return path
        for attempt in range(retries + 1):
            try:
                _fetch(entry, part, progress)
                break
            except _Interrupted:
                if attempt == retries:
                    raise
        sha, size, source = _expected(entry, _read_record(path))
        got_size = part.stat().st_size
        got = file_sha256(part)
        if (sha is not None and got != sha) or (size is not None and got_size != size):
            _drop_part(part)  # corrupt bytes must not be resumed
            raise ChecksumError(f"{name}: the download from {entry.url} has SHA-256 "
                                f"{got[:16]}... ({got_size} bytes), not {source} "
                                f"({(sha or '?')[:16]}...); nothing was kept")
        os.replace(part, path)
        _drop_part(part)  # its .part.json
        _write_record(path, entry, got, got_size)
    return path


def cached_sha256(path) -> str | None:
    """The recorded SHA-256 of a cached checkpoint that is unchanged since it was verified (no
    hashing); None for any other file."""
    p = Path(path)
    rec = _read_record(p) if p.is_file() else None
    if rec is None:
        return None
    st = p.stat()
    return rec["sha256"] if rec.get("mtime_ns") == st.st_mtime_ns and \
        rec["size"] == st.st_size else None


def find_by_sha256(sha: str) -> Path | None:
    """A cached checkpoint whose recorded SHA-256 is ``sha`` (and unchanged since), or None."""
    d = cache_dir()
    if not d.is_dir():
        return None
    for rec_path in sorted(d.glob("*.json")):
        path = rec_path.with_name(rec_path.name[:-len(".json")])
        if cached_sha256(path) == sha:
            return path
    return None


__all__ = ["REGISTRY", "Official", "download", "cache_dir", "offline_mode", "names",
           "is_official", "cached_sha256", "find_by_sha256", "DownloadError", "ChecksumError"]
