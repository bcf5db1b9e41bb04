// Module Web Worker: owns the wasm Session, so inference never blocks the page.
// Plumbing only — the model, the files, the steering all live in Rust (src/web/).
// Protocol: page → {id, type, ...args}; worker → {id, type: "result"|"error"|"event", ...}.

const reply = (id, type, body) => postMessage({ id, type, ...body });
const message = (e) => (e && e.message) || String(e);

/// Threads when the page is cross-origin isolated (served with COOP/COEP headers): the build in
/// threads/ (shared memory, a pool of Web Workers for the CPU kernels). Otherwise, or if that
/// build cannot start, the one-thread build; `threadsReason` (in `info`) says why.
const MAX_THREADS = 8;
let Session = null;
let threadsReason = null;
async function start() {
  if (self.crossOriginIsolated) {
    try {
      const threaded = await import("./threads/cmrm.js");
      await threaded.default();
      threaded.initPanicHook();
      await threaded.initThreadPool(Math.max(1, Math.min(navigator.hardwareConcurrency || 1, MAX_THREADS)));
      return threaded;
    } catch (e) {
      threadsReason = `the threads build did not start (${message(e)})`;
    }
  } else {
    threadsReason = "the page is not cross-origin isolated (no COOP/COEP headers)";
  }
  const single = await import("./cmrm.js");
  await single.default();
  single.initPanicHook();
  return single;
}
const ready = start().then((module) => { Session = module.Session; });
let session = null;
const withThreads = (info) => ({ ...info, threadsReason });

/// A failure cmrm reports (Rust's errors are `Error`s named CmrmError; so are the worker's own).
/// Anything else — a wasm trap (RuntimeError), a stack overflow (RangeError), out of memory —
/// means the instance may be broken: the page restarts the worker.
class CmrmError extends Error {
  constructor(msg) { super(msg); this.name = "CmrmError"; }
}
const isOurs = (e) => e instanceof Error && e.name === "CmrmError";

/// Browser-side fallback for images Rust cannot take as bytes (too many pixels, AVIF/BMP…):
/// decode with the browser, downscale so the long side is at most `maxSide`, hand over RGBA.
async function setImageViaBrowser(bytes, maxSide = 1024) {
  const bitmap = await createImageBitmap(new Blob([bytes]));
  const scale = Math.min(1, maxSide / Math.max(bitmap.width, bitmap.height));
  const w = Math.max(1, Math.round(bitmap.width * scale));
  const h = Math.max(1, Math.round(bitmap.height * scale));
  const canvas = new OffscreenCanvas(w, h);
  const ctx = canvas.getContext("2d");
  ctx.drawImage(bitmap, 0, 0, w, h);
  bitmap.close();
  const rgba = ctx.getImageData(0, 0, w, h).data;
  return { ...(await session.setImageRgba(w, h, new Uint8Array(rgba.buffer))), downscaled: scale < 1 };
}

const handlers = {
  /// For the tests of crash recovery (the page exposes it with ?testHooks=1): a real stack
  /// overflow in the worker, as a runaway recursion in a decoder would be.
  async crashForTest() {
    const recurse = (n) => recurse(n + 1) + 1;
    return recurse(0);
  },
  async plan({ options }) {
    return Session.plan(options);
  },
  async load({ id, options }) {
    if (session) { session.free(); session = null; }
    session = await Session.load(options, (p) => reply(id, "event", { event: { kind: "progress", ...p } }));
    return withThreads(session.info());
  },
  async setVectors({ name, bytes }) {
    need();
    return session.setVectors(name, bytes);
  },
  async loadVectors({ url, entry }) {
    need();
    return session.loadVectors(entry ?? url);
  },
  async setImage({ bytes }) {
    need();
    try {
      return await session.setImage(bytes);
    } catch (rustError) {
      // A crash must not be retried on the same instance.
      if (!isOurs(rustError)) throw rustError;
      // Rust decodes PNG/JPEG/WebP/GIF up to 40 MP; anything else the browser can decode goes
      // through a canvas. If the browser cannot decode it either, Rust's message says why.
      try {
        return await setImageViaBrowser(bytes);
      } catch {
        throw rustError;
      }
    }
  },
  async compare({ id, options }) {
    need();
    return session.compare(options, (event) => { reply(id, "event", { event }); return true; });
  },
  async calibrate({ id, options }) {
    need();
    return session.calibrate(options, (event) => reply(id, "event", { event }));
  },
  async exportVectors({ format }) {
    need();
    return session.exportVectors(format);
  },
  async info() {
    need();
    return withThreads(session.info());
  },
  async clearCache() {
    return Session.clearCache();
  },
};

function need() {
  if (!session) throw new CmrmError("no model is loaded: choose a model and press Load");
}

onmessage = async (e) => {
  const msg = e.data;
  if (msg.type === "stop") { session?.stop(); return; }
  try {
    await ready;
    const handler = handlers[msg.type];
    if (!handler) throw new CmrmError(`unknown request ${msg.type}`);
    reply(msg.id, "result", { value: await handler(msg) });
  } catch (err) {
    // kind: what cmrm says it is (cancelled, out-of-memory, error), or "crashed".
    const crashed = !isOurs(err);
    reply(msg.id, "error", { message: message(err), crashed, kind: crashed ? "crashed" : err.kind || "error" });
  }
};
