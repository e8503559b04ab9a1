"""Downloads and the cache, against a loopback HTTP server running in a thread.

The server serves plain files (with Range support), a Hugging Face Hub-compatible
``/{repo}/resolve/{revision}/{path}`` endpoint (ETag, X-Repo-Commit, Content-Length, the
``X-Error-Code: EntryNotFound`` 404 the Hub sends) for ``HF_ENDPOINT``, and failure modes: 404,
500, a slow response (client timeout), a truncated body (Content-Length larger than the body) and
a body whose checksum does not match the registry's. Nothing here reaches the internet.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections import Counter
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

import polysae
from polysae import SAE, SAEConfig
from polysae.__main__ import main as cli_main
from polysae.cache import MARKER, DownloadError, Source, cached_folder, download, fetch_folder
from polysae.registry import REGISTRY, PretrainedEntry, load_registry

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _send(self, code, body=b"", headers=None, head=False, length=None):
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _serve(self, head: bool):
        srv = self.server
        path = self.path.split("?")[0]
        srv.hits[path] += 1
        srv.ranges.append((path, self.headers.get("Range")))
        mode, _, rest = path.lstrip("/").partition("/")
        if "/resolve/" in path:  # Hub endpoint: /{owner}/{repo}/resolve/{rev}/{file path}
            repo, _, tail = path.lstrip("/").partition("/resolve/")
            _rev, _, fpath = tail.partition("/")
            body = srv.files.get(f"hub/{repo}/{fpath}")
            if body is None:
                return self._send(404, b"Entry not found", {"X-Error-Code": "EntryNotFound"},
                                  head)
            hdr = {"ETag": f'"{hashlib.sha256(body).hexdigest()}"', "X-Repo-Commit": COMMIT,
                   "Accept-Ranges": "bytes"}
            return self._send(200, body, hdr, head)
        body = srv.files.get(rest)
        if mode == "e404" or body is None:
            return self._send(404, b"not found", head=head)
        if mode == "e500":
            return self._send(500, b"boom", head=head)
        if mode == "slow":
            time.sleep(srv.delay)
        if mode == "trunc":  # promise more than we send, then hang up
            self.close_connection = True
            return self._send(200, body[: len(body) // 2], head=head, length=len(body))
        if mode == "flaky" and not srv.flaked:  # the first request is cut short, then resumable
            srv.flaked = True
            self.close_connection = True
            return self._send(200, body[: len(body) // 3], head=head, length=len(body))
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            start = int(rng[6:].split("-")[0])
            return self._send(206, body[start:], {"Content-Range":
                                                  f"bytes {start}-{len(body) - 1}/{len(body)}"},
                              head)
        return self._send(200, body, head=head)

    def _guarded(self, head: bool):
        try:
            self._serve(head)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
            self.close_connection = True

    def do_GET(self):
        self._guarded(False)

    def do_HEAD(self):
        self._guarded(True)


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.files, srv.hits, srv.ranges, srv.delay, srv.flaked = {}, Counter(), [], 1.5, False
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache and network access allowed (conftest turns HF_HUB_OFFLINE on)."""
    import huggingface_hub.constants as hfc

    root = tmp_path / "cache"
    monkeypatch.setenv("POLYSAE_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("POLYSAE_OFFLINE", raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setattr(hfc, "HF_HUB_OFFLINE", False)  # huggingface_hub reads it at import
    return root


def _checkpoint(tmp_path: Path) -> tuple[SAE, dict[str, bytes]]:
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=8, d_sae=24, k=3, ranks=(8, 4, 4))).eval()
    folder = sae.save(tmp_path / "src", metadata={"model": "tiny", "hook": "blocks.0.x"})
    return sae, {p.name: p.read_bytes() for p in folder.iterdir()}


def _looks_valid_anywhere(root: Path) -> list[str]:
    """Files outside .partial that a loader could take for a finished download."""
    bad = []
    for p in root.rglob("*"):
        rel = p.relative_to(root).parts
        if rel[0] in (".partial", ".locks") or not p.is_file():
            continue
        bad.append(str(p.relative_to(root)))
    return bad


def _same(a: SAE, b: SAE) -> None:
    x = torch.randn(5, a.cfg.d_in)
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), atol=0, rtol=0)


