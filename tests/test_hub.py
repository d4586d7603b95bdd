"""Official checkpoints by name (atoken_rt.hub): download, resume, verify, cache, offline.

Every test serves files from a local ThreadingHTTPServer on 127.0.0.1; the registry's URLs are
replaced for every test (autouse fixture), so the real host is never contacted.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import atoken_rt
from atoken_rt import cli, hub

from .conftest import WEIGHTS

CONTENT = WEIGHTS.read_bytes()  # a real (tiny) checkpoint, so that a Session can load it


class _Server:
    """Serves CONTENT at /<name>; ``mode`` picks the behaviour of the next requests."""

    def __init__(self):
        self.mode = "ok"          # ok | cut (first `cuts` responses stop half-way) | 404 | wrong
        #                           | redirect (302 to `location`)
        self.location = ""
        self.no_length = False    # send no Content-Length (the body ends with the connection)
        self.cuts = 0
        self.etag = False         # send ETag (of the body served) ...
        self.if_range = True      # ... and honour If-Range (a whole 200 when it differs)
        self.requests: list[dict] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_GET(self):
                server.requests.append({"path": self.path, "range": self.headers.get("Range"),
                                        "if_range": self.headers.get("If-Range")})
                if server.mode == "redirect" and "moved" not in self.path:
                    self.send_response(302)
                    self.send_header("Location", server.location)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if server.mode == "404":
                    self.send_error(404, "Not Found")
                    return
                body = CONTENT if server.mode != "wrong" else CONTENT[::-1]
                start = 0
                rng = self.headers.get("Range")
                tag = f'"{hashlib.sha256(body).hexdigest()[:16]}"'
                if server.etag and server.if_range and self.headers.get("If-Range") not in (
                        None, tag):
                    rng = None  # RFC 9110: the validator differs, send the whole file
                if rng and rng.startswith("bytes="):
                    start = int(rng[6:].split("-")[0])
                    if start >= len(body):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                rest = body[start:]
                if server.etag:
                    self.send_header("ETag", tag)
                if not server.no_length:
                    self.send_header("Content-Length", str(len(rest)))
                else:
                    self.close_connection = True
                self.end_headers()
                if server.mode == "cut" and server.cuts > 0:
                    server.cuts -= 1
                    self.wfile.write(rest[:len(rest) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(rest)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch, tmp_path):
    srv = _Server()
    monkeypatch.setenv("ATOKEN_RT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ATOKEN_RT_OFFLINE", raising=False)
    # Every official entry points at the local server (never the real host); "atoken-sod"
    # serves the tiny test weights and uses the tiny config.
    for name, e in list(hub.REGISTRY.items()):
        cfg = "tiny-sod" if name == "atoken-sod" else e.config
        monkeypatch.setitem(hub.REGISTRY, name,
                            hub.Official(name, e.filename, cfg, f"{srv.url}/{e.filename}"))
    yield srv
    srv.close()


def _cached(name="atoken-sod") -> Path:
    return hub.cache_dir() / hub.REGISTRY[name].filename


def test_download_verifies_records_and_reuses(server, tmp_path):
    path = hub.download("atoken-sod", progress=False)
    assert path == tmp_path / "home" / "checkpoints" / "atoken-sod.pt"
    assert path.read_bytes() == CONTENT
    rec = json.loads(path.with_name("atoken-sod.pt.json").read_text())
    assert rec["sha256"] == hashlib.sha256(CONTENT).hexdigest() and rec["size"] == len(CONTENT)
    assert rec["verified"] == "first-use"
    assert not path.with_name("atoken-sod.pt.part").exists()
    assert len(server.requests) == 1
    assert hub.download("atoken-sod", progress=False) == path  # cached: no request
    assert len(server.requests) == 1
    assert hub.find_by_sha256(rec["sha256"]) == path


def test_interrupted_transfer_resumes_with_range(server):
    server.mode, server.cuts = "cut", 1
    with pytest.raises(hub.DownloadError, match="interrupted"):
        hub.download("atoken-sod", progress=False, retries=0)
    part = _cached().with_name("atoken-sod.pt.part")
    half = part.stat().st_size
    assert 0 < half < len(CONTENT) and not _cached().exists()
    path = hub.download("atoken-sod", progress=False)
    assert server.requests[-1]["range"] == f"bytes={half}-"
    assert path.read_bytes() == CONTENT and not part.exists()


def test_partial_file_of_unknown_origin_is_not_resumed(server, monkeypatch):
    # A .part left by another URL (or anything without a record of its origin) must not be
    # completed with this URL's bytes: trust on first use would record the splice.
    part = _cached().with_name("atoken-sod.pt.part")
    part.parent.mkdir(parents=True)
    part.write_bytes(b"\0" * (len(CONTENT) // 2))
    assert hub.download("atoken-sod", progress=False).read_bytes() == CONTENT
    assert server.requests[-1]["range"] is None
    # Same for a partial download of another URL (the registry entry changed since).
    server.mode, server.cuts = "cut", 1
    with pytest.raises(hub.DownloadError, match="interrupted"):
        hub.download("atoken-soc", progress=False, retries=0)
    soc_part = hub.cache_dir() / "atoken-soc.pt.part"
    assert soc_part.with_name("atoken-soc.pt.part.json").is_file()
    e = hub.REGISTRY["atoken-soc"]
    monkeypatch.setitem(hub.REGISTRY, "atoken-soc", hub.Official(
        e.name, e.filename, e.config, e.url + "?v=2"))
    server.mode = "ok"
    assert hub.download("atoken-soc", progress=False).read_bytes() == CONTENT
    assert server.requests[-1]["range"] is None


@pytest.mark.parametrize("if_range", [True, False])
def test_file_changed_between_attempts_is_not_spliced(server, if_range):
    server.etag, server.if_range = True, if_range
    server.mode, server.cuts = "cut", 1
    with pytest.raises(hub.DownloadError, match="interrupted"):
        hub.download("atoken-sod", progress=False, retries=0)
    server.mode = "wrong"  # republished: other bytes at the same URL
    path = hub.download("atoken-sod", progress=False, retries=1)
    assert server.requests[1]["if_range"] is not None
    assert path.read_bytes() == CONTENT[::-1]  # the new file, whole; never half of each


def test_redirect_only_to_http(server):
    import socket
    listener = socket.socket()  # where an ftp:// redirect would connect
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.5)
    try:
        server.mode = "redirect"
        server.location = f"ftp://127.0.0.1:{listener.getsockname()[1]}/atoken-sod.pt"
        with pytest.raises(hub.DownloadError, match="refused redirect to ftp://"):
            hub.download("atoken-sod", progress=False)
        with pytest.raises(socket.timeout):
            listener.accept()[0].close()  # nothing connected
    finally:
        listener.close()
    server.location = "file:///etc/passwd"
    with pytest.raises(hub.DownloadError, match="file:///etc/passwd"):
        hub.download("atoken-sod", progress=False)
    server.location = f"{server.url}/atoken-sod.pt?moved"  # http -> http: followed
    assert hub.download("atoken-sod", progress=False).read_bytes() == CONTENT
    # https -> http (a downgrade) is refused, without any request to the http URL.
    req = urllib.request.Request("https://example.invalid/x")
    with pytest.raises(urllib.error.HTTPError, match="refused redirect to http://"):
        hub._SafeRedirects().redirect_request(req, None, 302, "Found", {},
                                              f"{server.url}/atoken-sod.pt")


def test_download_size_is_bounded(server, monkeypatch):
    monkeypatch.setattr(hub, "MAX_DOWNLOAD_BYTES", len(CONTENT) - 1)
    with pytest.raises(hub.DownloadError, match="announces"):  # from Content-Length
        hub.download("atoken-sod", progress=False)
    server.no_length = True  # no Content-Length: counted while streaming
    with pytest.raises(hub.DownloadError, match="more than hub.MAX_DOWNLOAD_BYTES"):
        hub.download("atoken-sod", progress=False)
    assert not _cached().exists()
    assert not _cached().with_name("atoken-sod.pt.part").exists()


def test_unreadable_record_is_no_record(server):
    path = hub.download("atoken-sod", progress=False)
    path.with_name("atoken-sod.pt.json").write_text("[" * 100000 + "]" * 100000)
    assert hub.cached_sha256(path) is None and hub.find_by_sha256("0" * 64) is None
    assert hub.download("atoken-sod", progress=False) == path  # re-hashed, record rewritten
    assert hub.cached_sha256(path) == hashlib.sha256(CONTENT).hexdigest()


def test_interrupted_transfer_retried_automatically(server):
    server.mode, server.cuts = "cut", 2
    path = hub.download("atoken-sod", progress=False, retries=2)
    assert path.read_bytes() == CONTENT
    assert [r["range"] is not None for r in server.requests] == [False, True, True]


def test_published_checksum_mismatch_keeps_nothing(server, monkeypatch):
    e = hub.REGISTRY["atoken-sod"]
    monkeypatch.setitem(hub.REGISTRY, "atoken-sod",
                        hub.Official(e.name, e.filename, e.config, e.url, sha256="0" * 64))
    with pytest.raises(hub.ChecksumError, match="nothing was kept") as exc:
        hub.download("atoken-sod", progress=False)
    assert "\n" not in str(exc.value)
    assert not _cached().exists() and not _cached().with_name("atoken-sod.pt.part").exists()


def test_trust_on_first_use_refuses_later_mismatch(server):
    path = hub.download("atoken-sod", progress=False)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes, newer mtime
    path.write_bytes(bytes(data))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10 ** 9))
    with pytest.raises(hub.ChecksumError, match="recorded at its first download"):
        hub.download("atoken-sod", progress=False)
    with pytest.raises(ValueError, match="differs"):
        atoken_rt.Session.from_pretrained("atoken-sod", progress=False)
    # The file is gone but its record stays: a server now serving other bytes is refused.
    path.unlink()
    server.mode = "wrong"
    with pytest.raises(hub.ChecksumError):
        hub.download("atoken-sod", progress=False)
    assert not path.exists()


def test_http_404_and_no_network(server, monkeypatch):
    server.mode = "404"
    with pytest.raises(hub.DownloadError, match="HTTP 404"):
        hub.download("atoken-sod", progress=False)
    e = hub.REGISTRY["atoken-sod"]
    # A port nothing listens on: connection refused.
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    monkeypatch.setitem(hub.REGISTRY, "atoken-sod",
                        hub.Official(e.name, e.filename, e.config,
                                     f"http://127.0.0.1:{port}/{e.filename}"))
    with pytest.raises(hub.DownloadError, match="cannot reach"):
        hub.download("atoken-sod", progress=False)
    assert isinstance(hub.DownloadError("x"), OSError)


def test_offline_never_touches_the_network(server, monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("the network was used in offline mode")

    with monkeypatch.context() as m:
        m.setattr(urllib.request, "urlopen", no_network)
        m.setattr(hub._OPENER, "open", no_network)
        with pytest.raises(hub.DownloadError, match="offline"):
            hub.download("atoken-sod", offline=True)
        m.setenv("ATOKEN_RT_OFFLINE", "1")
        with pytest.raises(hub.DownloadError, match="offline"):
            atoken_rt.Session.from_pretrained("atoken-sod")
    hub.download("atoken-sod", progress=False)
    with monkeypatch.context() as m:
        m.setattr(urllib.request, "urlopen", no_network)
        m.setattr(hub._OPENER, "open", no_network)
        m.setenv("ATOKEN_RT_OFFLINE", "1")
        assert hub.download("atoken-sod") == _cached()
    assert len(server.requests) == 1


def test_from_pretrained_and_unknown_names(server):
    sess = atoken_rt.Session.from_pretrained("atoken-sod", progress=False)
    assert sess.config.name == "tiny-sod" and sess.discrete
    ref = atoken_rt.Session("tiny-sod", WEIGHTS)
    for (k, a), b in zip(sess.model.state_dict().items(), ref.model.state_dict().values()):
        assert a.equal(b), k
    with pytest.raises(ValueError, match="unknown official"):
        atoken_rt.Session.from_pretrained("atoken-xyz")
    with pytest.raises(ValueError, match="unknown official"):
        hub.download("nope")


def test_cli_checkpoint_by_name(server, tmp_path, capsys):
    pytest.importorskip("PIL")
    import numpy as np
    from PIL import Image
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(img)
    tok = tmp_path / "t.safetensors"
    rc = cli.main(["encode", str(img), "--out", str(tok), "--config", "tiny-sod",
                   "--checkpoint", "atoken-sod", "--device", "cpu", "-q"])
    assert rc == 0, capsys.readouterr().err
    from safetensors import safe_open
    with safe_open(str(tok), framework="pt") as f:
        meta = json.loads(f.metadata()["atoken_rt"])
    assert meta["checkpoint"] == str(_cached())
    assert meta["checkpoint_sha256"] == hashlib.sha256(CONTENT).hexdigest()
    server.mode = "404"
    capsys.readouterr()
    # a checkpoint that is not cached, offline: one line, exit 2
    os.environ["ATOKEN_RT_OFFLINE"] = "1"
    try:
        rc = cli.main(["encode", str(img), "--out", str(tok), "--config", "tiny-soc",
                       "--checkpoint", "atoken-soc", "--device", "cpu", "-q"])
    finally:
        del os.environ["ATOKEN_RT_OFFLINE"]
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "offline" in err


def test_decode_finds_moved_checkpoint_by_hash(server, tmp_path, capsys, monkeypatch):
    """The token file records a checkpoint path that is gone; the same file (same hash) is in
    the cache: decode uses it."""
    pytest.importorskip("PIL")
    import numpy as np
    from PIL import Image
    hub.download("atoken-sod", progress=False)
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(img)
    local = tmp_path / "w.pt"
    local.write_bytes(CONTENT)
    monkeypatch.chdir(tmp_path)
    tok = tmp_path / "t.safetensors"
    assert cli.main(["encode", "a.png", "--out", str(tok), "--config", "tiny-sod",
                     "--checkpoint", "w.pt", "--device", "cpu", "-q"]) == 0
    from safetensors import safe_open
    with safe_open(str(tok), framework="pt") as f:
        meta = json.loads(f.metadata()["atoken_rt"])
    assert meta["checkpoint"] == str(local.resolve())  # resolved, not "w.pt"
    local.unlink()
    capsys.readouterr()
    assert cli.main(["decode", str(tok), "--out", str(tmp_path / "d"), "--device", "cpu"]) == 0
    assert "same sha256" in capsys.readouterr().err
    assert (tmp_path / "d" / "0000_a.png").exists()


def test_unusable_cache_folder(server, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("ATOKEN_RT_HOME", str(blocker / "home"))
    with pytest.raises(hub.DownloadError, match="cannot create the cache folder") as exc:
        hub.download("atoken-sod", progress=False)
    assert "\n" not in str(exc.value) and server.requests == []
