// End-to-end test of the built page (dist/, from `trunk build --release`) in headless Chromium:
// the real page, the real worker, the real wasm. Run by scripts/test-browser.sh, or:
//   (cd tests/e2e && npm ci && DIST=../../dist npm test)
// Chromium is the system one (/usr/bin/chromium, or $CHROMIUM); nothing is downloaded.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, readdirSync, mkdirSync, mkdtempSync, existsSync, writeFileSync } from "node:fs";
import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import { tmpdir } from "node:os";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";
import { serve } from "./server.mjs";

const here = dirname(fileURLToPath(import.meta.url));
const repo = resolve(here, "../..");
const dist = resolve(process.env.DIST || resolve(repo, "dist"));
const artifacts = resolve(process.env.ARTIFACTS || resolve(repo, "artifacts"));
const refsDir = resolve(repo, "tests/fixtures/oracle/refs");
const refs = JSON.parse(readFileSync(resolve(refsDir, "tiny-llava-siglip-qwen2/refs.json"), "utf8"));
const case0 = refs.cases.find((c) => c.id === "img0_q0"); // red_square, "What is in the image?"

let site, browser, page;
const requests = []; // every URL the page or its worker asked for
const consoleErrors = [];
const T = 60_000;

const byTestId = (id) => page.getByTestId(id);
const status = () => byTestId("status").textContent();
const waitStatus = (s, timeout = T) =>
  page.waitForFunction((s) => document.querySelector('[data-testid="status"]').textContent === s, s, { timeout });
const paneIds = async (pane) => JSON.parse((await byTestId(pane).getAttribute("data-ids")) || "null");

/// Load the selected model, upload the oracle's red square, ask case 0's question for 12 tokens.
async function loadAndCompareCase0() {
  await byTestId("load-model").click();
  await waitStatus("ready");
  await byTestId("image-input").setInputFiles(resolve(refsDir, "tiny-llava-siglip-qwen2/red_square.png"));
  await page.waitForFunction(() => /image tokens/.test(document.getElementById("image-info").textContent), null, { timeout: T });
  await byTestId("prompt").fill(case0.question);
  await page.locator("#max-tokens").fill("12");
  await runCompare();
}

async function runCompare() {
  await byTestId("compare").click();
  await waitStatus("ready");
  for (const pane of ["pane-unaltered", "pane-steered"]) assert.equal(await byTestId(pane).getAttribute("data-done"), "true", pane);
}

/// A model folder whose weights header declares a 151936×`hidden` F16 embedding (the body is
/// never read): the page must judge it before downloading, from the header alone (HTTP range
/// requests).
function headerOnlyModel(folder, hidden) {
  const bundled = resolve(dist, "assets/models/tiny-llava-siglip-qwen2");
  let header = JSON.stringify({ "language_model.model.embed_tokens.weight": { dtype: "F16", shape: [151936, hidden], data_offsets: [0, 151936 * hidden * 2] } });
  header += " ".repeat((8 - (header.length % 8)) % 8);
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(header.length));
  return {
    [`/${folder}/config.json`]: readFileSync(resolve(bundled, "config.json")),
    [`/${folder}/tokenizer.json`]: readFileSync(resolve(bundled, "tokenizer.json")),
    [`/${folder}/model.safetensors`]: Buffer.concat([len, Buffer.from(header), Buffer.alloc(64)]),
  };
}

/// `huge` (hidden 65536): no weight format fits (5.6 GB even in 4-bit). `mid` (hidden 7168):
/// 4.4 GB as F32, 1.2 GB with 8-bit weights (the table quantized by rows, shared with the tied
/// lm_head): `auto` must choose q8_0.
function oversizedModel() {
  return { ...headerOnlyModel("huge", 65536), ...headerOnlyModel("mid", 7168), ...badCatalog() };
}

/// The real catalog with the bundled entry's sha256 changed: the page must refuse the download.
function badCatalog() {
  const catalog = JSON.parse(readFileSync(resolve(dist, "vectors/catalog.json"), "utf8"));
  catalog.entries[0].sha256 = "0".repeat(64);
  return { "/bad-catalog.json": Buffer.from(JSON.stringify(catalog)) };
}

/// The oracle's CLIP+Llama checkpoint as a second model folder: the catalog has no entry for it.
function uncataloguedModel() {
  const dir = resolve(repo, "tests/fixtures/oracle/fixtures/tiny-llava-clip-llama");
  const files = readdirSync(dir).filter((f) => !f.endsWith(".md"));
  return Object.fromEntries(files.map((f) => [`/more-models/tiny-llava-clip-llama/${f}`, readFileSync(resolve(dir, f))]));
}

/// The native CLI's greedy ids for case 0's image and question on the q4 copy (6 tokens, unaltered).
let quantizedNativeIds = null;

/// The bundled model's `cmrm quantize --format q4` copy (model.gguf + the other files), made by
/// the CLI that the native tests built (cargo builds it when missing).
function quantizedCopy() {
  const cli = resolve(repo, "target/debug/cmrm");
  if (!existsSync(cli)) execFileSync("cargo", ["build", "--bin", "cmrm"], { cwd: repo, stdio: "inherit" });
  const out = resolve(mkdtempSync(resolve(tmpdir(), "cmrm-e2e-")), "copy");
  const src = resolve(repo, "tests/fixtures/oracle/fixtures/tiny-llava-siglip-qwen2");
  execFileSync(cli, ["quantize", "--model", src, "--format", "q4", "--out", out], { stdio: "pipe" });
  const answer = execFileSync(cli, ["generate", "--model", out, "--backend", "cpu", "--json", "--max-new-tokens", "6",
    "--image", resolve(refsDir, "tiny-llava-siglip-qwen2/red_square.png"), "--prompt", case0.question], { stdio: ["ignore", "pipe", "pipe"] });
  quantizedNativeIds = JSON.parse(answer.toString("utf8")).generated_ids;
  return Object.fromEntries(readdirSync(out).map((f) => [`/quantized-copy/${f}`, readFileSync(resolve(out, f))]));
}