def test_url_folder_download_cache_and_offline(tmp_path, server, cache, monkeypatch):
    sae, files = _checkpoint(tmp_path)
    for name, body in files.items():
        server.files[f"ckpt/{name}"] = body
    url = f"{server.url}/files/ckpt"
    _same(sae, polysae.load(url))
    assert server.hits["/files/ckpt/config.json"] == 1
    assert server.hits["/files/ckpt/sae.safetensors"] == 1
    folder = cached_folder(url)
    assert folder is not None and folder.is_relative_to(cache)
    marker = json.loads((folder / MARKER).read_text())
    assert marker["files"]["sae.safetensors"]["sha256"] == \
        hashlib.sha256(files["sae.safetensors"]).hexdigest()  # the hash it saw is recorded
    _same(sae, polysae.load(url))  # served from the cache: no new requests
    assert sum(server.hits.values()) == 2
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _same(sae, polysae.load(url))
    assert sum(server.hits.values()) == 2
    with pytest.raises(DownloadError, match="offline"):
        polysae.load(f"{server.url}/files/other")
    assert sum(server.hits.values()) == 2


def _entry(server_or_none, **kw) -> PretrainedEntry:
    base = dict(name="test-sae", description="t", model="tiny", hook="blocks.0.x",
                architecture="topk", format="polysae", files=("config.json", "sae.safetensors"))
    base.update(kw)
    return PretrainedEntry(**base)


def test_hub_endpoint_registry_download_and_checksum(tmp_path, server, cache, monkeypatch):
    sae, files = _checkpoint(tmp_path)
    for name, body in files.items():
        server.files[f"hub/org/saes/layer0/{name}"] = body
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    sha = {n: hashlib.sha256(b).hexdigest() for n, b in files.items()}
    good = _entry(None, repo="org/saes", path="layer0", sha256=sha)
    bad = replace(good, name="test-bad", revision="v1",
                  sha256={**sha, "sae.safetensors": "0" * 64})
    monkeypatch.setitem(REGISTRY, good.name, good)
    monkeypatch.setitem(REGISTRY, bad.name, bad)

    with pytest.raises(DownloadError, match="checksum mismatch"):
        polysae.load("test-bad")
    assert _looks_valid_anywhere(cache) == []

    assert cli_main(["download", "test-sae", "--check"]) == 0
    _same(sae, polysae.load("test-sae"))
    assert any("/resolve/main/layer0/sae.safetensors" in p for p in server.hits)
    # hf:// source of the same folder (probing finds the polysae layout)
    _same(sae, polysae.load("hf://org/saes/layer0@main"))
    # a registry file the repo lacks: a clear 404 error, nothing left that looks valid
    missing = replace(good, name="test-missing", path="nope")
    monkeypatch.setitem(REGISTRY, missing.name, missing)
    before = set(_looks_valid_anywhere(cache))
    with pytest.raises(DownloadError, match="not found"):
        download("test-missing")
    assert set(_looks_valid_anywhere(cache)) == before
    # offline: the cached entry still loads, with no request
    n = sum(server.hits.values())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _same(sae, polysae.load("test-sae"))
    assert sum(server.hits.values()) == n


@pytest.mark.parametrize("mode,match", [
    ("e404", "HTTP 404"), ("e500", "HTTP 500"), ("slow", "timed out"), ("trunc", "truncated"),
    ("checksum", "checksum mismatch")])
def test_http_failures_leave_nothing_valid(tmp_path, server, cache, mode, match):
    _, files = _checkpoint(tmp_path)
    for name, body in files.items():
        server.files[f"ckpt/{name}"] = body
    prefix = "files" if mode == "checksum" else mode
    sha = {"sae.safetensors": "f" * 64} if mode == "checksum" else None
    src = Source("url", None, "", "", f"{server.url}/{prefix}/ckpt")
    t0 = time.monotonic()
    with pytest.raises(DownloadError, match=match):
        fetch_folder(src, files=("sae.safetensors", "config.json"), sha256=sha, timeout=0.3)
    assert time.monotonic() - t0 < 10
    assert _looks_valid_anywhere(cache) == []
    assert cached_folder(src.url) is None
    if mode == "checksum":  # a corrupt body is deleted, not kept for resume
        assert not any(p.name.endswith(".part") for p in cache.rglob("*"))


def test_probe_404_and_truncated_download_resumes(tmp_path, server, cache):
    sae, files = _checkpoint(tmp_path)
    for name, body in files.items():
        server.files[f"ckpt/{name}"] = body
    with pytest.raises(DownloadError, match="no checkpoint found"):
        polysae.load(f"{server.url}/files/elsewhere")
    url = f"{server.url}/flaky/ckpt"
    with pytest.raises(DownloadError, match="truncated|connection lost"):
        polysae.load(url)
    assert _looks_valid_anywhere(cache) == []
    _same(sae, polysae.load(url))  # second attempt resumes with a Range request
    resumed = [r for p, r in server.ranges if p == "/flaky/ckpt/config.json" and r]
    assert resumed == [f"bytes={len(files['config.json']) // 3}-"]


