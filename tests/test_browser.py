"""Feature browser (polysae.browser, polysae browse): streaming statistics against dense torch
references, interaction strengths against the decoder's own pair atoms, split-character token
text against a byte-level decode, the written site's data, and a real headless Chromium run over
the site served on loopback (skipped with the reason when Debian's chromium/chromedriver are
absent)."""

from __future__ import annotations

import base64
import functools
import http.server
import json
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from polysae import SAE, SAEConfig
from polysae.browser import (
    BrowseConfig,
    StatsConfig,
    TokenText,
    TopPool,
    build_site_from_arrays,
    feature_summary,
    hist_centres,
    logit_tops,
    pair_candidates,
    stream_stats,
)

REPO = Path(__file__).resolve().parents[1]


def read_js(path: Path) -> dict:
    """Payload of a data/*.js file: `(window.POLYSAE=...)["key"]=<json>;`."""
    text = path.read_text("utf-8")
    return json.loads(text[text.index("]=") + 2:].rstrip().rstrip(";"))


# -- a toy tokenizer: bytes 0..255 plus whole words, decoded like a byte-level BPE ---------------
WORDS = [" the", " star", " coffee", " Starbucks", " shop", " bright", " night", " cup", " of",
         " caf", " is", " open", " sky", " hot", " a"]


class ToyTokenizer:
    """ids < 256 are raw bytes, 256 + w is WORDS[w]; decode = UTF-8 with replacement."""

    def decode(self, ids):
        b = b"".join(bytes([i]) if i < 256 else WORDS[i - 256].encode() for i in ids)
        return b.decode("utf-8", errors="replace")

    def encode_words(self, text_words):
        out = []
        for w in text_words:
            if w in WORDS:
                out.append(256 + WORDS.index(w))
            else:
                out.extend(w.encode())
        return out


def W(word: str) -> int:
    return 256 + WORDS.index(word)


# -- planted SAE -------------------------------------------------------------------------------
D = F = 8
STAR, COFFEE, BUCKS, EACUTE = 3, 5, 6, 1


def planted_sae() -> SAE:
    """Identity encoder, TopK(2): latent f fires exactly where x[:, f] > 0, with value x[:, f].
    Decoder: pair (3, 5) is made the strongest interaction by giving u_3, u_5 the same large
    quadratic-prefix coordinate."""
    cfg = SAEConfig(d_in=D, d_sae=F, k=2, sparsifier="topk", decoder="poly", ranks=(8, 4, 4),
                    dtype="float64")
    sae = SAE(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(D, dtype=torch.float64))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        # rows of U: 3 and 5 share quadratic-prefix coordinate 2 (0.8 * 0.8); the only other
        # overlap inside the R2 = 4 prefix is latent 7 with latent 3 on coordinate 0 (0.5 * 0.6)
        U = torch.zeros(F, F, dtype=torch.float64)
        for f, c in {0: 4, 1: 5, 2: 6, 4: 7, 6: 3}.items():
            U[f, c] = 1.0
        U[STAR, 0] = U[COFFEE, 1] = 0.6
        U[STAR, 2] = U[COFFEE, 2] = 0.8
        U[7, 0] = 0.5
        sae.decoder.U.copy_(U)
        g = torch.Generator().manual_seed(1)
        sae.decoder.C1.copy_(torch.randn(D, 8, generator=g, dtype=torch.float64))
        # orthonormal columns, so ||B_ij|| = ||u_i[:4] * u_j[:4]||
        sae.decoder.C2.copy_(torch.linalg.qr(torch.randn(D, 4, generator=g,
                                                         dtype=torch.float64))[0])
        sae.decoder.C3.copy_(torch.randn(D, 4, generator=g, dtype=torch.float64))
    sae.eval()
    return sae


def planted_corpus(seed: int = 0):
    """Docs of words; returns (acts [N, D] float64, token_ids [N], doc_ids [N], texts).
    x[:, STAR] > 0 on " star", x[:, COFFEE] on " coffee", both on " Starbucks",
    x[:, EACUTE] on the second byte of "é" (the token that completes the character)."""
    rng = np.random.default_rng(seed)
    tok = ToyTokenizer()
    ids, docs = [], []
    fillers = [" the", " bright", " night", " sky", " shop", " of", " a", " is", " open", " hot"]
    for d in range(40):
        words = [str(rng.choice(fillers)) for _ in range(12)]
        kind = d % 4
        if kind == 0:
            words[6] = " star"
        elif kind == 1:
            words[6] = " coffee"
        elif kind == 2:
            words[5:7] = [" Starbucks", " coffee"]
        else:
            words[5:7] = [" caf", "é"]
        t = tok.encode_words(words)
        ids += t
        docs += [d] * len(t)
    token_ids = torch.tensor(ids)
    doc_ids = torch.tensor(docs)
    n = len(ids)
    x = torch.full((n, D), -1.0, dtype=torch.float64)
    vals = torch.from_numpy(rng.uniform(0.5, 5.0, size=(n, 3)))
    star, coffee, bucks = (token_ids == W(" star")), (token_ids == W(" coffee")), (
        token_ids == W(" Starbucks"))
    x[star, STAR] = vals[star, 0]
    x[coffee, COFFEE] = vals[coffee, 1]
    x[bucks, STAR] = vals[bucks, 0]
    x[bucks, COFFEE] = vals[bucks, 1]
    x[token_ids == 0xA9, EACUTE] = vals[token_ids == 0xA9, 2]
    return x, token_ids, doc_ids