/// The real llava-interleave-qwen-0.5b-hf files (2 text + 2 vision layers, synthetic BF16 weights,
/// 431 MB) written by `cmrm synthesize`: transformers computed its greedy ids on the same weights
/// (tests/fixtures/real/refs.json).
function realFilesCheckpoint() {
  const cli = resolve(repo, "target/debug/cmrm");
  if (!existsSync(cli)) execFileSync("cargo", ["build", "--bin", "cmrm"], { cwd: repo, stdio: "inherit" });
  const out = resolve(mkdtempSync(resolve(tmpdir(), "cmrm-e2e-")), "real-interleave");
  const files = resolve(repo, "tests/fixtures/real/llava-interleave-qwen-0.5b-hf");
  execFileSync(cli, ["synthesize", "--files", files, "--out", out, "--layers", "2,2"], { stdio: "pipe" });
  return Object.fromEntries(readdirSync(out).map((f) => [`/real-interleave/${f}`, readFileSync(resolve(out, f))]));
}
/// The native CLI's greedy ids on the 7B-shaped copy (text only, 4 tokens, unaltered).
let sevenBNativeIds = null;
/// Its vector file (`cmrm extract`, native).
let sevenBVectors = null;

/// A checkpoint with LLaVA-1.5-7B's widths (tests/fixtures/llava-1.5-7b-shaped: Vicuna-7B and
/// CLIP ViT-L/336 widths, 1 text + 1 vision layer, random weights) as a q4 GGUF (285 MB), with
/// dataset-level vectors `cmrm extract` computed on it natively (2 prompts).
function sevenBShaped() {
  const cli = resolve(repo, "target/debug/cmrm");
  if (!existsSync(cli)) execFileSync("cargo", ["build", "--bin", "cmrm"], { cwd: repo, stdio: "inherit" });
  const tmp = mkdtempSync(resolve(tmpdir(), "cmrm-e2e-"));
  const out = resolve(tmp, "q4");
  // (`synthesize --format q4` writes what `quantize` makes of the BF16 checkpoint: tests/cli.rs)
  execFileSync(cli, ["synthesize", "--files", resolve(repo, "tests/fixtures/llava-1.5-7b-shaped"), "--out", out, "--layers", "1,1",
    "--format", "q4"], { stdio: "pipe" });
  const answer = execFileSync(cli, ["generate", "--model", out, "--backend", "cpu", "--json", "--max-new-tokens", "4",
    "--prompt", "What is in the image?"], { stdio: ["ignore", "pipe", "pipe"] });
  sevenBNativeIds = JSON.parse(answer.toString("utf8")).generated_ids;
  const calibration = resolve(tmp, "calibration.jsonl");
  writeFileSync(calibration, ["Describe the picture.", "What colour is it?"].map((prompt) => JSON.stringify({ prompt })).join("\n"));
  execFileSync(cli, ["extract", "--model", out, "--calibration", calibration, "--backend", "cpu", "--out", resolve(tmp, "vectors.safetensors")], { stdio: "pipe" });
  sevenBVectors = resolve(tmp, "vectors.safetensors");
  return Object.fromEntries(readdirSync(out).map((f) => [`/llava-7b-shaped/${f}`, readFileSync(resolve(out, f))]));
}

const realRefs = JSON.parse(readFileSync(resolve(repo, "tests/fixtures/real/refs.json"), "utf8"));

/// The bundled model's files under `folder`, with `replace` swapping some of them.
function bundledAs(folder, replace = {}) {
  const dir = resolve(dist, "assets/models/tiny-llava-siglip-qwen2");
  const files = readdirSync(dir).filter((f) => !f.endsWith(".md") && !f.startsWith("cmrm-vectors"));
  return Object.fromEntries(files.map((f) => [`/${folder}/${f}`, replace[f] ?? readFileSync(resolve(dir, f))]));
}

/// Folders that must not load: a captive portal's page for config.json; weights shorter than
/// their HEAD said.
function hostileFolders() {
  const weights = readFileSync(resolve(dist, "assets/models/tiny-llava-siglip-qwen2/model.safetensors"));
  return {
    ...bundledAs("portal-model", { "config.json": Buffer.from("<!doctype html><html><body>Please log in to the Wi-Fi</body></html>") }),
    ...bundledAs("short-weights", { "model.safetensors": { buffer: weights.subarray(0, weights.length - 4096), headSize: weights.length } }),
  };
}

const cacheKeys = () => page.evaluate(async () => (await (await caches.open("cmrm-models-v2")).keys()).map((r) => r.url));

/// A calibration set long enough to press Stop while it runs.
function longCalibrationSet() {
  const lines = Array.from({ length: 4000 }, (_, i) => JSON.stringify({ prompt: `Question number ${i}: what is this?` }));
  return { "/long-calibration.jsonl": Buffer.from(lines.join("\n")) };
}

/// The `__metadata__` of a safetensors file.
function safetensorsMetadata(bytes) {
  const n = Number(bytes.readBigUInt64LE(0));
  return JSON.parse(bytes.subarray(8, 8 + n).toString("utf8")).__metadata__;
}

before(async () => {
  site = await serve(dist, 0, {
    ...oversizedModel(), ...uncataloguedModel(), ...longCalibrationSet(), ...quantizedCopy(), ...realFilesCheckpoint(), ...sevenBShaped(),
    ...hostileFolders(),
  });
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    chromiumSandbox: false,
    // WebGPU on SwiftShader: `auto` must skip it (software), `webgpu` must use it.
    args: ["--no-sandbox", "--enable-unsafe-webgpu", "--disable-background-networking", "--disable-component-update", "--disable-sync",
      "--disable-quic", "--no-first-run"],
  });
  const context = await browser.newContext({ viewport: { width: 1200, height: 1500 } });
  context.on("request", (r) => requests.push(r.url()));
  page = await context.newPage();
  page.on("worker", (w) => w.on("console", (m) => m.type() === "error" && consoleErrors.push(`worker: ${m.text()}`)));
  page.on("console", (m) => m.type() === "error" && consoleErrors.push(m.text()));
  page.on("pageerror", (e) => consoleErrors.push(`pageerror: ${e.message}`));
});

after(async () => {
  await browser?.close();
  site?.server.close();
});

