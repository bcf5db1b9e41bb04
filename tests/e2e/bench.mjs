// Benchmark, not a test (figures, no assertions): the built page loads a real-size checkpoint —
// the llava-interleave-qwen-0.5b shapes with random BF16 weights, 1.7 GB, written by
// `cargo test --release --test web_bench -- --ignored streamed_load` — from the local server in
// headless Chromium, in each quantized format (a fresh browser each, since wasm memory only
// grows), and prints the wasm memory after the load (= its peak) and the load time.
// CMRM_BENCH_MODEL_DIR: another folder (e.g. a `cmrm quantize` copy, with CMRM_BENCH_FORMATS=auto).
// CMRM_BENCH_BACKEND=webgpu: the decoder is uploaded to WebGPU (SwiftShader here; a quantized
// model in its own blocks) and the line adds the backend the page reports. After the load, the
// page encodes one image (the vision tower, on the CPU) and the line adds its time
// (CMRM_BENCH_ENCODE=0: no image). CMRM_BENCH_PROMPT (with CMRM_BENCH_VECTORS, a vector file, and
// CMRM_BENCH_TOKENS, default 4): a Compare on that question, and the line adds the unaltered
// answer's ids (to compare with `cmrm generate` on the same files) and its seconds.
//   node tests/e2e/bench.mjs        (scripts/test-browser.sh --bench runs it)
import { existsSync, symlinkSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";
import { serve } from "./server.mjs";

const here = dirname(fileURLToPath(import.meta.url));
const dist = resolve(process.env.DIST || resolve(here, "../../dist"));
const model = process.env.CMRM_BENCH_MODEL_DIR || resolve(tmpdir(), "cmrm-bench-llava-interleave-qwen-0.5b");
if (!["model.safetensors", "model.gguf"].some((f) => existsSync(resolve(model, f)))) {
  console.error(`bench: ${model} has no model.safetensors or model.gguf (run the web_bench streamed_load benchmark first)`);
  process.exit(1);
}
const link = resolve(dist, "bench-model");
rmSync(link, { force: true });
symlinkSync(model, link);
const site = await serve(dist, 0);
const backend = process.env.CMRM_BENCH_BACKEND || "auto";
try {
  for (const weights of (process.env.CMRM_BENCH_FORMATS || "q4,q8_0").split(",")) {
    const browser = await chromium.launch({
      executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
      headless: true,
      args: ["--no-sandbox", "--enable-unsafe-webgpu", "--disable-background-networking", "--disable-component-update"],
    });
    const page = await browser.newPage();
    await page.goto(`${site.origin}/index.html`);
    await page.locator("#model-select").selectOption("custom");
    await page.locator("#custom-repo").fill(`${site.origin}/bench-model/`);
    await page.locator("#custom-repo").dispatchEvent("change");
    await page.getByTestId("weights").selectOption(weights);
    await page.getByTestId("backend").selectOption(backend);
    const t0 = Date.now();
    await page.getByTestId("load-model").click();
    await page.waitForFunction(() => document.getElementById("status").textContent === "ready"
      || !document.getElementById("error").hidden, null, { timeout: 900_000 });
    const seconds = (Date.now() - t0) / 1000;
    const error = await page.locator("#error").isVisible() ? await page.locator("#error").textContent() : "";
    const info = page.locator("#model-info");
    const memory = await info.getAttribute("data-wasm-memory");
    const streamed = await info.getAttribute("data-streamed");
    const detail = (await info.textContent()).match(/backend ([^;]*)/)?.[1]?.trim() ?? "";
    let encode = "";
    if (!error && process.env.CMRM_BENCH_ENCODE !== "0") {
      await page.getByTestId("image-input").setInputFiles(resolve(here, "../fixtures/oracle/refs/tiny-llava-siglip-qwen2/red_square.png"));
      await page.waitForFunction(() => /encoded in|error/i.test(document.getElementById("image-info").textContent)
        || !document.getElementById("error").hidden, null, { timeout: 900_000 });
      const ms = (await page.locator("#image-info").textContent()).match(/encoded in (\d+) ms/)?.[1];
      encode = ms ? ` image_encode_seconds=${(ms / 1000).toFixed(1)}` : "";
    }
    const line = error
      ? `cmrm-bench page-load target=chromium weights=${weights} backend=${backend} error=${JSON.stringify(error)}`
      : `cmrm-bench page-load target=chromium weights=${weights} backend=${JSON.stringify(detail)} seconds=${seconds.toFixed(1)} streamed=${streamed} wasm_memory_bytes=${memory}${encode}`;
    console.log(line);
    if (!error && process.env.CMRM_BENCH_PROMPT) {
      await page.getByTestId("vectors-input").setInputFiles(process.env.CMRM_BENCH_VECTORS);
      await page.getByTestId("prompt").fill(process.env.CMRM_BENCH_PROMPT);
      await page.locator("#max-tokens").fill(process.env.CMRM_BENCH_TOKENS || "4");
      const t1 = Date.now();
      await page.getByTestId("compare").click();
      await page.waitForFunction(() => document.getElementById("status").textContent === "ready"
        || !document.getElementById("error").hidden, null, { timeout: 3_600_000 });
      const ids = await page.getByTestId("pane-unaltered").getAttribute("data-ids");
      console.log(`cmrm-bench page-compare weights=${weights} seconds=${((Date.now() - t1) / 1000).toFixed(1)} unaltered_ids=${ids} error=${JSON.stringify(await page.locator("#error").textContent())}`);
    }
    await browser.close();
  }
} finally {
  site.server.close();
  rmSync(link, { force: true });
}