def expected_window(token_ids, doc_ids, row, left, right) -> str:
    """Reference text of a context window: the byte-level decode of the in-document tokens."""
    ids = [int(token_ids[r]) for r in range(row - left, row + right + 1)
           if 0 <= r < len(token_ids) and doc_ids[r] == doc_ids[row]]
    return ToyTokenizer().decode(ids)


# -- unit tests against dense references -----------------------------------------------------------
def test_top_pool_matches_dense_topk(gen):
    S, T, N = 6, 5, 400
    vals = torch.rand(N, S, generator=gen) * (torch.rand(N, S, generator=gen) < 0.3)
    pool = TopPool(S, T, 1, 3)
    for s in range(0, N, 37):  # chunked, uneven
        chunk = vals[s:s + 37]
        r, sl = chunk.nonzero(as_tuple=True)
        pool.offer(sl, chunk[r, sl], r + s,
                   lambda slots, rows: torch.stack([rows.float(), slots.float(), -rows.float()],
                                                   1)[:, None])
    ref_v, ref_r = vals.topk(T, dim=0)
    for s in range(S):
        nz = int((ref_v[:, s] > 0).sum())
        assert torch.equal(pool.v[s, :nz], ref_v[:nz, s])
        assert torch.equal(pool.r[s, :nz], ref_r[:nz, s])
        assert torch.isinf(pool.v[s, nz:]).all()
        # the payload travels with its row
        assert torch.equal(pool.ctx[s, :nz, 0, 0], ref_r[:nz, s].float())
        assert torch.all(pool.ctx[s, :nz, 0, 1] == s)


# pair_candidates against a dense formula: tests/test_interactions.py
def test_linear_sae_has_no_pairs():
    sae = SAE(SAEConfig(d_in=6, d_sae=10, k=2, decoder="linear"))
    assert pair_candidates(sae, 10).i.numel() == 0