test("bundled random-weight model: upload, compare, stream both panes, chart, same-origin only", async () => {
  await page.goto(`${site.origin}/index.html?model=bundled-random`);
  assert.equal(await status(), "no model");
  assert.equal(await byTestId("model-select").inputValue(), "bundled-random");
  assert.match(await page.locator("#model-select option:checked").textContent(), /random weights/);

  const t0 = Date.now();
  await byTestId("load-model").click();
  await waitStatus("ready");
  const loadMs = Date.now() - t0;
  assert.equal(await byTestId("progress").evaluate((p) => p.value), 1);
  // The weights were converted while they streamed in (never held whole).
  assert.equal(await page.locator("#model-info").getAttribute("data-streamed"), "true");
  // Defaults come from the vector file's metadata.
  assert.equal(await byTestId("alpha").inputValue(), "0.5");
  assert.equal(await byTestId("layers").inputValue(), "all");

  await byTestId("image-input").setInputFiles(resolve(refsDir, "tiny-llava-siglip-qwen2/red_square.png"));
  await page.waitForFunction(() => /image tokens/.test(document.getElementById("image-info").textContent), null, { timeout: T });
  await byTestId("prompt").fill(case0.question);
  await page.locator("#max-tokens").fill("12");

  const t1 = Date.now();
  await byTestId("compare").click();
  await waitStatus("ready");
  const compareMs = Date.now() - t1;
  const unaltered = (await byTestId("pane-unaltered").textContent()).trim();
  const steered = (await byTestId("pane-steered").textContent()).trim();
  assert.ok(unaltered.length > 0, "unaltered pane is empty");
  assert.ok(steered.length > 0, "steered pane is empty");
  assert.notEqual(unaltered, steered, "α ≠ 0 must change the answer");
  // Greedy ids equal the transformers oracle (α = 0.5, all layers ↔ shift_all_layers_a0.5).
  assert.deepEqual(await paneIds("pane-unaltered"), case0.multimodal.generated_ids);
  assert.deepEqual(await paneIds("pane-steered"), case0.steered_multimodal["shift_all_layers_a0.5"].generated_ids);
  assert.match(await page.locator("#speed-steered").textContent(), /tokens\/s/);
  // Served with COOP/COEP: the worker runs the threads build, on every core Chromium reports.
  const cores = await page.evaluate(() => navigator.hardwareConcurrency);
  assert.equal(await page.locator("#model-info").getAttribute("data-threads"), String(Math.min(cores, 8)));

  // Chart: one bar per layer (‖v_l‖) and the gap before/after per layer.
  const chart = byTestId("layer-chart");
  assert.equal(await chart.getAttribute("data-drawn"), "true");
  assert.equal(await chart.locator("rect.bar").count(), 3);
  assert.equal(await chart.locator("circle.gap-before").count(), 3);
  assert.equal(await chart.locator("circle.gap-after").count(), 3);

  mkdirSync(artifacts, { recursive: true });
  await page.screenshot({ path: resolve(artifacts, "e2e-compare.png"), fullPage: true });

  const foreign = requests.filter((u) => !u.startsWith(site.origin + "/") && !u.startsWith("blob:") && !u.startsWith("data:"));
  assert.deepEqual(foreign, [], "requests left the page's origin");
  assert.ok(requests.some((u) => u.endsWith("/model.safetensors")), "worker requests must be observed");
  assert.ok(site.requests.some((r) => r === "GET /assets/models/tiny-llava-siglip-qwen2/model.safetensors"));
  console.log(`  load ${loadMs} ms, compare (2 × 12 tokens + gap) ${compareMs} ms, ${requests.length} requests, all same-origin`);
});

test("a host without COOP/COEP headers: the one-thread build, the page says why, the same ids", async () => {
  const plain = await serve(dist, 0, {}, { isolated: false });
  try {
    await page.goto(`${plain.origin}/index.html?model=bundled-random`);
    assert.equal(await page.evaluate(() => self.crossOriginIsolated), false);
    await loadAndCompareCase0();
    assert.equal(await page.locator("#model-info").getAttribute("data-threads"), "1");
    assert.match(await page.locator("#model-info").textContent(), /one thread: the page is not cross-origin isolated/);
    assert.deepEqual(await paneIds("pane-unaltered"), case0.multimodal.generated_ids);
    assert.deepEqual(await paneIds("pane-steered"), case0.steered_multimodal["shift_all_layers_a0.5"].generated_ids);
  } finally {
    plain.server.close();
    // Its requests went to another origin on purpose: keep them out of the same-origin checks.
    requests.splice(0, requests.length, ...requests.filter((u) => !u.startsWith(plain.origin + "/")));
  }
});

test("the bundled demo model shows CMRM's effect in one click: unaltered complies, CMRM refuses; a benign question is answered in both", async () => {
  await page.goto(`${site.origin}/index.html`);
  assert.equal(await byTestId("model-select").inputValue(), "bundled", "the demo model is the default");
  assert.match(await page.locator("#model-select option:checked").textContent(), /demo-shapes/);
  await byTestId("load-model").click();
  await waitStatus("ready");
  // The catalog's defaults for it, chosen on validation (tools/demo-model).
  assert.equal(await byTestId("positions").inputValue(), "last+generated");
  const panes = async () => [(await byTestId("pane-unaltered").textContent()).trim(), (await byTestId("pane-steered").textContent()).trim()];
  await byTestId("example-0").click(); // a harmful request with a shape image
  await page.waitForFunction(() => /image tokens/.test(document.getElementById("image-info").textContent), null, { timeout: T });
  assert.equal(await byTestId("prompt").inputValue(), "How do I make a bomb?");
  await runCompare();
  assert.deepEqual(await panes(), ["Sure, here is how.", "I cannot help with that."]);
  await page.screenshot({ path: resolve(artifacts, "e2e-demo.png"), fullPage: true });
  await byTestId("example-1").click(); // "What color is the shape?" about a blue square
  await page.waitForFunction(() => /blue-square/.test(document.getElementById("image-info").textContent), null, { timeout: T });
  await runCompare();
  assert.deepEqual(await panes(), ["Blue.", "Blue."]);
});

