// Runs in a module Web Worker (cmrm.html starts it), as the page's Session does (www/worker.js):
// the threads build's pool needs a caller that may block. cmrm's browser API (Session) on the same mid-llava checkpoint, image, prompt and token count as
// bench.js (transformers.js). One Compare = two answers (unaltered + CMRM-steered), decoded as one
// batch; transformers.js needs two generate() calls for the same pair.

const q = new URLSearchParams(location.search);
const RUNS = Number(q.get('runs') ?? 3);
const WARMUP = Number(q.get('warmup') ?? 2);
const NEW_TOKENS = Number(q.get('tokens') ?? 32);
const WEIGHTS = q.get('weights') ?? 'f32';
const BACKEND = q.get('backend') ?? 'cpu';
// threads > 1: the threads build (dist/threads/, as the page's worker loads it on a cross-origin
// isolated page) with a pool of that many workers.
const THREADS = Number(q.get('threads') ?? 1);
const log = (s) => postMessage({ log: s });
const now = () => performance.now();
const median = (a) => { const s = [...a].sort((x, y) => x - y); const m = s.length >> 1; return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2; };

async function main() {
  const cmrm = await import(THREADS > 1 ? '/dist-cmrm/threads/cmrm.js' : '/dist-cmrm/cmrm.js');
  await cmrm.default();
  if (THREADS > 1) await cmrm.initThreadPool(THREADS);
  const { Session } = cmrm;
  const spec = await (await fetch('/mid-llava.spec.json')).json();
  const reference = await (await fetch('/assets/reference.json')).json();
  // ?model=NAME: another checkpoint under models/ (its cmrm-vectors.safetensors beside it).
  const base = new URL(`/models/${q.get('model') ?? 'mid-llava'}/`, location.href).href;
  const t0 = now();
  const s = await Session.load({ model: base, weights: WEIGHTS, backend: BACKEND,
    vectors: base + 'cmrm-vectors.safetensors' }, () => {});
  const load_ms = now() - t0;
  log(`loaded in ${load_ms.toFixed(0)} ms; ${JSON.stringify(s.info().backendDetail ?? s.info().backend ?? '')}`);
  const img = new Uint8Array(await (await fetch('/' + spec.bench.image)).arrayBuffer());
  const runs = [];
  for (let r = 0; r < WARMUP + RUNS; r++) {
    const ti = now();
    const imageInfo = await s.setImage(img);
    const set_image_ms = now() - ti;
    const stamps = { unaltered: [], steered: [] }, ids = { unaltered: [], steered: [] }, prefill = {};
    const tc = now();
    await s.compare({ prompt: spec.bench.question, maxNewTokens: NEW_TOKENS, alpha: 1, layers: 'all', variant: 'dataset' }, (ev) => {
      if (ev.kind === 'token') { stamps[ev.pane].push(now()); ids[ev.pane].push(ev.id); }
      if (ev.kind === 'prefill') prefill[ev.pane] = ev;
    });
    const tEnd = now();
    const u = stamps.unaltered, st = stamps.steered;
    const first = Math.max(u[0], st[0]);          // both panes have their first token
    const last = Math.max(u[u.length - 1], st[st.length - 1]);
    const nAfterFirst = (u.length - 1) + (st.length - 1);
    const rec = {
      run: r, warmup: r < WARMUP, image_tokens: imageInfo?.imageTokens ?? null,
      set_image_ms,                                   // decode + preprocess + vision tower + projector
      compare_to_both_first_ms: first - tc,           // both prefills + first tokens
      image_plus_prefills_ms: set_image_ms + (first - tc),
      pair_decode_tok_s: nAfterFirst / ((last - first) / 1000),   // tokens of both panes per second
      total_pair_ms: set_image_ms + (tEnd - tc),
      new_tokens: [u.length, st.length],
      unaltered_matches_reference: JSON.stringify(ids.unaltered) === JSON.stringify(reference.tokens.slice(0, ids.unaltered.length)),
      prefill,
    };
    log(JSON.stringify(rec));
    runs.push(rec);
  }
  const timed = runs.filter((x) => !x.warmup);
  const result = {
    ok: true, library: 'cmrm (project wasm build)', weights: WEIGHTS, backend: BACKEND, threads: THREADS, user_agent: navigator.userAgent,
    crossOriginIsolated: self.crossOriginIsolated, load_ms,
    reference_tokens_match: runs.every((x) => x.unaltered_matches_reference && x.new_tokens[0] === reference.tokens.length),
    median: {
      set_image_ms: median(timed.map((x) => x.set_image_ms)),
      image_plus_prefills_ms: median(timed.map((x) => x.image_plus_prefills_ms)),
      pair_decode_tok_s: median(timed.map((x) => x.pair_decode_tok_s)),
      total_pair_ms: median(timed.map((x) => x.total_pair_ms)),
    },
    runs,
  };
  postMessage({ result });
}
main().catch((e) => postMessage({ result: { ok: false, error: String(e && e.stack || e) } }));