def test_stream_stats_match_dense_encode(gen):
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=10, d_sae=32, k=3, ranks=(10, 4, 4), dtype="float64")).eval()
    x = torch.randn(700, 10, generator=gen, dtype=torch.float64)
    cfg = StatsConfig(n_contexts=6, left=3, right=2, chunk_rows=64, hist_bins=12,
                      hist_lo=-2, hist_hi=1, n_pair_contexts=4)
    pairs = pair_candidates(sae, 30)
    st = stream_stats(sae, lambda a, b: x[a:b], 700, pairs, cfg)
    with torch.no_grad():
        z = sae.encode(x).float()
    assert torch.equal(st.count, (z > 0).sum(0))
    torch.testing.assert_close(st.act_sum, z.double().sum(0), rtol=1e-5, atol=1e-6)
    # histogram of log10 activation vs numpy, values outside the grid clamped to the edge bins
    for f in range(32):
        a = z[:, f][z[:, f] > 0].double().log10().clamp(-2, 1 - 1e-9).numpy()
        ref, _ = np.histogram(a, bins=12, range=(-2, 1))
        assert st.hist[f].tolist() == ref.tolist()
    ref_v, ref_r = z.topk(6, dim=0)
    for f in range(32):
        nz = int((ref_v[:, f] > 0).sum())
        torch.testing.assert_close(st.top_val[f, :nz], ref_v[:nz, f])
        assert torch.equal(st.top_row[f, :nz], ref_r[:nz, f])
        for t in range(nz):  # window activations = dense codes on rows row-3 .. row+2
            r = int(ref_r[t, f])
            want = torch.stack([z[q, f] if 0 <= q < 700 else torch.tensor(0.0)
                                for q in range(r - 3, r + 3)])
            torch.testing.assert_close(st.top_ctx[f, t], want)
    summ = feature_summary(st)  # density, mean active value, max: dense references
    fired = (z > 0).sum(0)
    torch.testing.assert_close(summ.density, fired.double() / 700)
    ref_mean = torch.where(fired > 0, z.double().sum(0) / fired.clamp(min=1), 0.0)
    torch.testing.assert_close(summ.mean, ref_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(summ.max, z.max(0).values.clamp(min=0))
    edges = np.linspace(-2, 1, 13)
    np.testing.assert_allclose(hist_centres(-2, 1, 12).numpy(),
                               np.sqrt(10 ** edges[:-1] * 10 ** edges[1:]))
    both = (z[:, pairs.i] > 0) & (z[:, pairs.j] > 0)
    assert torch.equal(st.pair_co, both.sum(0))
    prod = (z[:, pairs.i] * z[:, pairs.j]) * both
    for p in range(pairs.i.numel()):
        nz = min(4, int(both[:, p].sum()))
        v, r = prod[:, p].topk(nz)
        torch.testing.assert_close(st.pair_val[p, :nz], v)
        assert torch.equal(st.pair_row[p, :nz], r)
        if nz:
            torch.testing.assert_close(st.pair_ctx[p, 0, 0, 3], z[r[0], pairs.i[p]])
            torch.testing.assert_close(st.pair_ctx[p, 0, 1, 3], z[r[0], pairs.j[p]])


def test_token_text_split_characters():
    tok = ToyTokenizer()
    text = TokenText(tok)
    # "é" = C3 A9, "日" = E6 97 A5, split over byte tokens; words around them
    ids = [W(" caf"), 0xC3, 0xA9, W(" is"), 0xE6, 0x97, 0xA5, W(" hot"), -1, W(" a")]
    pieces = text.span_pieces(ids)
    assert pieces == [" caf", "", "é", " is", "", "", "日", " hot", "", " a"]
    assert "".join(pieces[:8]) == tok.decode(ids[:8])
    assert text.broken(0xC3) and not text.broken(W(" star"))


def test_logit_tops_match_dense(gen):
    dirs = torch.randn(7, 5, generator=gen)
    W_U = torch.randn(5, 30, generator=gen)
    up, upv, dn, dnv = logit_tops(dirs, W_U, 4, block=3)
    ref = dirs @ W_U
    v, i = ref.topk(4, dim=1)
    assert torch.equal(up, i)
    torch.testing.assert_close(upv, v)
    v, i = (-ref).topk(4, dim=1)
    assert torch.equal(dn, i)
    torch.testing.assert_close(dnv, -v)


# -- the written site ------------------------------------------------------------------------------
CFG = BrowseConfig(shard_size=4, title="planted",
                   stats=StatsConfig(n_contexts=8, left=4, right=2, chunk_rows=100,
                                     n_pair_contexts=6, n_logit_tokens=3))


def build_planted(out: Path, report=None, overwrite: bool = False) -> tuple:
    sae = planted_sae()
    x, token_ids, doc_ids = planted_corpus()
    W_U = torch.zeros(D, 256 + len(WORDS), dtype=torch.float64)
    W_U[:, W(" Starbucks")] = sae.decoder.pair_atoms(torch.tensor([STAR]),
                                                     torch.tensor([COFFEE]))[0].detach() * float(
        sae.decoder.lambda2.detach())  # the pair atom promotes " Starbucks"
    W_U[:, W(" cup")] = -W_U[:, W(" Starbucks")]
    build_site_from_arrays(sae, x, out, token_ids=token_ids, doc_ids=doc_ids,
                           tokenizer=ToyTokenizer(), W_U=W_U, config=CFG, report=report,
                           meta={"model": "toy"}, overwrite=overwrite)
    return sae, x, token_ids, doc_ids


# shaped like the metrics.json of polysae.evaluate: one block per SAE, the browsed one picked
# by info
REPORT = {"schema_version": 1, "date": "2026-01-01", "model": "toy",
          "saes": {
              "vanilla": {"info": {"decoder": "linear", "d_sae": F, "d_in": D},
                          "reconstruction": {"fvu": 0.5}},
              "poly": {"info": {"decoder": "poly", "d_sae": F, "d_in": D},
                       "reconstruction": {"fvu": 0.123, "dead_fraction": 0.25},
                       "probe": {"value": 0.9, "latents": [STAR, COFFEE]},
                       "interactions": {"r_strength_count": 0.4, "top_pairs": [
                           {"i": COFFEE, "j": STAR, "strength": 0.32, "count": 10,
                            "contexts": ["..."]}]},
                       "firing_score": [float(f) for f in range(F)]}}}


@pytest.fixture(scope="module")
def planted_site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site") / "site"
    build_planted(out, report=REPORT)
    return out


def test_site_data_planted(planted_site):
    out = planted_site
    x, token_ids, doc_ids = planted_corpus()
    for a in ("index.html", "app.js", "style.css", "data/summary.js", "data/pairs.js",
              "data/vocab.js", "polysae-site.json"):
        assert (out / a).is_file(), a
    assert not [p for p in out.parent.iterdir() if ".partial-" in p.name]
    summ = read_js(out / "data" / "summary.js")
    vocab = read_js(out / "data" / "vocab.js")
    z = x.clamp(min=0)
    ref_density = ((z > 0).sum(0).double() / len(x)).tolist()
    assert summ["density"] == pytest.approx(ref_density, abs=1e-7)
    assert summ["d_sae"] == F and summ["n_rows"] == len(x)
    # latent 3: top contexts are the rows of the largest x[:, 3], text = byte decode of the window
    sh = read_js(out / "data" / "latents_0000.js")
    r = STAR - sh["lo"]
    ref_v, ref_r = z[:, STAR].topk(CFG.stats.n_contexts)
    assert sh["row"][r] == ref_r.tolist()
    assert sh["val"][r] == pytest.approx(ref_v.tolist(), abs=1e-4)
    for t in range(CFG.stats.n_contexts):
        toks = sh["tok"][r][t]
        got = "".join(vocab[str(k)] for k in toks if k >= 0)
        assert got == expected_window(token_ids, doc_ids, ref_r[t].item(), 4, 2)
        assert sh["q"][r][t][4] == round(100 * ref_v[t].item() / ref_v[0].item())
    assert sorted(summ["fires"][STAR]) == [" Starbucks", " star"]
    assert summ["fires"][EACUTE] == ["é"]
    # the split-character latent: its peak token completes "é", override pieces spell "café"
    sh1 = read_js(out / "data" / "latents_0000.js")
    c = (EACUTE - sh1["lo"]) * CFG.stats.n_contexts
    pieces = sh1["ov"][str(c)]
    assert pieces[4] == "é" and pieces[3] == "" and pieces[2] == " caf"
    # pairs: (3, 5) is the only co-active pair and the strongest candidate
    pairs = read_js(out / "data" / "pairs.js")
    assert (pairs["i"], pairs["j"]) == ([STAR], [COFFEE])
    both = (z[:, STAR] > 0) & (z[:, COFFEE] > 0)
    assert pairs["co"] == [int(both.sum())]
    prod = z[:, STAR] * z[:, COFFEE]
    assert pairs["row"][0] == prod.topk(CFG.stats.n_pair_contexts).indices.tolist()
    assert pairs["up"][0][0] == W(" Starbucks") and pairs["down"][0][0] == W(" cup")
    sc = pairs["scatter"]
    assert len(sc["s"]) == F * (F - 1) // 2 and sc["i"][0] == STAR and sc["j"][0] == COFFEE
    # report: every metric carries a link; per-latent lists become columns
    links = {row["name"]: row["link"] for row in summ["report"]}
    assert summ["report_sae"] == "poly"
    assert links == {
        "schema_version": "#latents/sort=max",
        "reconstruction.fvu": "#latents/sort=max",
        "reconstruction.dead_fraction": "#latents/sort=density",
        "probe": f"#ids/{STAR},{COFFEE}", "probe.value": "#latents/sort=max",
        "interactions.r_strength_count": "#pairs",
        "interactions.top_pairs[0]": f"#pair/{STAR}-{COFFEE}",
        "firing_score": "#latents/sort=firing_score"}
    assert dict((r["name"], r["value"]) for r in summ["report"])["reconstruction.fvu"] == "0.123"
    assert summ["columns"]["firing_score"] == REPORT["saes"]["poly"]["firing_score"]


def test_site_overwrite_rules(tmp_path):
    foreign = tmp_path / "notasite"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep")
    for overwrite in (False, True):  # a folder that is not a site is never replaced
        with pytest.raises(ValueError, match="not a polysae site"):
            build_planted(foreign, overwrite=overwrite)
    assert (foreign / "precious.txt").read_text() == "keep"
    site = tmp_path / "site"
    build_planted(site)
    (site / "data" / "stale.js").write_text("old")
    before = {p: p.read_bytes() for p in sorted(site.rglob("*")) if p.is_file()}
    # an earlier site (possibly another SAE's) is never replaced silently: the message says
    # what is there
    with pytest.raises(ValueError, match=rf"browser: output folder {re.escape(str(site))} "
                                         r"already holds a polysae site of an unnamed SAE "
                                         rf"\(d_sae {F}, model toy\), written \d{{4}}-\d\d-\d\d "
                                         r"\d\d:\d\d; pass --overwrite \(overwrite=True\)"):
        build_planted(site)
    assert {p: p.read_bytes() for p in sorted(site.rglob("*")) if p.is_file()} == before
    build_planted(site, overwrite=True)  # replaced as a whole
    assert not (site / "data" / "stale.js").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notasite", "site"]


def test_bad_inputs_name_the_problem(tmp_path):
    sae = planted_sae()
    x, token_ids, doc_ids = planted_corpus()
    with pytest.raises(ValueError, match="token_ids has shape"):
        build_site_from_arrays(sae, x, tmp_path / "s", token_ids=token_ids[:-1])
    with pytest.raises(ValueError, match="W_U has shape"):
        build_site_from_arrays(sae, x, tmp_path / "s", W_U=torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"acts has shape \(490, 5\)"):
        build_site_from_arrays(sae, x[:, :5], tmp_path / "s")
    with pytest.raises(ValueError, match="StatsConfig.n_contexts must be >= 1, got 0"):
        StatsConfig(n_contexts=0)
    with pytest.raises(ValueError, match="BrowseConfig.shard_size must be >= 1, got 0"):
        BrowseConfig(shard_size=0)
    with pytest.raises(ValueError, match="StatsConfig.hist_lo 1.0 must be < hist_hi 1.0"):
        StatsConfig(hist_lo=1.0, hist_hi=1.0)
    assert not (tmp_path / "s").exists()


# -- real browser ----------------------------------------------------------------------------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WebDriver:
    """Minimal W3C WebDriver client over urllib (no selenium dependency)."""

    def __init__(self, profile: Path):
        self.port = _free_port()
        self.proc = subprocess.Popen([CHROMEDRIVER, f"--port={self.port}"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{self.port}"
        for _ in range(100):
            try:
                self._req("GET", "/status")
                break
            except OSError:
                time.sleep(0.1)
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--window-size=1280,900",
                f"--user-data-dir={profile}"]
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": CHROMIUM, "args": args}}}}
        self.sid = self._req("POST", "/session", caps)["sessionId"]

    def _req(self, method: str, path: str, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                doc = json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"webdriver {method} {path}: {e.read()[:500]!r}") from e
        v = doc.get("value", doc)
        return v

    def cmd(self, method: str, path: str, body=None):
        return self._req(method, f"/session/{self.sid}{path}", body)

    def get(self, url: str) -> None:
        self.cmd("POST", "/url", {"url": url})

    def js(self, script: str, *args):
        return self.cmd("POST", "/execute/sync", {"script": script, "args": list(args)})

    def js_async(self, script: str, *args):
        return self.cmd("POST", "/execute/async", {"script": script, "args": list(args)})

    def find(self, css: str) -> str:
        ref = self.cmd("POST", "/element", {"using": "css selector", "value": css})
        return next(iter(ref.values()))  # the W3C element-reference key

    def wait_ready(self, route: str, timeout: float = 20) -> None:
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.js("return document.body.getAttribute('data-ready')") == route:
                err = self.js("const e = document.querySelector('.error'); "
                              "return e && e.textContent")
                assert not err, f"page {route!r} failed: {err}"
                return
            time.sleep(0.05)
        raise AssertionError(f"page route {route!r} never became ready; body: "
                             f"{self.js('return document.body.innerText')[:500]}")

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self.cmd("GET", "/screenshot")))

    def quit(self) -> None:
        try:
            self.cmd("DELETE", "")
        finally:
            self.proc.terminate()
            self.proc.wait(timeout=10)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    requested: list[str] = []

    def log_message(self, *a):
        pass

    def do_GET(self):
        _Quiet.requested.append(self.path)
        super().do_GET()