def test_paths_escaping_the_cache_are_refused(tmp_path, server, cache, monkeypatch):
    for bad in ("hf://org/repo/../../etc@main", "hf://org/repo/a\\b", "hf://org/repo/x@.."):
        with pytest.raises((DownloadError, ValueError), match="refusing|expected"):
            download(bad)
    evil = _entry(None, name="test-evil", repo="org/saes", files=("../../outside.json",))
    monkeypatch.setitem(REGISTRY, evil.name, evil)
    with pytest.raises(DownloadError, match="refusing"):
        download("test-evil")
    absolute = replace(evil, name="test-abs", files=("/tmp/x.json",))
    monkeypatch.setitem(REGISTRY, absolute.name, absolute)
    with pytest.raises(DownloadError, match="refusing"):
        download("test-abs")
    # a symlink planted inside the cache is not followed
    outside = tmp_path / "outside"
    outside.mkdir()
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "url").symlink_to(outside)
    with pytest.raises(DownloadError, match="symlink"):
        polysae.load(f"{server.url}/files/ckpt")
    assert list(outside.iterdir()) == []
    assert sum(server.hits.values()) == 0


def test_concurrent_downloads_share_one_transfer(tmp_path, server, cache):
    sae, files = _checkpoint(tmp_path)
    for name, body in files.items():
        server.files[f"ckpt/{name}"] = body
    server.delay = 0.3
    url = f"{server.url}/slow/ckpt"
    out, errors = [], []

    def worker():
        try:
            out.append(download(url, timeout=5))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(set(out)) == 1
    assert server.hits["/slow/ckpt/sae.safetensors"] == 1
    _same(sae, polysae.load(str(out[0])))