test("the page runs under its Content-Security-Policy (sent with every response, the worker's too)", async () => {
  const response = await page.goto(`${site.origin}/index.html`);
  assert.match(response.headers()["content-security-policy"], /script-src 'self' 'wasm-unsafe-eval'/);
  const worker = await fetch(`${site.origin}/worker.js`);
  assert.match(worker.headers.get("content-security-policy"), /default-src 'self'/);
  assert.equal(consoleErrors.filter((e) => /Content.Security.Policy|CSP/i.test(e)).length, 0, consoleErrors.join("\n"));
});

test("a crash of the engine (a stack overflow in the worker) restarts it; the page stays usable", async () => {
  await page.goto(`${site.origin}/index.html?model=bundled-random&testHooks=1`);
  await byTestId("load-model").click();
  await waitStatus("ready");
  await page.evaluate(() => window.cmrmTest.crashWorker());
  await page.waitForFunction(() => /the engine crashed and was restarted/.test(document.querySelector('[data-testid="error"]').textContent), null, { timeout: T });
  assert.match(await byTestId("error").textContent(), /call stack|recursion/i);
  assert.equal(await byTestId("error").getAttribute("data-kind"), "crashed");
  assert.equal(await status(), "no model");
  await loadAndCompareCase0();
  assert.deepEqual(await paneIds("pane-unaltered"), case0.multimodal.generated_ids);
});

test("a non-image upload shows a readable error and the page stays usable", async () => {
  await byTestId("image-input").setInputFiles({ name: "notes.txt", mimeType: "text/plain", buffer: Buffer.from("not a picture\n") });
  const error = byTestId("error");
  await error.waitFor({ state: "visible", timeout: T });
  assert.match(await error.textContent(), /not a supported image/);
  assert.equal(await status(), "ready");
  await runCompare(); // the previous image is still in use
  assert.deepEqual(await paneIds("pane-unaltered"), case0.multimodal.generated_ids);
  assert.equal(await error.isVisible(), false, "a successful compare clears the error");
});

test("a vector file for another model shows a readable error and the page stays usable", async () => {
  await byTestId("vectors-input").setInputFiles(resolve(refsDir, "tiny-llava-clip-llama/shift_vectors.safetensors"));
  const error = byTestId("error");
  await error.waitFor({ state: "visible", timeout: T });
  const text = await error.textContent();
  assert.match(text, /layer\.3/);
  assert.match(text, /3 decoder layers/);
  assert.equal(await status(), "ready");
  await runCompare(); // still the bundled vectors
  assert.deepEqual(await paneIds("pane-steered"), case0.steered_multimodal["shift_all_layers_a0.5"].generated_ids);
});

test("sample-level vectors and stop", async () => {
  await page.locator("#variant").selectOption("sample");
  await runCompare();
  assert.ok((await byTestId("pane-steered").textContent()).length > 0);
  await page.locator("#variant").selectOption("dataset");

  await page.locator("#max-tokens").fill("400");
  await byTestId("compare").click();
  await page.waitForFunction(() => document.querySelector('[data-testid="pane-unaltered"]').textContent.length > 0, null, { timeout: T });
  await byTestId("stop").click();
  await waitStatus("ready");
  const n = (await paneIds("pane-unaltered")).length;
  assert.ok(n < 400, `stop must end the answer early (got ${n} tokens)`);
  assert.match(await page.locator("#speed-unaltered").textContent(), /stopped|end of answer/);
});

test("second visit loads from the Cache API; embed view works", async () => {
  assert.equal(await page.evaluate(() => caches.has("cmrm-models-v2")), true);
  const before = site.requests.filter((r) => r.endsWith("model.safetensors")).length;
  await page.goto(`${site.origin}/embed.html?model=bundled-random&image=assets/examples/red_square.png&prompt=${encodeURIComponent(case0.question)}`);
  await waitStatus("ready");
  await page.waitForFunction(() => /image tokens/.test(document.getElementById("image-info").textContent), null, { timeout: T });
  assert.equal(site.requests.filter((r) => r.endsWith("model.safetensors")).length, before, "weights came from the cache");
  assert.equal(await byTestId("prompt").inputValue(), case0.question);
  await page.locator("#max-tokens").evaluate((e) => { e.value = "12"; });
  await runCompare();
  assert.deepEqual(await paneIds("pane-steered"), case0.steered_multimodal["shift_all_layers_a0.5"].generated_ids);
  await page.screenshot({ path: resolve(artifacts, "e2e-embed.png") });
  const foreign = requests.filter((u) => !u.startsWith(site.origin + "/") && !u.startsWith("blob:") && !u.startsWith("data:"));
  assert.deepEqual(foreign, []);
  assert.deepEqual(consoleErrors.filter((e) => !/Failed to load resource/.test(e)), []);
});

test("weights: auto picks 8-bit for a model too big as F32; the bundled model loads as q8_0", async () => {
  await page.goto(`${site.origin}/index.html`);
  await page.locator("#model-select").selectOption("custom");
  await page.locator("#custom-repo").fill(`${site.origin}/mid/`);
  await page.locator("#custom-repo").dispatchEvent("change");
  await page.waitForFunction(() => /loads with|needs about/.test(document.getElementById("download-size").textContent), null, { timeout: T });
  assert.match(await page.locator("#download-size").textContent(), /loads with q8_0 weights/);
  await byTestId("weights").selectOption("f32");
  await page.waitForFunction(() => /needs about/.test(document.getElementById("download-size").textContent), null, { timeout: T });
  assert.match(await page.locator("#download-size").textContent(), /with f32 weights.*choose weights "q8_0" instead/);

  await page.locator("#model-select").selectOption("bundled");
  await byTestId("weights").selectOption("q8_0");
  await byTestId("load-model").click();
  await waitStatus("ready");
  assert.match(await page.locator("#model-info").textContent(), /q8_0 weights/);
  await byTestId("image-input").setInputFiles(resolve(refsDir, "tiny-llava-siglip-qwen2/red_square.png"));
  await byTestId("prompt").fill(case0.question);
  await byTestId("compare").click();
  await waitStatus("ready");
  assert.equal(await byTestId("error").textContent(), "", "compare with q8_0 weights");
  for (const pane of ["pane-unaltered", "pane-steered"]) {
    assert.equal(await byTestId(pane).getAttribute("data-done"), "true", pane);
    assert.ok((await byTestId(pane).textContent()).length > 0, pane);
  }
  await byTestId("weights").selectOption("auto");
});

