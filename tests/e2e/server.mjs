// Minimal static file server for the built page (dist/): GET and HEAD, correct MIME types
// (application/wasm), Content-Length, no directory escapes. Logs each request when asked.
//   node tests/e2e/server.mjs [dir=dist] [port=8080]     (port 0 = any free port)
import { createServer } from "node:http";
import { createReadStream, promises as fs } from "node:fs";
import { extname, join, resolve, sep } from "node:path";
import { pathToFileURL } from "node:url";

const TYPES = {
  ".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".mjs": "text/javascript; charset=utf-8",
  ".css": "text/css; charset=utf-8", ".json": "application/json", ".wasm": "application/wasm",
  ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp", ".gif": "image/gif",
  ".svg": "image/svg+xml", ".jinja": "text/plain; charset=utf-8", ".txt": "text/plain; charset=utf-8",
  ".safetensors": "application/octet-stream",
};

/// The page's Content-Security-Policy, sent with every response (a module worker takes the policy
/// of its own script's response, so a <meta> in the HTML would not cover it). Scripts only from
/// the page's origin (and wasm compilation); model and vector downloads from the origin or any
/// https host (Hugging Face, or a folder the user names); images from blobs (the preview);
/// no plugins, forms or base-URL changes. Embedding is allowed (the embed view exists for it).
/// Workers from blobs: the threads build's pool starts its workers from a blob of its own script.
export const CSP = [
  "default-src 'self'",
  "script-src 'self' 'wasm-unsafe-eval'",
  "worker-src 'self' blob:",
  "connect-src 'self' https:",
  "img-src 'self' blob: data:",
  "style-src 'self'",
  "object-src 'none'",
  "base-uri 'none'",
  "form-action 'none'",
  "frame-ancestors *",
].join("; ");

/// Cross-origin isolation: what SharedArrayBuffer, and so wasm threads, need.
export const ISOLATION = {
  "cross-origin-opener-policy": "same-origin",
  "cross-origin-embedder-policy": "require-corp",
};

/// Starts serving `dir` on 127.0.0.1:`port`; resolves to {server, origin, requests}.
/// `extra` maps URL paths to Buffers served as files (test fixtures that need not exist on disk),
/// or to `{buffer, headSize}` for a file whose HEAD announces another size.
/// Single `Range: bytes=a-b` requests get a 206, as the Hugging Face CDN answers.
/// `isolated` (default): COOP/COEP headers, so the page is cross-origin isolated and its worker
/// runs the threads build; `false` serves it as a host without those headers would.
export async function serve(dir, port = 0, extra = {}, { isolated = true } = {}) {
  const root = resolve(dir);
  const requests = [];
  const server = createServer(async (req, res) => {
    requests.push(`${req.method} ${req.url}${req.headers.range ? ` [${req.headers.range}]` : ""}`);
    try {
      if (req.method !== "GET" && req.method !== "HEAD") { res.writeHead(405).end(); return; }
      let path = decodeURIComponent(new URL(req.url, "http://x").pathname);
      if (path.endsWith("/")) path += "index.html";
      const file = resolve(join(root, path));
      if (file !== root && !file.startsWith(root + sep)) { res.writeHead(403).end(); return; }
      // An extra entry is a Buffer, or {buffer, headSize}: a HEAD that announces another size.
      const entry = extra[path];
      const buffer = Buffer.isBuffer(entry) ? entry : entry?.buffer;
      const stat = buffer ? { size: buffer.length, isFile: () => true } : await fs.stat(file).catch(() => null);
      if (!stat || !stat.isFile()) { res.writeHead(404, { "content-type": "text/plain" }).end("not found\n"); return; }
      const headers = {
        "content-type": TYPES[extname(path).toLowerCase()] || "application/octet-stream",
        "cache-control": "no-cache",
        "accept-ranges": "bytes",
        "content-security-policy": CSP,
        "x-content-type-options": "nosniff",
        ...(isolated ? ISOLATION : {}),
      };
      let [start, end, status] = [0, stat.size - 1, 200];
      const range = /^bytes=(\d+)-(\d*)$/.exec(req.headers.range || "");
      if (range && Number(range[1]) < stat.size) {
        [start, end, status] = [Number(range[1]), Math.min(range[2] ? Number(range[2]) : end, stat.size - 1), 206];
        headers["content-range"] = `bytes ${start}-${end}/${stat.size}`;
      }
      headers["content-length"] = stat.size ? end - start + 1 : 0;
      if (req.method === "HEAD" && entry?.headSize) headers["content-length"] = entry.headSize;
      res.writeHead(status, headers);
      if (req.method === "HEAD" || !stat.size) res.end();
      else if (buffer) res.end(buffer.subarray(start, end + 1));
      else createReadStream(file, { start, end }).pipe(res);
    } catch (err) {
      res.writeHead(500).end(String(err));
    }
  });
  await new Promise((ok, fail) => server.once("error", fail).listen(port, "127.0.0.1", ok));
  return { server, origin: `http://127.0.0.1:${server.address().port}`, requests };
}

if (process.argv[1] && import.meta.url === pathToFileURL(resolve(process.argv[1])).href) {
  const [dir = "dist", port = "8080"] = process.argv.slice(2);
  const { origin } = await serve(dir, Number(port));
  console.log(`cmrm: serving ${resolve(dir)} at ${origin}/  (Ctrl+C to stop)`);
}