def test_cli_list_and_download(tmp_path, server, cache, capsys):
    assert cli_main(["list", "gpt2"]) == 0
    shown = capsys.readouterr().out
    assert "gpt2-small-res-jb-L8" in shown and "blocks.8.hook_resid_pre" in shown
    assert cli_main(["list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    names = {r["name"] for r in rows}
    assert {"gemma-scope-2b-pt-res-L12-16k", "pythia-160m-32k-L6"} <= names
    gs = next(r for r in rows if r["name"] == "gemma-scope-2b-pt-res-L12-16k")
    assert gs["source"] == ("hf://google/gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82@"
                            + gs["revision"])
    assert re.fullmatch(r"[0-9a-f]{40}", gs["revision"]) and gs["verified"] is False
    assert cli_main(["download", "no-such-sae"]) == 2
    assert cli_main(["download", f"{server.url}/e404/ckpt"]) == 1
    _, files = _checkpoint(tmp_path)
    for name, body in files.items():
        server.files[f"ckpt/{name}"] = body
    assert cli_main(["download", f"{server.url}/files/ckpt"]) == 0
    assert str(cache) in capsys.readouterr().out


def test_registry_entries_load_through_their_converters(tmp_path, server, cache, monkeypatch):
    """One real entry per format, served (with tiny random weights in that release's layout) at
    its real repo path by the fake Hub: registry name -> download -> converter -> SAE."""
    import io

    import numpy as np
    from safetensors.torch import save as st_save

    g = torch.Generator().manual_seed(1)
    d, f = 6, 10
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    jb = REGISTRY["gpt2-small-res-jb-L8"]
    gs = REGISTRY["gemma-scope-2b-pt-res-L12-16k"]
    sp = REGISTRY["pythia-160m-32k-L6"]
    layouts = {  # keyed by name: entries hold a sha256 dict, so they are not hashable
        jb.name: {"cfg.json": json.dumps({"model_name": "gpt2-small", "hook_point": jb.hook,
                                     "d_in": d, "d_sae": f}).encode(),
             "sae_weights.safetensors": st_save({"W_enc": r(d, f), "b_enc": r(f),
                                                 "W_dec": r(f, d), "b_dec": r(d)})},
        sp.name: {"cfg.json": json.dumps({"expansion_factor": 2, "normalize_decoder": True,
                                     "num_latents": f, "k": 3, "signed": False,
                                     "d_in": d}).encode(),
             "sae.safetensors": st_save({"encoder.weight": r(f, d), "encoder.bias": r(f),
                                         "W_dec": r(f, d), "b_dec": r(d)})},
    }
    buf = io.BytesIO()
    np.savez(buf, W_enc=r(d, f).numpy(), W_dec=r(f, d).numpy(), b_enc=r(f).numpy(),
             b_dec=r(d).numpy(), threshold=r(f).abs().numpy())
    layouts[gs.name] = {"params.npz": buf.getvalue()}
    for name_, files in layouts.items():
        e = REGISTRY[name_]
        assert set(files) == set(e.files)
        for name, body in files.items():
            server.files[f"hub/{e.repo}/{e.path}/{name}"] = body
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    from polysae.loader import load_with_metadata

    for name_ in layouts:
        e = REGISTRY[name_]
        out = load_with_metadata(e.name)
        assert out.format == e.format and out.metadata["hook"] == e.hook
        assert (out.sae.cfg.d_in, out.sae.cfg.d_sae) == (d, f)
        assert out.sae.cfg.sparsifier == {"relu": "relu", "jumprelu": "jumprelu",
                                          "topk": "topk"}[e.architecture]
        assert torch.isfinite(out.sae(torch.randn(4, d))).all()


# -- registry integrity -----------------------------------------------------------------------
def test_every_registry_entry_is_pinned():
    assert len(REGISTRY) >= 28
    for e in REGISTRY.values():
        assert e.repo and re.fullmatch(r"[0-9a-f]{40}", e.revision), e.name
        assert e.source.endswith("@" + e.revision)
        assert set(e.sha256) <= set(e.files), e.name
        assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in e.sha256.values()), e.name
        assert e.verified == all(f in e.sha256 for f in e.files)
    # the entries whose hashes are published carry them
    assert REGISTRY["gpt2-small-res-jb-L7"].verified


def _registry_file(tmp_path: Path, **entry) -> Path:
    base = dict(name="x", description="d", model="m", hook="blocks.0.hook_resid_post",
                architecture="topk", format="polysae", files=["config.json", "sae.safetensors"],
                repo="org/saes", path="layer0", revision=COMMIT, sha256={})
    base.update(entry)
    p = tmp_path / "registry.json"
    p.write_text(json.dumps({"format": "polysae-registry", "format_version": 1,
                             "entries": [base]}))
    return p


@pytest.mark.parametrize("entry,match", [
    ({"revision": "main"}, "revision 'main' is not a 40-hex commit"),
    ({"revision": "0123abc"}, "not a 40-hex commit"),
    ({"sha256": {"config.json": "abc"}}, "sha256 of 'config.json' must be 64 lowercase hex"),
    ({"sha256": {"other.bin": "0" * 64}}, "'other.bin', which is not in its files"),
    ({"files": []}, "lists no files"),
    ({"colour": "red"}, r"unknown fields \['colour'\]"),
])
def test_load_registry_refuses_unpinned_or_malformed_entries(tmp_path, entry, match):
    p = _registry_file(tmp_path, **entry)
    with pytest.raises(ValueError, match=match) as err:
        load_registry(p)
    assert str(p) in str(err.value) and "entry 0 (x)" in str(err.value)


def test_pinned_entry_downloads_its_revision_and_checks_sha256(tmp_path, server, cache,
                                                               monkeypatch):
    sae, files = _checkpoint(tmp_path)
    for name, body in files.items():
        server.files[f"hub/org/saes/layer0/{name}"] = body
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    sha = {n: hashlib.sha256(b).hexdigest() for n, b in files.items()}
    good = load_registry(_registry_file(tmp_path, name="pinned-ok", sha256=sha))
    (tmp_path / "bad").mkdir()
    bad = load_registry(_registry_file(
        tmp_path / "bad", name="pinned-bad", sha256={**sha, "sae.safetensors": "e" * 64}))
    partial = load_registry(_registry_file(
        tmp_path / "bad", name="pinned-partial", sha256={"config.json": sha["config.json"]}))
    for reg in (good, bad, partial):
        for k, v in reg.items():
            monkeypatch.setitem(REGISTRY, k, v)
    assert good["pinned-ok"].verified and not partial["pinned-partial"].verified
    with pytest.raises(DownloadError, match="checksum mismatch for sae.safetensors"):
        download("pinned-bad")
    assert _looks_valid_anywhere(cache) == []
    _same(sae, polysae.load("pinned-ok"))
    # the request went to the pinned commit, never to a branch
    assert any(f"/resolve/{COMMIT}/layer0/sae.safetensors" in p for p in server.hits)
    assert not any("/resolve/main/" in p for p in server.hits)
    marker = json.loads((cached_folder("pinned-ok") / MARKER).read_text())
    assert {n: marker["files"][n]["sha256"] for n in sha} == sha


def test_cli_list_marks_unverified_entries(cache, capsys, monkeypatch):
    assert cli_main(["list", "gpt2-small-res-jb-L"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines()[1:] if line.strip()
            and line.startswith("gpt2")}
    assert len(rows) == 13
    assert rows["gpt2-small-res-jb-L7"].split()[-2] == "verified"
    assert rows["gpt2-small-res-jb-L8"].split()[-2] == "unverified"
    assert "57d08a4fd333" in rows["gpt2-small-res-jb-L8"]
    assert "12 of 13 entries are unverified" in out
    assert cli_main(["list", "--verified", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown and all(r["verified"] for r in shown)
    assert {r["name"] for r in shown} == {e.name for e in REGISTRY.values()
                                          if e.verified}