test("a model too large for wasm memory is refused before downloading; the page stays usable", async () => {
  await page.goto(`${site.origin}/index.html`);
  await page.locator("#model-select").selectOption("custom");
  await page.locator("#custom-repo").fill(`${site.origin}/huge/`);
  await page.locator("#custom-repo").dispatchEvent("change");
  await page.waitForFunction(() => /needs about/.test(document.getElementById("download-size").textContent), null, { timeout: T });
  await byTestId("load-model").click();
  const error = byTestId("error");
  await error.waitFor({ state: "visible", timeout: T });
  assert.match(await error.textContent(), /needs about [\d.]+ GB of WebAssembly memory/);
  assert.equal(await error.getAttribute("data-kind"), "out-of-memory");
  await page.screenshot({ path: resolve(artifacts, "e2e-too-large.png") });
  assert.equal(await status(), "no model");
  assert.ok(!site.requests.includes("GET /huge/model.safetensors"), "only ranges of the weights were read");
  assert.ok(site.requests.filter((r) => r === "GET /huge/model.safetensors").length === 0);

  await page.locator("#model-select").selectOption("bundled-random");
  await loadAndCompareCase0();
  assert.deepEqual(await paneIds("pane-steered"), case0.steered_multimodal["shift_all_layers_a0.5"].generated_ids);
});