@pytest.fixture
def served(planted_site):
    handler = functools.partial(_Quiet, directory=str(planted_site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    th = threading.Thread(target=httpd.serve_forever, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                    reason="Debian chromium + chromium-driver not installed (scripts/setup.sh "
                           "installs them)")
def test_real_browser(served, planted_site):
    x, token_ids, doc_ids = planted_corpus()
    z = x.clamp(min=0)
    profile = Path(tempfile.mkdtemp(prefix="polysae-chromium-"))
    wd = WebDriver(profile)
    try:
        wd.get(served + "/index.html")
        wd.wait_ready("home")
        n_rows = wd.js("return document.querySelectorAll('main table tbody tr').length")
        assert n_rows == F + 1  # all latents + the one pair
        wd.screenshot(REPO / "test-artifacts" / "browser-main.png")
        # sortable: clicking "latent" sorts by id descending
        wd.js("document.querySelector('th[data-key=id]').click()")
        ids = wd.js("return [...document.querySelectorAll('main table')[0].querySelectorAll("
                    "'tbody tr')].map(r => +r.dataset.id)")
        assert ids == sorted(ids, reverse=True) and len(ids) == F

        # latent page: the expected contexts, strongest first, peak token = the planted word
        wd.get(served + f"/index.html#latent/{STAR}")
        wd.wait_ready(f"latent/{STAR}")
        lines = wd.js("return [...document.querySelectorAll('.contexts .ctx')].map(l => "
                      "[...l.querySelectorAll('.tok')].map(s => s.textContent).join(''))")
        peaks = wd.js("return [...document.querySelectorAll('.contexts .ctx .peak')]"
                      ".map(s => s.textContent)")
        ref_v, ref_r = z[:, STAR].topk(CFG.stats.n_contexts)
        assert lines == [expected_window(token_ids, doc_ids, int(r), 4, 2) for r in ref_r]
        assert set(peaks) <= {" star", " Starbucks"} and len(peaks) == CFG.stats.n_contexts

        # split character renders whole
        wd.get(served + f"/index.html#latent/{EACUTE}")
        wd.wait_ready(f"latent/{EACUTE}")
        peaks = wd.js("return [...document.querySelectorAll('.contexts .ctx .peak')]"
                      ".map(s => s.textContent)")
        assert peaks and set(peaks) == {"é"}
        text = wd.js("return document.querySelector('.contexts').innerText")
        assert "caf" in text and "\ufffd" not in text

        # pair page: contexts where both fire, the promoted token of the pair atom
        wd.get(served + f"/index.html#pair/{STAR}-{COFFEE}")
        wd.wait_ready(f"pair/{STAR}-{COFFEE}")
        both = wd.js("return [...document.querySelectorAll('#pair-contexts .ctx')].map(l => "
                     "l.querySelector('.peak').textContent)")
        n_both = int(((z[:, STAR] > 0) & (z[:, COFFEE] > 0)).sum())
        assert both == [" Starbucks"] * min(n_both, CFG.stats.n_pair_contexts)
        body = wd.js("return document.querySelector('main').innerText")
        assert "Starbucks" in body.split("promotes")[1].split("suppresses")[0]
        assert wd.js("return document.querySelectorAll('.contexts[data-latent]').length") == 2
        wd.screenshot(REPO / "test-artifacts" / "browser-pair.png")

        # interaction-vs-co-occurrence scatter: every candidate pair, the listed one highlighted
        wd.get(served + "/index.html#pairs")
        wd.wait_ready("pairs")
        assert wd.js("return document.querySelectorAll('#scatter circle').length") == \
            F * (F - 1) // 2
        assert wd.js("return document.querySelectorAll('#scatter circle.shown').length") == 1
        wd.get(served + "/index.html#latent/0")  # a latent that never fires
        wd.wait_ready("latent/0")
        assert "never fired" in wd.js("return document.querySelector('main').innerText")

        # search by token text through the real input box, and by id
        wd.get(served + "/index.html")
        wd.wait_ready("home")
        box = wd.find("#search")
        wd.cmd("POST", f"/element/{box}/value", {"text": "coffee"})
        wd.cmd("POST", f"/element/{wd.find('#search-go')}/click", {})
        wd.wait_ready("search/coffee")
        hits = wd.js("return [...document.querySelectorAll('#search-results tr[data-id]')]"
                     ".map(r => +r.dataset.id)")
        fires = wd.js("return Object.fromEntries([...document.querySelectorAll("
                      "'#search-results tr[data-id]')].map(r => [r.dataset.id, "
                      "r.children[1].textContent]))")
        assert COFFEE in hits and "coffee" in fires[str(COFFEE)]
        assert "coffee" not in fires.get(str(STAR), "")
        wd.js("document.getElementById('search').value = '5'")
        wd.cmd("POST", f"/element/{wd.find('#search-go')}/click", {})
        wd.wait_ready("latent/5")

        # eval report links lead to the latents
        wd.get(served + "/index.html#report")
        wd.wait_ready("report")
        wd.js("[...document.querySelectorAll('#report a')].find(a => "
              "a.getAttribute('href').startsWith('#ids/')).click()")
        wd.wait_ready(f"ids/{STAR},{COFFEE}")
        shown = wd.js("return [...document.querySelectorAll('main tbody tr')].map(r => "
                      "+r.dataset.id)")
        assert sorted(shown) == [STAR, COFFEE]

        # nothing left the machine: every loaded resource is on the loopback server, and the
        # CSP blocks an attempt to reach out
        names = wd.js("return performance.getEntriesByType('resource').map(e => e.name)"
                      ".concat([location.href])")
        assert names and all(n.startswith(served + "/") for n in names), names
        blocked = wd.js_async(
            "const done = arguments[arguments.length - 1];"
            "document.addEventListener('securitypolicyviolation', e => done(e.blockedURI));"
            "const i = document.createElement('img'); i.src = 'http://203.0.113.7/x.png';"
            "document.body.append(i); setTimeout(() => done(null), 3000);")
        assert blocked and blocked.startswith("http://203.0.113.7")
        # no server needed: the same pages work from file:// (data are <script>s, not fetch())
        wd.get((planted_site / "index.html").as_uri() + f"#latent/{STAR}")
        wd.wait_ready(f"latent/{STAR}")
        assert wd.js("return document.querySelectorAll('.contexts .ctx').length") == \
            CFG.stats.n_contexts
    finally:
        wd.quit()
        shutil.rmtree(profile, ignore_errors=True)
    assert all(not p.startswith("http") for p in _Quiet.requested)


# -- store path and CLI ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def harvested(tmp_path_factory):
    from test_harvest import word_tokenizer  # a real fast tokenizer over a word vocabulary;
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from polysae.data.harvesting import HarvestConfig, harvest

    # the tokenizer's single-token pieces lack the spaces its decode inserts, so windows are
    # span-decoded
    tok = word_tokenizer()
    torch.manual_seed(0)
    model = HookedTransformer(HookedTransformerConfig(
        n_layers=1, d_model=32, n_ctx=16, d_head=8, n_heads=4, d_vocab=len(tok), act_fn="gelu",
        seed=0)).eval()
    model.tokenizer = tok  # set after construction: TL's tokenizer set-up wants a hub name
    root = tmp_path_factory.mktemp("harv")
    txt = root / "docs.txt"
    rng = np.random.default_rng(0)
    words = "the cat sat on a mat dog ran far away big red sun".split()
    txt.write_text("\n".join(" ".join(rng.choice(words, size=9)) for _ in range(40)) + "\n")
    out = root / "acts"
    harvest(HarvestConfig(model="tiny-words", hooks=["blocks.0.hook_resid_post"], dataset=str(txt),
                          tokens=300, ctx=16, out=str(out), dtype="float32", progress=False,
                          shard_size=100), model=model)
    sae = SAE(SAEConfig(d_in=32, d_sae=48, k=3, ranks=(32, 8, 8)))
    ck = root / "run" / "poly"
    sae.save(ck, metadata={"hook": "blocks.0.hook_resid_post", "model": "tiny-words"})
    SAE(SAEConfig(d_in=32, d_sae=40, k=3, decoder="linear")).save(
        root / "run" / "vanilla", metadata={"hook": "blocks.0.hook_resid_post"})
    return model, tok, out, ck


def test_build_site_from_store_matches_dense_encode(harvested, tmp_path):
    from polysae.browser import build_site
    from polysae.data.store import ActivationStore
    from polysae.sae import load_checkpoint

    model, tok, acts, ck = harvested
    sae, _ = load_checkpoint(ck)
    store = ActivationStore(acts, split="val", shuffle=False)
    cfg = BrowseConfig(stats=StatsConfig(n_contexts=5, left=3, right=1, chunk_rows=50))
    site = build_site(sae, store, tmp_path / "site", model=model, config=cfg)
    x = store.read_rows(0, store.n_rows)
    info = store.tokens()
    with torch.no_grad():
        z = sae.encode(x)
    summ = read_js(site / "data" / "summary.js")
    assert summ["n_rows"] == store.n_rows
    assert summ["meta"]["hook"] == "blocks.0.hook_resid_post"
    # promoted tokens = top of the unit linear atom through the model's W_U
    with torch.no_grad():
        lg = sae.decoder_directions() @ model.W_U
        ref_up = lg.topk(cfg.stats.n_logit_tokens, dim=1).indices
    assert summ["up"] == ref_up.tolist()
    sh = read_js(site / "data" / "latents_0000.js")
    f = int((z > 0).sum(0).argmax())
    v, r = z[:, f].topk(5)
    assert sh["row"][f] == r.tolist()
    cut = 0
    for t in range(5):  # span-decoded pieces join to the tokenizer's decode of the window
        row = int(r[t])
        same_doc = [q for q in range(row - 3, row + 2)
                    if 0 <= q < store.n_rows and info.doc_ids[q] == info.doc_ids[row]]
        # ... and stay inside the forward context the peak token was seen in
        ids = [int(info.token_ids[q]) for q in same_doc
               if info.positions[q] - info.positions[row] == q - row]
        cut += len(same_doc) - len(ids)
        pieces = sh["ov"][str(f * 5 + t)]
        assert "".join(pieces) == tok.decode(ids)
    # every context window of every latent: the context boundary really cuts some windows
    toks_all = torch.tensor(sh["tok"])  # [F, T, W]
    rows_all = torch.tensor(sh["row"])
    for lat in range(toks_all.shape[0]):
        for t in range(5):
            row = int(rows_all[lat, t])
            if row < 0:
                continue
            for w, q in enumerate(range(row - 3, row + 2)):
                inside = (0 <= q < store.n_rows and info.doc_ids[q] == info.doc_ids[row]
                          and info.positions[q] - info.positions[row] == q - row)
                assert (toks_all[lat, t, w] >= 0) == inside
                cut += int(0 <= q < store.n_rows and info.doc_ids[q] == info.doc_ids[row]
                           and not inside)
    assert cut > 0


def test_cli_browse(harvested, tmp_path, capsys):
    from polysae.__main__ import main

    _, _, acts, ck = harvested
    out = tmp_path / "site"
    assert main(["browse", "--sae", str(ck.parent), "--acts", str(acts), "--out", str(out),
                 "--no-model", "--contexts", "4", "--pairs", "10"]) == 0
    assert (out / "poly" / "index.html").is_file() and (out / "index.html").is_file()
    assert 'href="vanilla/index.html"' in (out / "index.html").read_text()
    summ = read_js(out / "poly" / "data" / "summary.js")
    assert summ["config"]["n_contexts"] == 4 and "up" not in summ
    # the flat config record, keys in the order of before the stats settings were nested
    assert list(summ["config"].items()) == [
        ("n_contexts", 4), ("left", 8), ("right", 4), ("n_pairs", 10), ("pair_candidates", 2000),
        ("n_pair_contexts", 10), ("n_logit_tokens", 10), ("hist_bins", 48), ("hist_lo", -3.0),
        ("hist_hi", 3.0), ("chunk_rows", 2048), ("shard_size", 256),
        ("title", "polysae browser: poly @ blocks.0.hook_resid_post")]
    assert read_js(out / "poly" / "data" / "pairs.js")["scatter"]["s"]
    vanilla = read_js(out / "vanilla" / "data" / "summary.js")
    assert vanilla["d_sae"] == 40 and read_js(out / "vanilla" / "data" / "pairs.js")["i"] == []
    single = tmp_path / "single"  # a checkpoint folder itself: the site goes straight into --out
    assert main(["browse", "--sae", str(ck), "--acts", str(acts), "--out", str(single),
                 "--no-model"]) == 0
    assert read_js(single / "data" / "summary.js")["d_sae"] == 48
    # an earlier site is replaced only with --overwrite; every SAE's folder is checked before
    # anything is built, and the message says what is there
    capsys.readouterr()
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    again = ["browse", "--sae", str(ck.parent), "--acts", str(acts), "--out", str(out),
             "--no-model", "--n-contexts", "2"]
    assert main(again) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert (f"polysae browse: error: browser: output folder {out / 'poly'} already holds a polysae "
            f"site of SAE {ck} (d_sae 48, model tiny-words, hook blocks.0.hook_resid_post), "
            "written ") in err
    assert "pass --overwrite" in err
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before
    assert main([*again, "--overwrite"]) == 0
    assert read_js(out / "vanilla" / "data" / "summary.js")["config"]["n_contexts"] == 2
    assert 'href="poly/index.html"' in (out / "index.html").read_text()
    # several SAEs into one SAE's site, or beside a foreign index.html: refused, even with
    # --overwrite (neither is a site of theirs to replace)
    for dest, said in ((single, "holds the polysae site of one SAE"),
                       (tmp_path / "mine", "holds an index.html that is not a polysae page")):
        dest.mkdir(exist_ok=True)
        if not (dest / "index.html").exists():
            (dest / "index.html").write_text("<html>my page</html>")
        assert main(["browse", "--sae", str(ck.parent), "--acts", str(acts), "--out", str(dest),
                     "--no-model", "--overwrite"]) == 1
        assert said in capsys.readouterr().err
    assert (tmp_path / "mine" / "index.html").read_text() == "<html>my page</html>"
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["index.html"]
    assert main(["browse", "--sae", str(tmp_path / "nope"), "--acts", str(acts), "--out",
                 str(out)]) == 2
    assert main(["browse", "--sae", str(ck), "--acts", str(tmp_path), "--out",
                 str(tmp_path / "s2"), "--no-model"]) == 2
    assert not (tmp_path / "s2").exists()


def test_saebench_plots_on_the_sae_page(tmp_path):
    """The SAE page gets absorption per letter and TPP per N (both variants) from the browsed
    SAE's eval block; per-letter and per-class detail is drawn, not listed as report rows."""
    from polysae.browser.links import saebench_plots

    letters = {"a": {"counted": True, "absorption_fraction": 0.25},
               "b": {"counted": False}}
    full = {"a": {"counted": True, "absorption_fraction": 0.5}, "b": {"counted": False}}
    poly = dict(REPORT["saes"]["poly"],
                absorption={"linear": {"mean_absorption_fraction": 0.25, "letters": letters},
                            "full": {"mean_absorption_fraction": 0.5, "letters": full}},
                tpp={"linear": {"total": {"2": 0.1, "20": 0.3},
                                "datasets": {"bbc": {"classes": {"x": {"2": {"total": 0.1}}}}}},
                     "full": {"total": {"2": 0.2, "20": 0.1}}})
    report = {**REPORT, "saes": {**REPORT["saes"], "poly": poly}}
    out = tmp_path / "site"
    build_planted(out, report=report)
    summ = read_js(out / "data" / "summary.js")
    assert summ["saebench"] == {
        "absorption": {"letters": ["a", "b"], "counted": [True, False], "linear": [0.25, None],
                       "full": [0.5, None], "mean_linear": 0.25, "mean_full": 0.5},
        "tpp": {"n": [2, 20], "linear": [0.1, 0.3], "full": [0.2, 0.1]}}
    names = {r["name"] for r in summ["report"]}
    assert "absorption.linear.mean_absorption_fraction" in names and "tpp.full.total.20" in names
    assert not any(".letters." in n or ".classes." in n for n in names)
    assert saebench_plots({"reconstruction": {"fvu": 0.1}}) is None
    if not (CHROMIUM and CHROMEDRIVER):
        return
    # the SAE page draws them in a real browser: a bar per letter and variant, a line each
    handler = functools.partial(_Quiet, directory=str(out))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    wd = WebDriver(Path(tempfile.mkdtemp(prefix="polysae-chromium-")))
    try:
        wd.get(f"http://127.0.0.1:{httpd.server_address[1]}/index.html")
        wd.wait_ready("home")
        assert wd.js("return document.querySelectorAll('svg.absorption rect').length") == 4
        assert wd.js("return document.querySelectorAll('svg.tpp polyline').length") == 2
        assert "mean 0.25 linear, 0.5 full" in wd.js(
            "return document.querySelector('.saebench').innerText")
    finally:
        wd.quit()
        httpd.shutdown()
        httpd.server_close()
