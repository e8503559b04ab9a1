// polysae feature browser. Plain DOM, no dependencies, no network: the data are the
// data/*.js files beside this page (script tags work from file:// where fetch() does not).
// Every string from the corpus is set with textContent, never innerHTML.
"use strict";
(function () {
  const D = window.POLYSAE || {};
  const S = D.summary, V = D.vocab || {}, P = D.pairs || {i: []};
  const main = document.getElementById("main");
  const shards = {};

  function el(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v; else if (k === "text") e.textContent = v;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v); else e.setAttribute(k, v);
    }
    for (const k of kids) if (k !== null && k !== undefined) e.append(k);
    return e;
  }
  function svg(tag, attrs) {
    const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    return e;
  }
  const fmt = (x, d = 4) => (x === null || x === undefined) ? "" :
    (typeof x === "number" ? (Math.abs(x) >= 1e4 || (x !== 0 && Math.abs(x) < 1e-3) ? x.toExponential(2) : +x.toPrecision(d)) : String(x));
  const show = (s) => s.replace(/\n/g, "↵").replace(/\t/g, "→").replace(/\r/g, "");
  const tokText = (t) => t < 0 ? "" : (t in V ? V[t] : "[" + t + "]");
  const latLink = (i) => el("a", {href: "#latent/" + i, text: "#" + i});
  const pairIndex = {};
  P.i.forEach((a, k) => { pairIndex[a + "-" + P.j[k]] = k; });

  function loadShard(k) {
    if (shards[k]) return Promise.resolve(shards[k]);
    const key = "latents_" + String(k).padStart(4, "0");
    return new Promise((res, rej) => {
      const s = el("script", {src: "data/" + key + ".js"});
      s.onload = () => { shards[k] = window.POLYSAE[key]; res(shards[k]); };
      s.onerror = () => rej(new Error("cannot load data/" + key + ".js"));
      document.head.append(s);
    });
  }
  const shardOf = (i) => Math.floor(i / S.shard_size);

  // -- tables ---------------------------------------------------------------------------------
  function table(cols, ids, opts) {
    opts = opts || {};
    let sortKey = opts.sort || cols[0].key, desc = opts.desc !== undefined ? opts.desc : true, page = 0;
    const size = opts.page || 100;
    const wrap = el("div", {class: "table"});
    function render() {
      const c = cols.find((c) => c.key === sortKey) || cols[0];
      const sorted = ids.slice().sort((a, b) => {
        const x = c.get(a), y = c.get(b);
        if (x === y) return a - b;
        if (x === null || x === undefined) return 1;
        if (y === null || y === undefined) return -1;
        return (x < y ? -1 : 1) * (desc ? -1 : 1);
      });
      const pages = Math.max(1, Math.ceil(sorted.length / size));
      page = Math.min(page, pages - 1);
      const head = el("tr", {}, ...cols.map((cc) => {
        const th = el("th", {text: cc.label, "data-key": cc.key, class: cc.key === sortKey ? (desc ? "sorted-desc" : "sorted-asc") : ""});
        th.addEventListener("click", () => { if (sortKey === cc.key) desc = !desc; else { sortKey = cc.key; desc = true; } render(); });
        return th;
      }));
      const body = sorted.slice(page * size, (page + 1) * size).map((i) => el("tr", {"data-id": i},
        ...cols.map((cc) => { const v = cc.cell ? cc.cell(i) : fmt(cc.get(i)); return el("td", {class: cc.num ? "num" : ""}, v); })));
      const pager = el("div", {class: "pager"},
        el("button", {text: "◀", onclick: () => { page = Math.max(0, page - 1); render(); }}),
        el("span", {text: `page ${page + 1} / ${pages} (${sorted.length} rows) `}),
        el("button", {text: "▶", onclick: () => { page = Math.min(pages - 1, page + 1); render(); }}));
      wrap.replaceChildren(el("table", {}, el("thead", {}, head), el("tbody", {}, ...body)), pages > 1 ? pager : "");
    }
    render();
    return wrap;
  }
  function tokList(ids, vals, cls) {
    return el("div", {class: "toklist " + (cls || "")}, ...(ids || []).map((t, k) =>
      el("span", {text: show(tokText(t)), title: vals ? "logit " + fmt(vals[k]) : ""})));
  }
  function strList(strs) {
    return el("div", {class: "toklist"}, ...strs.map((t) => el("span", {text: show(t)})));
  }
  function latentCols() {
    const cols = [
      {key: "id", label: "latent", get: (i) => i, cell: (i) => latLink(i), num: true},
      {key: "density", label: "density", get: (i) => S.density[i], num: true},
      {key: "mean", label: "mean act", get: (i) => S.mean[i], num: true},
      {key: "max", label: "max act", get: (i) => S.max[i], num: true},
    ];
    if (S.fires) cols.push({key: "tok", label: "fires on", get: (i) => (S.fires[i] || []).join(" "),
      cell: (i) => strList((S.fires[i] || []).slice(0, 3))});
    if (S.up) cols.push({key: "up", label: "promotes", get: (i) => tokText(S.up[i][0]), cell: (i) => tokList(S.up[i].slice(0, 3))});
    for (const [name, arr] of Object.entries(S.columns || {})) cols.push({key: name, label: name, get: (i) => arr[i], num: true});
    return cols;
  }
  function pairCols() {
    return [
      {key: "pair", label: "pair", get: (k) => k, cell: (k) => el("a", {href: `#pair/${P.i[k]}-${P.j[k]}`, text: `#${P.i[k]} × #${P.j[k]}`})},
      {key: "s", label: "|λ2|·‖B_ij‖", get: (k) => P.s[k], num: true},
      {key: "co", label: "co-active rows", get: (k) => P.co[k], num: true},
      {key: "up", label: "pair atom promotes", get: (k) => P.up ? tokText(P.up[k][0]) : "", cell: (k) => P.up ? tokList(P.up[k].slice(0, 3)) : ""},
    ];
  }

  // -- plots ----------------------------------------------------------------------------------
  function histogram(h) {
    const W = 420, H = 120, n = h.length, lo = S.hist.lo, hi = S.hist.hi;
    let a = h.findIndex((c) => c > 0), b = n - 1 - h.slice().reverse().findIndex((c) => c > 0);
    const g = svg("svg", {width: W, height: H + 20, class: "hist"});
    if (a < 0) { g.append(Object.assign(svg("text", {x: 10, y: 20}), {textContent: "never fires"})); return g; }
    a = Math.max(0, a - 1); b = Math.min(n - 1, b + 1);
    const m = Math.max(...h), bw = W / (b - a + 1);
    for (let k = a; k <= b; k++) {
      const y = H * h[k] / m;
      const r = svg("rect", {x: (k - a) * bw, y: H - y, width: Math.max(1, bw - 1), height: y, fill: "#23395d"});
      const e0 = Math.pow(10, lo + (hi - lo) * k / n), e1 = Math.pow(10, lo + (hi - lo) * (k + 1) / n);
      r.append(Object.assign(svg("title"), {textContent: `[${fmt(e0, 3)}, ${fmt(e1, 3)}): ${h[k]}`}));
      g.append(r);
    }
    const lab = (k, x, anchor) => Object.assign(svg("text", {x, y: H + 14, "text-anchor": anchor}), {textContent: fmt(Math.pow(10, lo + (hi - lo) * k / n), 3)});
    g.append(lab(a, 0, "start"), lab(b + 1, W, "end"));
    return g;
  }
  function scatter() {
    const sc = P.scatter;
    if (!sc || !sc.s.length) return el("p", {class: "muted", text: "No interaction candidates (linear decoder or order 1)."});
    const W = 520, H = 300, pad = 40;
    const xs = sc.co.map((c) => Math.log10(c + 1)), ys = sc.s;
    const xm = Math.max(1, ...xs), ym = Math.max(...ys) || 1, y0 = Math.min(...ys);
    const g = svg("svg", {width: W, height: H, id: "scatter"});
    g.append(svg("line", {x1: pad, y1: H - pad, x2: W - 5, y2: H - pad, stroke: "#888"}),
      svg("line", {x1: pad, y1: 5, x2: pad, y2: H - pad, stroke: "#888"}));
    const X = (x) => pad + (W - pad - 10) * x / xm, Y = (y) => H - pad - (H - pad - 10) * (y - y0) / ((ym - y0) || 1);
    sc.s.forEach((s, k) => {
      const key = sc.i[k] + "-" + sc.j[k], shown = key in pairIndex;
      const c = svg("circle", {cx: X(xs[k]), cy: Y(s), r: shown ? 3.5 : 2, class: "pt" + (shown ? " shown" : "")});
      c.append(Object.assign(svg("title"), {textContent: `#${sc.i[k]} × #${sc.j[k]}: strength ${fmt(s)}, co-active ${sc.co[k]}`}));
      if (shown) c.addEventListener("click", () => { location.hash = "#pair/" + key; });
      g.append(c);
    });
    g.append(Object.assign(svg("text", {x: W / 2, y: H - 8, "text-anchor": "middle"}), {textContent: "log10(1 + co-active rows)"}),
      Object.assign(svg("text", {x: 4, y: 12}), {textContent: "|λ2|·‖B_ij‖"}));
    return g;
  }

  // SAEBench absorption per letter and TPP drop vs N, variants linear and full (eval report)
  function saebenchPlots() {
    const sb = S.saebench;
    if (!sb) return null;
    const out = el("div", {class: "saebench"}, el("h2", {text: "SAEBench absorption and TPP: linear vs full decoder"}));
    const colors = {linear: "#23395d", full: "#d9822b"};
    const axis = (g, W, H, pad, ymin, ymax, label) => {
      g.append(svg("line", {x1: pad, y1: H - pad, x2: W - 5, y2: H - pad, stroke: "#888"}),
        svg("line", {x1: pad, y1: 5, x2: pad, y2: H - pad, stroke: "#888"}),
        Object.assign(svg("text", {x: 2, y: 12}), {textContent: label}),
        Object.assign(svg("text", {x: pad - 4, y: 16, "text-anchor": "end"}), {textContent: fmt(ymax, 2)}),
        Object.assign(svg("text", {x: pad - 4, y: H - pad, "text-anchor": "end"}), {textContent: fmt(ymin, 2)}));
    };
    const legend = (g, x) => ["linear", "full"].forEach((v, k) => g.append(
      Object.assign(svg("text", {x, y: 14 + 14 * k, fill: colors[v]}), {textContent: v})));
    if (sb.absorption) {
      const a = sb.absorption, W = 640, H = 200, pad = 40, n = a.letters.length;
      const ymax = Math.max(0.05, ...a.linear.concat(a.full).filter((x) => x !== null));
      const g = svg("svg", {width: W, height: H, class: "absorption"}), bw = (W - pad - 10) / n;
      axis(g, W, H, pad, 0, ymax, "absorption fraction");
      a.letters.forEach((c, k) => {
        ["linear", "full"].forEach((v, j) => {
          const y = a[v][k] === null ? 0 : (H - pad - 10) * a[v][k] / ymax;
          const r = svg("rect", {x: pad + k * bw + j * bw / 2, y: H - pad - y, width: Math.max(1, bw / 2 - 1), height: y, fill: colors[v]});
          r.append(Object.assign(svg("title"), {textContent: `${c} ${v}: ${fmt(a[v][k], 3)}${a.counted[k] ? "" : " (not counted)"}`}));
          g.append(r);
        });
        g.append(Object.assign(svg("text", {x: pad + (k + 0.5) * bw, y: H - pad + 14, "text-anchor": "middle", fill: a.counted[k] ? "#000" : "#aaa"}), {textContent: c}));
      });
      legend(g, W - 60);
      out.append(el("p", {text: `Absorption fraction per letter (grey letters are not counted): mean ${fmt(a.mean_linear, 3)} linear, ${fmt(a.mean_full, 3)} full.`}), g);
    }
    if (sb.tpp) {
      const t = sb.tpp, W = 420, H = 220, pad = 40;
      const vals = t.linear.concat(t.full).filter((x) => x !== null);
      const ymin = Math.min(0, ...vals), ymax = Math.max(0.01, ...vals);
      const lx = t.n.map((n) => Math.log10(n)), x0 = Math.min(...lx), x1 = Math.max(...lx);
      const X = (k) => pad + (W - pad - 20) * (x1 > x0 ? (lx[k] - x0) / (x1 - x0) : 0.5);
      const Y = (y) => H - pad - (H - pad - 10) * (y - ymin) / ((ymax - ymin) || 1);
      const g = svg("svg", {width: W, height: H, class: "tpp"});
      axis(g, W, H, pad, ymin, ymax, "TPP drop");
      ["linear", "full"].forEach((v) => {
        const pts = t[v].map((y, k) => y === null ? null : `${X(k)},${Y(y)}`).filter((p) => p);
        g.append(svg("polyline", {points: pts.join(" "), fill: "none", stroke: colors[v], "stroke-width": 2, "stroke-dasharray": v === "full" ? "5,3" : ""}));
      });
      t.n.forEach((n, k) => g.append(Object.assign(svg("text", {x: X(k), y: H - pad + 14, "text-anchor": "middle"}), {textContent: n})));
      legend(g, W - 50);
      out.append(el("p", {text: "TPP accuracy drop (intended − unintended) against the number of ablated latents N."}), g);
    }
    return out;
  }

  // -- contexts -------------------------------------------------------------------------------
  function context(data, c, val, tokRow, qRow, q2Row) {
    const ov = data.ov[String(c)];
    const line = el("div", {class: "ctx"}, el("span", {class: "val", text: fmt(val, 3)}));
    tokRow.forEach((t, w) => {
      const txt = ov ? ov[w] : tokText(t);
      if (t < 0) return;
      const s = el("span", {class: "tok" + (w === data.left ? " peak" : ""), text: show(txt === "" ? "" : txt)});
      s.style.backgroundColor = q2Row ? `rgba(30, 90, 200, ${0.7 * qRow[w] / 100})` : `rgba(255, 140, 0, ${0.85 * qRow[w] / 100})`;
      if (q2Row) s.style.borderBottom = `3px solid rgba(220, 110, 0, ${0.9 * q2Row[w] / 100})`;
      s.title = q2Row ? `a_i ≈ ${qRow[w]}%, a_j ≈ ${q2Row[w]}% of max` : `≈ ${qRow[w]}% of max`;
      line.append(s);
    });
    return line;
  }
  function latentContexts(sh, i, limit) {
    const r = i - sh.lo, out = el("div", {class: "contexts", "data-latent": i});
    const n = Math.min(sh.n[r], limit || sh.T);
    if (!n) out.append(el("p", {class: "muted", text: "This latent never fired on the held-out rows."}));
    for (let t = 0; t < n; t++) out.append(context(sh, r * sh.T + t, sh.val[r][t], sh.tok[r][t], sh.q[r][t]));
    return out;
  }

  // -- pages ----------------------------------------------------------------------------------
  function stats() {
    const dead = S.density.filter((d) => d === 0).length;
    return el("div", {class: "stats"},
      el("span", {text: `d_sae ${S.d_sae}`}), el("span", {text: `d_in ${S.d_in}`}),
      el("span", {text: `${S.decoder} decoder, ${S.sparsifier}`}), el("span", {text: `${S.n_rows} tokens`}),
      el("span", {text: `${dead} latents never fire`}), S.lambda2 !== null ? el("span", {text: `λ2 = ${fmt(S.lambda2)}`}) : null);
  }
  function pageHome(sort) {
    const ids = [...Array(S.d_sae).keys()];
    main.replaceChildren(el("h1", {text: S.title}), stats(), saebenchPlots() || "",
      el("h2", {text: "Latents"}), table(latentCols(), ids, {sort: sort || "density", desc: true}),
      el("h2", {text: "Strongest co-active interactions"}), P.i.length ? table(pairCols(), [...P.i.keys()], {sort: "s", page: 20}) :
        el("p", {class: "muted", text: "No co-active interaction pairs."}));
  }
  function pagePairs() {
    main.replaceChildren(el("h1", {text: "Interactions"}),
      el("p", {text: "Candidates are the strongest pairs by |λ2|·‖B_ij‖ over all i < j; the table lists those that co-fire on held-out tokens. Orange points (clickable) are listed."}),
      scatter(), el("h2", {text: "Pairs"}), table(pairCols(), [...P.i.keys()], {sort: "s"}));
  }
  function pageReport() {
    const rows = S.report || [];
    main.replaceChildren(el("h1", {text: "Eval report"}), rows.length ? el("table", {id: "report"},
      el("tr", {}, el("th", {text: "metric"}), el("th", {text: "value"}), el("th", {text: "latents"})),
      ...rows.map((r) => el("tr", {}, el("td", {text: r.name}), el("td", {class: "num", text: r.value}),
        el("td", {}, el("a", {href: r.link, text: "→ latents"}))))) :
      el("p", {class: "muted", text: "No eval report was given to `polysae browse --report`."}));
  }
  function pageIds(list) {
    const ids = list.split(",").map(Number).filter((i) => Number.isInteger(i) && i >= 0 && i < S.d_sae);
    main.replaceChildren(el("h1", {text: `${ids.length} latents`}), table(latentCols(), ids, {sort: "density"}));
  }
  async function pageLatent(i) {
    if (!(i >= 0 && i < S.d_sae)) { main.replaceChildren(el("p", {text: `No latent ${i} (d_sae = ${S.d_sae}).`})); return; }
    const sh = await loadShard(shardOf(i));
    const mine = [...P.i.keys()].filter((k) => P.i[k] === i || P.j[k] === i);
    main.replaceChildren(
      el("h1", {id: "latent-title", text: `Latent #${i}`}),
      el("div", {class: "stats"}, el("span", {text: `density ${fmt(S.density[i])}`}),
        el("span", {text: `mean act ${fmt(S.mean[i])}`}), el("span", {text: `max act ${fmt(S.max[i])}`}),
        el("a", {href: "#latent/" + (i - 1), text: "◀ prev"}), el("a", {href: "#latent/" + (i + 1), text: "next ▶"})),
      el("div", {class: "cols"},
        el("div", {}, el("h2", {text: "Activation histogram (log scale, active rows)"}), histogram(sh.hist[i - sh.lo])),
        S.up ? el("div", {}, el("h2", {text: "Linear atom promotes"}), tokList(S.up[i], S.upv[i]),
          el("h2", {text: "Linear atom suppresses"}), tokList(S.down[i], S.downv[i], "down")) : null),
      el("h2", {text: "Top activating contexts"}), latentContexts(sh, i),
      el("h2", {text: "Strongest interactions"}), mine.length ? table(pairCols(), mine, {sort: "s"}) :
        el("p", {class: "muted", text: "No listed pair involves this latent."}));
  }
  async function pagePair(a, b) {
    if (a > b) [a, b] = [b, a];
    const k = pairIndex[a + "-" + b];
    if (k === undefined) { main.replaceChildren(el("p", {text: `Pair #${a} × #${b} is not among the listed interactions.`})); return; }
    const [sa, sb] = await Promise.all([loadShard(shardOf(a)), loadShard(shardOf(b))]);
    const both = el("div", {class: "contexts", id: "pair-contexts"});
    for (let t = 0; t < P.T; t++) {
      if (!(P.val[k][t] > 0)) break;
      both.append(context(P, k * P.T + t, P.val[k][t], P.tok[k][t], P.q[k][t][0], P.q[k][t][1]));
    }
    main.replaceChildren(
      el("h1", {id: "pair-title"}, "Interaction ", latLink(a), " × ", latLink(b)),
      el("div", {class: "stats"}, el("span", {text: `|λ2|·‖B_ij‖ = ${fmt(P.s[k])}`}), el("span", {text: `co-active on ${P.co[k]} tokens`})),
      P.up ? el("div", {}, el("h2", {text: "Pairwise atom λ2·B_ij promotes"}), tokList(P.up[k], P.upv[k]),
        el("h2", {text: "… and suppresses"}), tokList(P.down[k], P.downv[k], "down")) : null,
      el("h2", {text: "Where both fire (ranked by z_i · z_j)"}),
      el("p", {}, el("span", {class: "legend-i", text: ` #${a} `}), " background, ", el("span", {class: "legend-j", text: ` #${b} `}), " underline"),
      both,
      el("div", {class: "cols"},
        el("div", {}, el("h2", {}, "Own top contexts of ", latLink(a)), latentContexts(sa, a, 10)),
        el("div", {}, el("h2", {}, "Own top contexts of ", latLink(b)), latentContexts(sb, b, 10))));
  }
  function pageSearch(q) {
    const needle = q.trim().toLowerCase();
    const toks = new Set(Object.keys(V).filter((t) => V[t].trim().toLowerCase().includes(needle)).map(Number));
    const hits = [];
    for (let i = 0; i < S.d_sae; i++) {
      const fires = (S.fires ? S.fires[i] : []).filter((t) => t.trim().toLowerCase().includes(needle));
      const prom = (S.up ? S.up[i] : []).filter((t) => toks.has(t));
      if (fires.length || prom.length) hits.push({i, fires, prom});
    }
    const pairHits = P.up ? [...P.i.keys()].filter((k) => P.up[k].some((t) => toks.has(t))) : [];
    main.replaceChildren(el("h1", {text: `Search “${q}”`}),
      el("p", {text: `${toks.size} matching tokens, ${hits.length} latents, ${pairHits.length} pairs.`}),
      el("table", {id: "search-results"}, el("tr", {}, el("th", {text: "latent"}), el("th", {text: "fires on"}), el("th", {text: "promotes"})),
        ...hits.slice(0, 500).map((h) => el("tr", {"data-id": h.i}, el("td", {}, latLink(h.i)), el("td", {}, strList(h.fires)), el("td", {}, tokList(h.prom))))),
      pairHits.length ? el("h2", {text: "Pairs whose atom promotes it"}) : null,
      pairHits.length ? table(pairCols(), pairHits, {sort: "s"}) : null);
  }

  async function route() {
    const h = decodeURIComponent(location.hash.slice(1));
    let m;
    try {
      if ((m = h.match(/^latent\/(-?\d+)$/))) await pageLatent(+m[1]);
      else if ((m = h.match(/^pair\/(\d+)-(\d+)$/))) await pagePair(+m[1], +m[2]);
      else if (h === "pairs") pagePairs();
      else if (h === "report") pageReport();
      else if ((m = h.match(/^ids\/([\d,]*)$/))) pageIds(m[1]);
      else if ((m = h.match(/^search\/(.*)$/s))) pageSearch(m[1]);
      else if ((m = h.match(/^latents\/sort=(.+)$/))) pageHome(m[1]);
      else pageHome();
    } catch (e) {
      main.replaceChildren(el("p", {class: "error", text: String(e)}));
    }
    document.body.setAttribute("data-ready", h || "home");
    window.scrollTo(0, 0);
  }
  document.getElementById("search-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const q = document.getElementById("search").value.trim();
    let m;
    if (/^\d+$/.test(q)) location.hash = "#latent/" + q;
    else if ((m = q.match(/^#?(\d+)\s*[-x×,]\s*#?(\d+)$/))) location.hash = `#pair/${m[1]}-${m[2]}`;
    else if (q) location.hash = "#search/" + encodeURIComponent(q);
  });
  document.getElementById("footer").textContent =
    `polysae feature browser · ${S.n_rows} held-out tokens · ${JSON.stringify(S.meta)}`;
  window.addEventListener("hashchange", route);
  route();
})();