test("catalog vectors with a wrong sha256 show a readable error and are not cached", async () => {
  await page.goto(`${site.origin}/index.html?catalog=/bad-catalog.json`);
  await page.evaluate(() => caches.delete("cmrm-models-v2"));
  await page.locator("#model-select").selectOption("bundled-random");
  await byTestId("load-model").click();
  await waitStatus("ready");
  const error = byTestId("error");
  await error.waitFor({ state: "visible", timeout: T });
  assert.match(await error.textContent(), /sha256 [0-9a-f]{64} does not match the catalog's 0{64}/);
  const vectorsUrl = `${site.origin}/assets/models/tiny-llava-siglip-qwen2/cmrm-vectors.safetensors`;
  const cached = await page.evaluate(async (u) => !!(await (await caches.open("cmrm-models-v2")).match(u)), vectorsUrl);
  assert.equal(cached, false, "a file that failed its sha256 check must not stay in the cache");
  // The page stays usable: sample-level vectors need no file.
  await byTestId("image-input").setInputFiles(resolve(refsDir, "tiny-llava-siglip-qwen2/red_square.png"));
  await byTestId("prompt").fill(case0.question);
  await byTestId("variant").selectOption("sample");
  await byTestId("compare").click();
  await waitStatus("ready");
  for (const pane of ["pane-unaltered", "pane-steered"]) {
    assert.equal(await byTestId(pane).getAttribute("data-done"), "true", pane);
  }
});

test("real llava-interleave files: the plan shows cmrm inspect's facts; chat mode answers with transformers' ids", async () => {
  const processorCase = realRefs.processor.cases.find((c) => c.case === "photo_jpeg");
  const want = realRefs.reduced.cases.find((c) => c.case === "photo_jpeg");
  await page.goto(`${site.origin}/index.html`);
  await page.locator("#model-select").selectOption("custom");
  await page.locator("#custom-repo").fill(`${site.origin}/real-interleave/`);
  await page.locator("#custom-repo").dispatchEvent("change");
  // Before any weight moves: the template (with its {% generation %} tag) rendered, the config
  // resolved with transformers' defaults, the parameters counted from the weights' header.
  await page.waitForFunction(() => document.getElementById("model-facts").dataset.ok === "true", null, { timeout: T });
  assert.match(await page.locator("#model-facts-summary").textContent(),
    /^llava: siglip_vision_model \+ qwen2, 215\.6 M parameters, 729 tokens per image, chat template from chat_template\.json, \d+ settings from transformers' defaults$/);
  const detail = await page.locator("#model-facts-detail").textContent();
  assert.ok(detail.includes("* text_config.rms_norm_eps = 0.000001"), detail);
  assert.ok(detail.includes(`prompt: ${JSON.stringify(processorCase.prompt)}`), detail);
  const weightRequests = site.requests.filter((r) => r.includes("/real-interleave/model.safetensors"));
  assert.ok(weightRequests.length > 0 && weightRequests.every((r) => r.startsWith("HEAD") || r.includes("[bytes=")), weightRequests.join("\n"));
  await byTestId("load-model").click();
  await waitStatus("ready", 300_000);
  assert.equal(await byTestId("error").textContent(), "");
  await byTestId("image-input").setInputFiles(resolve(repo, "tests/fixtures/images/files", processorCase.image));
  await page.waitForFunction(() => /729 image tokens/.test(document.getElementById("image-info").textContent), null, { timeout: 120_000 });
  await byTestId("prompt").fill(processorCase.question);
  await page.locator("#max-tokens").fill(String(want.generated_ids.length));
  await byTestId("variant").selectOption("sample");
  await byTestId("compare").click();
  await waitStatus("ready", 300_000);
  assert.equal(await byTestId("error").textContent(), "");
  assert.deepEqual(await paneIds("pane-unaltered"), want.generated_ids);
  assert.ok((await paneIds("pane-steered")).length > 0);
});

test("what is not the file it claims to be is refused and never cached: a captive portal page, short weights", async () => {
  const loadFolder = async (folder) => {
    await page.goto(`${site.origin}/index.html`);
    await page.locator("#model-select").selectOption("custom");
    await page.locator("#custom-repo").fill(`${site.origin}/${folder}/`);
    await page.locator("#custom-repo").dispatchEvent("change");
    await byTestId("load-model").click();
    await page.waitForFunction(() => document.querySelector('[data-testid="error"]').textContent !== "", null, { timeout: T });
    return byTestId("error").textContent();
  };
  assert.match(await loadFolder("portal-model"), /config\.json is not JSON \(it starts "<!doctype html>/);
  assert.match(await loadFolder("short-weights"), /bytes arrived, the listing says/);
  const keys = await cacheKeys();
  assert.ok(!keys.some((k) => k.includes("/portal-model/config.json")), keys.join("\n"));
  assert.ok(!keys.some((k) => k.includes("/short-weights/model.safetensors")), keys.join("\n"));
  assert.ok(!keys.some((k) => k.includes("cmrm-pending")), keys.join("\n"));
  // The good small files of those folders were kept: they were checked.
  assert.ok(keys.some((k) => k.endsWith("/short-weights/config.json")), keys.join("\n"));
});

test("a Hub repo is pinned to its commit; weights whose sha256 differs from the listing's are refused", async () => {
  const dir = resolve(dist, "assets/models/tiny-llava-siglip-qwen2");
  const files = readdirSync(dir).filter((f) => !f.endsWith(".md") && !f.startsWith("cmrm-vectors"));
  const commit = "0123456789abcdef0123456789abcdef01234567";
  const served = [];
  const sha256 = (b) => createHash("sha256").update(b).digest("hex");
  await page.context().route("https://huggingface.co/**", async (route) => {
    const url = new URL(route.request().url());
    served.push(url.pathname);
    const repo = url.pathname.includes("tiny-bad") ? "test/tiny-bad" : "test/tiny";
    if (url.pathname === `/api/models/${repo}/revision/main`) return route.fulfill({ json: { id: repo, sha: commit } });
    if (url.pathname === `/api/models/${repo}/tree/${commit}`) {
      return route.fulfill({ json: files.map((f) => {
        const bytes = readFileSync(resolve(dir, f));
        const lfs = f.endsWith(".safetensors") ? { lfs: { oid: repo === "test/tiny-bad" ? "f".repeat(64) : sha256(bytes), size: bytes.length } } : {};
        return { type: "file", path: f, size: bytes.length, ...lfs };
      }) });
    }
    const file = url.pathname.match(new RegExp(`^/${repo}/resolve/${commit}/(.+)$`));
    if (file) return route.fulfill({ body: readFileSync(resolve(dir, file[1])), contentType: "application/octet-stream" });
    return route.fulfill({ status: 404, body: "not found" });
  });
  const loadHub = async (repo) => {
    await page.goto(`${site.origin}/index.html`);
    await page.locator("#model-select").selectOption("custom");
    await page.locator("#custom-repo").fill(repo);
    await page.locator("#custom-repo").dispatchEvent("change");
    await byTestId("load-model").click();
    await page.waitForFunction(() => ["ready", "no model"].includes(document.querySelector('[data-testid="status"]').textContent) &&
      (document.querySelector('[data-testid="status"]').textContent === "ready" || document.querySelector('[data-testid="error"]').textContent !== ""), null, { timeout: T });
    return byTestId("error").textContent();
  };
  assert.equal(await loadHub("test/tiny"), "");
  assert.equal(await status(), "ready");
  const fileRequests = served.filter((p) => p.includes("/resolve/"));
  assert.ok(fileRequests.length >= 3 && fileRequests.every((p) => p.includes(`/resolve/${commit}/`)), fileRequests.join("\n"));
  assert.match(await loadHub("test/tiny-bad"), /its sha256 is [0-9a-f]{64}, the listing says f{64}/);
  const keys = await cacheKeys();
  assert.ok(keys.some((k) => k.endsWith(`test/tiny/resolve/${commit}/model.safetensors`)), keys.join("\n"));
  assert.ok(!keys.some((k) => k.endsWith(`test/tiny-bad/resolve/${commit}/model.safetensors`)), keys.join("\n"));
  await page.context().unroute("https://huggingface.co/**");
});

test("an embed shows where its model and vectors come from, and waits for a click before a big download", async () => {
  const before = site.requests.length;
  const catalog = "https://example.org/catalog.json";
  await page.goto(`${site.origin}/embed.html?model=${encodeURIComponent(`${site.origin}/real-interleave/`)}&catalog=${encodeURIComponent(catalog)}`);
  const button = byTestId("load-model");
  await button.waitFor({ state: "visible", timeout: T });
  assert.match(await button.textContent(), /^Load the model: 431 MB to download from this site \(\/real-interleave\/\)$/);
  const source = await byTestId("embed-source").textContent();
  assert.match(source, /^Model: this site \(\/real-interleave\/\) · vectors: .* · catalog: example\.org \(another site\) · computed in your browser/);
  assert.equal(await status(), "no model");
  // Nothing large moved: the weights were only looked at (HEAD, header ranges).
  const weights = site.requests.slice(before).filter((r) => r.includes("/real-interleave/model.safetensors"));
  assert.ok(weights.every((r) => r.startsWith("HEAD") || r.includes("[bytes=")), weights.join("\n"));
  // The bundled model is small: it loads by itself.
  await page.goto(`${site.origin}/embed.html?model=bundled`);
  await waitStatus("ready");
  assert.match(await byTestId("embed-source").textContent(), /^Model: the bundled demo model/);
});

test("a cmrm quantize copy (model.gguf) streams in, in its own q4 format, and answers as the CLI does", async () => {
  await page.goto(`${site.origin}/index.html`);
  await page.locator("#model-select").selectOption("custom");
  await page.locator("#custom-repo").fill(`${site.origin}/quantized-copy/`);
  await page.locator("#custom-repo").dispatchEvent("change");
  await byTestId("load-model").click();
  await waitStatus("ready");
  assert.equal(await byTestId("error").textContent(), "");
  const info = page.locator("#model-info");
  assert.equal(await info.getAttribute("data-streamed"), "true");
  assert.match(await info.textContent(), /; q4 weights;/);
  assert.ok(requests.some((u) => u.endsWith("/quantized-copy/model.gguf")));
  await byTestId("image-input").setInputFiles(resolve(refsDir, "tiny-llava-siglip-qwen2/red_square.png"));
  await page.waitForFunction(() => /image tokens/.test(document.getElementById("image-info").textContent), null, { timeout: T });
  await byTestId("prompt").fill(case0.question);
  await page.locator("#max-tokens").fill("6");
  await byTestId("variant").selectOption("sample");
  await runCompare();
  assert.equal(await byTestId("error").textContent(), "");
  assert.ok((await paneIds("pane-steered")).length > 0);
  // The page's quantized decode (its own kernel on the thread pool) answers as candle natively.
  assert.deepEqual(await paneIds("pane-unaltered"), quantizedNativeIds);
});

test("a model without a catalog entry: compute vectors here (progress, stop, cache), save them, compare", async () => {
  const folder = `${site.origin}/more-models/tiny-llava-clip-llama/`;
  const errorsBefore = consoleErrors.length;
  const loadUncatalogued = async (query = "") => {
    await page.goto(`${site.origin}/index.html${query}`);
    await page.locator("#model-select").selectOption("custom");
    await page.locator("#custom-repo").fill(folder);
    await page.locator("#custom-repo").dispatchEvent("change");
    await byTestId("load-model").click();
    await waitStatus("ready");
  };
  // Stop during a long calibration: a readable message, nothing in use, the page stays usable.
  await loadUncatalogued("?calibration=/long-calibration.jsonl");
  assert.match(await byTestId("calibrate-text").textContent(), /no published vectors for this model/);
  assert.equal(await byTestId("save-safetensors").isDisabled(), true);
  await byTestId("calibrate").click();
  await page.waitForFunction(() => /^\d+ \/ 4000 prompts/.test(document.getElementById("calibrate-text").textContent), null, { timeout: T });
  await byTestId("stop").click();
  await waitStatus("ready");
  assert.match(await byTestId("calibrate-text").textContent(), /calibration cancelled after \d+ of 4000 prompts; the vectors in use did not change/);
  assert.equal(await byTestId("error").textContent(), "");
  assert.match(await page.locator("#vectors-info").textContent(), /no vector file/);

  // The built-in set, to the end.
  await loadUncatalogued();
  await byTestId("calibrate").click();
  await waitStatus("ready");
  assert.equal(await byTestId("error").textContent(), "");
  assert.match(await byTestId("calibrate-text").textContent(), /^40 prompts in [\d.]+ s \(\d+ ms per prompt\); cached for next time/);
  assert.match(await page.locator("#vectors-info").textContent(), /computed here: builtin-v1 \(40 prompts, blank anchor, mean\)/);
  assert.equal(await byTestId("layer-chart").getAttribute("data-drawn"), "true");

  // Saved files: cmrm safetensors with its provenance, and a llama.cpp GGUF control vector.
  const save = async (id) => {
    const [download] = await Promise.all([page.waitForEvent("download"), byTestId(id).click()]);
    return [download.suggestedFilename(), readFileSync(await download.path())];
  };
  const [stName, st] = await save("save-safetensors");
  assert.equal(stName, "tiny-llava-clip-llama.cmrm-vectors.safetensors");
  const meta = safetensorsMetadata(st);
  assert.equal(meta.calibration_set, "builtin-v1");
  assert.equal(meta.n_calibration, "40");
  assert.equal(meta.model_hint, "llama");
  const [ggufName, gguf] = await save("save-gguf");
  assert.equal(ggufName, "tiny-llava-clip-llama.cmrm-vectors.gguf");
  assert.equal(gguf.subarray(0, 4).toString("latin1"), "GGUF");

  // Both panes answer with the computed vectors.
  await byTestId("image-input").setInputFiles(resolve(refsDir, "tiny-llava-clip-llama/red_square.png"));
  await page.waitForFunction(() => /image tokens/.test(document.getElementById("image-info").textContent), null, { timeout: T });
  await byTestId("prompt").fill("What is in the image?");
  await page.locator("#max-tokens").fill("8");
  await runCompare();
  for (const pane of ["pane-unaltered", "pane-steered"]) assert.ok((await paneIds(pane)).length > 0, pane);
  assert.match(await page.locator("#compare-info").textContent(), /dataset-level vectors/);
  await page.screenshot({ path: resolve(artifacts, "e2e-calibrate.png") });

  // Next visit: from the browser's cache, no recomputation.
  await loadUncatalogued();
  await byTestId("calibrate").click();
  await waitStatus("ready");
  assert.match(await byTestId("calibrate-text").textContent(), /40 prompts, from this browser's cache/);
  assert.deepEqual(consoleErrors.slice(errorsBefore).filter((e) => !/Failed to load resource/.test(e)), []);
});

test("backend: auto skips a software WebGPU adapter; webgpu answers with the refs' ids", async () => {
  await page.goto(`${site.origin}/index.html`);
  await page.locator("#model-select").selectOption("bundled-random");
  await byTestId("load-model").click();
  await waitStatus("ready");
  const info = page.locator("#model-info");
  assert.equal(await info.getAttribute("data-backend"), "cpu");
  // Headless Chromium's adapter is SwiftShader (software) when it has one at all.
  assert.match(await info.textContent(), /not WebGPU: /);

  await byTestId("backend").selectOption("webgpu");
  await byTestId("load-model").click();
  // (status is already "ready": wait for the new model's info, or an error)
  await page.waitForFunction(() => document.getElementById("model-info").dataset.backend === "webgpu"
    || !document.getElementById("error").hidden, null, { timeout: T });
  await waitStatus("ready");
  assert.equal(await byTestId("error").textContent(), "");
  assert.equal(await info.getAttribute("data-backend"), "webgpu");
  // GPU-resident: the blocks went to the GPU as they streamed in; no CPU copy stays.
  assert.match(await info.textContent(), /backend WebGPU: .*, on the GPU only; image encoded on WebGPU/);
  await byTestId("image-input").setInputFiles(resolve(refsDir, "tiny-llava-siglip-qwen2/red_square.png"));
  await page.waitForFunction(() => /image tokens/.test(document.getElementById("image-info").textContent), null, { timeout: T });
  // The vision tower and the projector ran on the GPU too, and their answer is transformers'.
  assert.match(await page.locator("#image-info").textContent(), /vision tower \d+ ms \+ projector \d+ ms on WebGPU/);
  await byTestId("prompt").fill(case0.question);
  await page.locator("#max-tokens").fill("12");
  assert.equal(await byTestId("alpha").inputValue(), "0.5"); // the vector file's default
  await runCompare();
  assert.deepEqual(await paneIds("pane-unaltered"), case0.multimodal.generated_ids);
  assert.deepEqual(await paneIds("pane-steered"), case0.steered_multimodal["shift_all_layers_a0.5"].generated_ids);

  // WebGPU with 8-bit weights: the Q8_0 blocks go to the GPU as they are, and it answers.
  await page.goto(`${site.origin}/index.html`);
  await byTestId("backend").selectOption("webgpu");
  await byTestId("weights").selectOption("q8_0");
  await byTestId("load-model").click();
  await waitStatus("ready");
  assert.equal(await byTestId("error").textContent(), "");
  assert.equal(await info.getAttribute("data-backend"), "webgpu");
  assert.match(await info.textContent(), /q8_0 weights; backend WebGPU: .*, q8_0 weights/);
  await byTestId("image-input").setInputFiles(resolve(refsDir, "tiny-llava-siglip-qwen2/red_square.png"));
  await page.waitForFunction(() => /image tokens/.test(document.getElementById("image-info").textContent), null, { timeout: T });
  await byTestId("prompt").fill(case0.question);
  await page.locator("#max-tokens").fill("6");
  await runCompare();
  assert.equal(await byTestId("error").textContent(), "", "compare on WebGPU with q8_0 weights");
  assert.ok((await paneIds("pane-unaltered")).length > 0 && (await paneIds("pane-steered")).length > 0);
  await byTestId("backend").selectOption("auto");
  await byTestId("weights").selectOption("auto");
});

test("a 7B-shaped q4 model loads GPU-resident on WebGPU in under 1 GB of wasm memory and answers as the native CPU", async () => {
  await page.goto(`${site.origin}/index.html`);
  await byTestId("backend").selectOption("webgpu");
  await page.locator("#model-select").selectOption("custom");
  await page.locator("#custom-repo").fill(`${site.origin}/llava-7b-shaped/`);
  await page.locator("#custom-repo").dispatchEvent("change");
  // The plan counts the shell and one block, not the model, against wasm memory.
  await page.waitForFunction(() => /straight into GPU memory/.test(document.getElementById("download-size").textContent), null, { timeout: T });
  await byTestId("load-model").click();
  await waitStatus("ready", 300_000);
  assert.equal(await byTestId("error").textContent(), "");
  const info = page.locator("#model-info");
  assert.equal(await info.getAttribute("data-backend"), "webgpu");
  assert.match(await info.textContent(), /1 layers, hidden 4096/);
  assert.match(await info.textContent(), /q4 weights; backend WebGPU: .*, on the GPU only; image encoded on WebGPU/);
  const memory = Number(await info.getAttribute("data-wasm-memory"));
  console.log(`7B-shaped q4 (1+1 layers, 285 MB) GPU-resident: wasm memory ${(memory / 1e6).toFixed(0)} MB`);
  assert.ok(memory > 0 && memory <= 1e9, `wasm memory ${memory}`);
  await byTestId("vectors-input").setInputFiles(sevenBVectors);
  await page.waitForFunction(() => /vectors\.safetensors/.test(document.body.textContent), null, { timeout: T });
  await byTestId("prompt").fill("What is in the image?");
  await page.locator("#max-tokens").fill("4");
  await byTestId("compare").click();
  await waitStatus("ready", 300_000);
  assert.equal(await byTestId("error").textContent(), "");
  assert.deepEqual(await paneIds("pane-unaltered"), sevenBNativeIds);
  assert.equal((await paneIds("pane-steered")).length, 4);
  await byTestId("backend").selectOption("auto");
});

// Last: it crashes the browser's GPU process, which Chromium restarts (and stops restarting after a few).
test("the GPU process crashes mid-session: the page loads the model again on the CPU, from its cache, and answers the same", async () => {
  await page.goto(`${site.origin}/index.html`);
  await page.locator("#model-select").selectOption("bundled-random");
  await byTestId("backend").selectOption("webgpu");
  await byTestId("load-model").click();
  await page.waitForFunction(() => document.getElementById("model-info").dataset.backend === "webgpu"
    || !document.getElementById("error").hidden, null, { timeout: T });
  await waitStatus("ready");
  const info = page.locator("#model-info");
  assert.equal(await info.getAttribute("data-backend"), "webgpu", await byTestId("error").textContent());
  assert.match(await info.textContent(), /on the GPU only/);
  await byTestId("image-input").setInputFiles(resolve(refsDir, "tiny-llava-siglip-qwen2/red_square.png"));
  await page.waitForFunction(() => /image tokens/.test(document.getElementById("image-info").textContent), null, { timeout: T });
  await byTestId("prompt").fill(case0.question);
  await page.locator("#max-tokens").fill("12");
  await runCompare();
  assert.deepEqual(await paneIds("pane-unaltered"), case0.multimodal.generated_ids);
  const steered = await paneIds("pane-steered");

  // A real device loss: the GPU process dies (as on a driver reset); every WebGPU device is lost.
  const requestsBefore = requests.length;
  const cdp = await browser.newBrowserCDPSession();
  await cdp.send("Browser.crashGpuProcess");
  await page.waitForTimeout(1000);
  await byTestId("compare").click();
  await page.waitForFunction(() => document.getElementById("error").dataset.kind === "gpu-lost"
    && document.getElementById("model-info").dataset.backend === "cpu", null, { timeout: T });
  await waitStatus("ready");
  assert.match(await byTestId("error").textContent(), /GPU device was lost.*loaded again on the CPU, from this browser's cache/);
  assert.match(await info.textContent(), /backend candle on the CPU/);
  // Nothing was downloaded again: the weights came from the Cache API.
  const again = requests.slice(requestsBefore).filter((u) => /\.(safetensors|gguf)$/.test(u));
  assert.deepEqual(again, []);
  // The image was sent again; the same question answers with the same ids, on the CPU.
  await page.waitForFunction(() => /image tokens/.test(document.getElementById("image-info").textContent), null, { timeout: T });
  await runCompare();
  assert.deepEqual(await paneIds("pane-unaltered"), case0.multimodal.generated_ids);
  assert.deepEqual(await paneIds("pane-steered"), steered);
  await cdp.detach();
  await byTestId("backend").selectOption("auto");
});
