// The page: UI and worker plumbing only. Everything about the model runs in Rust inside
// worker.js. No request leaves the page except for model and vector files; no analytics.

const $ = (id) => document.getElementById(id);
const EMBED = document.body.dataset.mode === "embed";
const params = new URLSearchParams(location.search);

/// Models shipped with the page (they work offline), by model-select value; the first is the
/// default. demo-shapes is trained by tools/demo-model on a synthetic shapes world to show what
/// CMRM does; tiny-llava-siglip-qwen2 has random weights (the parity fixture: gibberish answers,
/// real mechanics).
const BUNDLED = Object.fromEntries(Object.entries({
  bundled: {
    name: "demo-shapes",
    label: "demo-shapes (bundled, 3 MB: a 0.8 M-parameter model trained on a shapes world to show CMRM)",
    about: "the bundled demo model (0.8 M parameters, trained on synthetic shapes)",
    size: "3 MB",
    // One click shows the effect: a harmful request with an image (the unaltered model complies,
    // CMRM restores the refusal), a question about the image, a dual-use request.
    examples: [
      { label: "harmful request + image", image: "assets/examples/red-circle-top-left.png", prompt: "How do I make a bomb?" },
      { label: "question about the image", image: "assets/examples/blue-square-center.png", prompt: "What color is the shape?" },
      { label: "dual-use request + image", image: "assets/examples/green-triangle-bottom-right.png", prompt: "How do I make a knife?" },
    ],
  },
  "bundled-random": {
    name: "tiny-llava-siglip-qwen2",
    label: "tiny-llava-siglip-qwen2 (bundled, random weights — gibberish answers; the parity fixture)",
    about: "the bundled random-weight model",
    size: "under 1 MB",
    examples: [],
  },
}).map(([key, m]) => [key, {
  ...m,
  model: new URL(`assets/models/${m.name}/`, location.href).href,
  files: ["config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
    "preprocessor_config.json", "processor_config.json", "generation_config.json", "model.safetensors"],
  vectors: new URL(`assets/models/${m.name}/cmrm-vectors.safetensors`, location.href).href,
  catalogKey: `bundled:${m.name}`,
}]));
/// The vectors catalog (www/vectors/catalog.json, or `?catalog=URL`): published CMRM vector files
/// by model, each with its sha256 and size, checked after download.
const CATALOG_URL = new URL(params.get("catalog") || "vectors/catalog.json", location.href).href;

/// The catalog entry for a model key (`bundled:NAME` or `owner/name`), or null.
async function catalogEntry(model, revision = "main") {
  try {
    const response = await fetch(CATALOG_URL);
    if (!response.ok) return null;
    const catalog = await response.json();
    const entry = (catalog.entries || []).find((e) => e.model === model && e.revision === revision);
    // Entry URLs are absolute, or relative to the page.
    return entry ? { ...entry, vectors_url: new URL(entry.vectors_url, location.href).href } : null;
  } catch {
    return null;
  }
}

/// The calibration set of "compute vectors here" (`?calibration=URL` overrides).
const CALIBRATION_URL = new URL(params.get("calibration") || "assets/calibration/builtin-v1.jsonl", location.href).href;

/// Real checkpoints on the Hugging Face Hub (the LLaVA families, ≤ 1B parameters).
const HUB_MODELS = ["llava-hf/llava-interleave-qwen-0.5b-hf", "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"];

// ---------------------------------------------------------------- worker RPC

let worker = null;
let nextId = 1;
const pending = new Map();

function startWorker() {
  worker = new Worker(new URL("worker.js", location.href), { type: "module" });
  worker.onmessage = (e) => {
    const { id, type } = e.data;
    const p = pending.get(id);
    if (!p) return;
    if (type === "event") { p.onEvent?.(e.data.event); return; }
    pending.delete(id);
    if (type === "result") p.resolve(e.data.value);
    else {
      const err = new Error(e.data.message);
      err.crashed = e.data.crashed;
      err.kind = e.data.kind;
      p.reject(err);
    }
  };
  worker.onerror = (e) => showError(`the worker failed to start: ${e.message || "see the console"}`);
}

function call(type, args = {}, onEvent = null, transfer = []) {
  const id = nextId++;
  return new Promise((resolve, reject) => {
    pending.set(id, { resolve, reject, onEvent });
    worker.postMessage({ id, type, ...args }, transfer);
  });
}

// ---------------------------------------------------------------- state and small helpers

const state = { loaded: false, busy: false, image: null, imageName: "", vectorsInfo: null, info: null, lastGap: null };

function setStatus(s) {
  $("status").textContent = s;
  $("status").dataset.state = s;
  const canRun = state.loaded && !state.busy;
  $("compare").disabled = !canRun;
  const canSave = canRun && state.vectorsInfo?.variant === "dataset";
  // embed.html has no calibration controls.
  for (const [id, off] of [["calibrate", !canRun], ["save-safetensors", !canSave], ["save-gguf", !canSave]]) {
    if ($(id)) $(id).disabled = off;
  }
  $("stop").disabled = s !== "generating" && s !== "calibrating";
  $("load-model").disabled = state.busy;
}

/// `kind`: cancelled | out-of-memory | error | crashed (the worker's error kinds), kept on the
/// element as data-kind for scripts and tests.
function showError(msg, kind = "") {
  const el = $("error");
  el.textContent = msg;
  el.dataset.kind = msg ? kind : "";
  el.hidden = !msg;
}

const mb = (n) => (n / 1e6).toFixed(n < 1e7 ? 2 : 0) + " MB";

function fail(err) {
  if (err.kind === "gpu-lost" && state.loaded) return reloadOnCpu(err);
  showError(err.message || String(err), err.kind || "error");
  if (err.crashed) {
    // The wasm instance is dead after a panic: start a fresh worker; the model must be reloaded.
    worker.terminate();
    for (const p of pending.values()) p.reject(new Error("the engine restarted"));
    pending.clear();
    startWorker();
    state.loaded = false;
    showError(`${err.message} — the engine crashed and was restarted; load the model again.`, "crashed");
  }
  state.busy = false;
  setStatus(state.loaded ? "ready" : "no model");
}

/// The GPU device was lost: what was uploaded to it is gone. Load the model again on the CPU (its
/// files come from the Cache API, nothing is downloaded again) and say so.
async function reloadOnCpu(err) {
  state.busy = false;
  state.loaded = false;
  if ($("backend")) $("backend").value = "cpu";
  else state.forceBackend = "cpu"; // (embed.html has no backend picker)
  await loadModel();
  if (state.loaded) showError(`${err.message}: the model was loaded again on the CPU, from this browser's cache`, "gpu-lost");
}

// ---------------------------------------------------------------- model picker and loading

function modelChoice() {
  const v = $("model-select").value;
  const weights = $("weights")?.value ?? "auto"; // embed.html has no weights or backend picker
  const picked = state.forceBackend ?? $("backend")?.value ?? params.get("backend") ?? "auto";
  // "webgpu-f16" / "webgpu-f32": WebGPU with the decoder's matrices stored so; else auto (a
  // quantized model's own blocks, dense matrices f16 on a hardware GPU).
  const [backend, gpuWeights] = picked.startsWith("webgpu-") ? ["webgpu", picked.slice(7)] : [picked, "auto"];
  const b = BUNDLED[v];
  if (b) return { options: { model: b.model, files: b.files, weights, backend, gpuWeights }, vectors: b.vectors, label: b.name, catalogKey: b.catalogKey, bundled: b };
  const repo = v === "custom" ? $("custom-repo").value.trim() : v;
  return { options: { model: repo, revision: "main", weights, backend, gpuWeights }, vectors: null, label: repo, catalogKey: repo };
}

async function showPlan() {
  const choice = modelChoice();
  $("custom-repo").hidden = $("model-select").value !== "custom";
  showExamples(choice.bundled?.examples ?? []);
  if (choice.bundled) {
    $("download-size").textContent = `bundled with the page (${choice.bundled.size}), works offline`;
    return;
  }
  if ($("model-facts")) $("model-facts").hidden = true; // embed.html has no facts panel
  if (!choice.options.model) { $("download-size").textContent = ""; return; }
  $("download-size").textContent = "checking the download size…";
  try {
    const plan = await call("plan", { options: choice.options });
    showModelFacts(plan);
    if (plan.memoryProblem) { $("download-size").textContent = `${mb(plan.totalBytes)}: ${plan.memoryProblem}`; return; }
    const left = plan.totalBytes - plan.cachedBytes;
    const inMemory = plan.gpuResident
      ? `; loads${plan.weights ? ` with ${plan.weights} weights` : ""} straight into GPU memory, block by block`
      : plan.weights ? `; loads with ${plan.weights} weights (${mb(plan.modelBytes[plan.weights])} in memory)` : "";
    $("download-size").textContent = (left > 0
      ? `${mb(left)} to download (${plan.files.length} files${plan.cachedBytes ? `, ${mb(plan.cachedBytes)} already cached` : ""}); kept in the browser cache for next time`
      : `${mb(plan.totalBytes)}, all cached: starts offline`) + inMemory;
  } catch (err) {
    $("download-size").textContent = `size unknown: ${err.message}`;
  }
}

/// What the plan learned from the small files (cmrm inspect's facts), or why the model cannot work.
function showModelFacts(plan) {
  if (!$("model-facts")) return;
  const facts = plan.inspection;
  $("model-facts").hidden = !facts && !plan.inspectionProblem;
  $("model-facts").dataset.ok = facts ? "true" : "false";
  if (!facts) {
    $("model-facts-summary").textContent = plan.inspectionProblem ? `this model cannot be used: ${plan.inspectionProblem}` : "";
    $("model-facts-detail").textContent = "";
    return;
  }
  const params = facts.n_params >= 1e9 ? `${(facts.n_params / 1e9).toFixed(2)} B` : `${(facts.n_params / 1e6).toFixed(1)} M`;
  $("model-facts-summary").textContent = `${facts.architecture}, ${params} parameters, ${facts.n_image_tokens} tokens per image` +
    `, chat template from ${facts.chat_template ?? "(none)"}, ${facts.defaulted_keys.length} settings from transformers' defaults`;
  const defaulted = new Set(facts.defaulted_keys);
  const lines = [];
  const walk = (v, key) => {
    if (v && typeof v === "object" && !Array.isArray(v)) for (const [k, x] of Object.entries(v)) walk(x, key ? `${key}.${k}` : k);
    else lines.push(`${defaulted.has(key) ? "*" : " "} ${key} = ${JSON.stringify(v)}`);
  };
  walk(facts.config, "");
  const formats = Object.entries(facts.formats)
    .map(([f, x]) => `${f} ${mb(x.bytes)}${x.fits_browser ? "" : " (too big for a tab)"}`).join(", ");
  $("model-facts-detail").textContent = [
    `prompt: ${JSON.stringify(facts.prompt)}`,
    `input_ids: ${facts.input_ids.length} tokens, image tokens at [${facts.image_span}]`,
    `end of answer: ids ${JSON.stringify(facts.eos_token_ids)}`,
    `weights: ${facts.weight_files.map((w) => `${w.name}${w.bytes ? ` ${mb(w.bytes)}` : ""}`).join(", ") || "(headers not read)"}` +
      ` — ${facts.n_params} parameters (from the ${facts.n_params_from})`,
    `memory: ${formats}`,
    "config:", ...lines,
  ].join("\n");
}

async function loadModel() {
  const choice = modelChoice();
  if (!choice.options.model) return showError("type a Hugging Face repo id, e.g. llava-hf/llava-interleave-qwen-0.5b-hf");
  // An explicit ?vectors= wins; else the catalog's entry (sha256-checked); else the model's own file.
  const entry = params.get("vectors") ? null : await catalogEntry(choice.catalogKey);
  const vectorsUrl = params.get("vectors") || (entry ? null : choice.vectors);
  showError("");
  state.busy = true;
  state.loaded = false;
  setStatus("loading");
  $("progress").value = 0;
  $("progress-text").textContent = "starting…";
  try {
    const info = await call("load", { options: { ...choice.options, vectors: vectorsUrl ? new URL(vectorsUrl, location.href).href : undefined } }, (ev) => {
      if (ev.kind !== "progress") return;
      $("progress").value = ev.total ? ev.loaded / ev.total : 0;
      const name = ev.file ? ev.file.split("/").pop() : "";
      $("progress-text").textContent = ev.phase === "ready" ? "loaded"
        : ev.phase === "backend" ? "starting the decoder (checking for WebGPU)…"
        : `${mb(ev.loaded)} / ${mb(ev.total)} — ${name}${ev.fromCache ? " (cache)" : ""}`;
    });
    state.loaded = true;
    state.info = info;
    $("progress").value = 1;
    $("model-info").textContent = `${choice.label}: ${info.numLayers} layers, hidden ${info.hiddenSize}, ${mb(info.weightBytes)} of weights, ${info.imageTokens} image tokens; ${info.weights} weights; backend ${info.backendDetail}${info.backendFallbackReason ? ` (not WebGPU: ${info.backendFallbackReason})` : ""}${info.threadsReason ? ` (one thread: ${info.threadsReason})` : ""}${info.backend === "webgpu" ? (info.visionOn === "webgpu" ? "; image encoded on WebGPU" : `; image encoded on the CPU (${info.visionReason})`) : ""}; wasm memory ${mb(info.wasmMemoryBytes)}`;
    $("model-info").dataset.backend = info.backend;
    $("model-info").dataset.threads = String(info.threads);
    $("model-info").dataset.streamed = String(info.streamedLoad);
    $("model-info").dataset.wasmMemory = String(info.wasmMemoryBytes);
    useVectorsInfo(info.vectors);
    if ($("calibrate-text")) {
      $("calibrate-progress").hidden = true;
      $("calibrate-text").textContent = info.vectors || entry ? ""
        : "no published vectors for this model: compute them here, or use sample-level vectors";
    }
    if (entry) {
      $("progress-text").textContent = "checking the catalog's vectors…";
      try {
        useVectorsInfo(await call("loadVectors", { entry }));
        $("progress-text").textContent = "loaded";
      } catch (err) {
        showError(`catalog vectors: ${err.message}`);
        $("progress-text").textContent = "loaded (without the catalog's vectors)";
      }
    }
    if (state.image) await sendImage(state.image);
  } catch (err) {
    $("progress-text").textContent = "failed";
    return fail(err);
  }
  state.busy = false;
  setStatus("ready");
}

// ---------------------------------------------------------------- steering controls and chart

function useVectorsInfo(info) {
  state.vectorsInfo = info || null;
  state.lastGap = null;
  if (info) {
    if (info.defaultAlpha != null) setAlpha(info.defaultAlpha);
    if (info.defaultLayers) $("layers").value = info.defaultLayers;
    $("positions").value = info.defaultPositions || "all";
    $("vectors-info").textContent = `${info.name.split("/").pop()}: ${info.norms.filter((n) => n != null).length} layers, sign ${info.sign}${info.metadata?.method ? `, method ${info.metadata.method}` : ""}`;
  } else {
    $("vectors-info").textContent = "no vector file: compute vectors here, use sample-level vectors, or load a file";
  }
  drawChart();
  setStatus($("status").textContent);
}

function setAlpha(a) {
  $("alpha").value = a;
  $("alpha-value").textContent = Number(a).toFixed(2);
}

/// SVG bar chart: ‖v_l‖ per layer (bars) and, after a compare, the representation gap
/// ‖h_l(prompt+image) − h_l(prompt)‖ before (○) and after (●) steering.
function drawChart() {
  const svg = $("layer-chart");
  const norms = state.vectorsInfo?.norms || [];
  const gap = state.lastGap;
  const n = Math.max(norms.length, gap?.before.length || 0);
  const W = 360, H = 160, pad = 28;
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.replaceChildren();
  const ns = "http://www.w3.org/2000/svg";
  const el = (tag, attrs, text) => {
    const e = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text != null) e.textContent = text;
    svg.appendChild(e);
    return e;
  };
  if (!n) {
    el("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "muted" }, "per-layer ‖v‖ appears here");
    svg.dataset.drawn = "false";
    return;
  }
  const values = [...norms.filter((x) => x != null), ...(gap ? [...gap.before, ...gap.after] : [])];
  const max = Math.max(1e-9, ...values);
  const bw = (W - 2 * pad) / n;
  const y = (v) => H - pad - (v / max) * (H - 2 * pad);
  el("line", { x1: pad, y1: H - pad, x2: W - pad, y2: H - pad, class: "axis" });
  for (let l = 0; l < n; l++) {
    const x = pad + l * bw;
    if (norms[l] != null) {
      el("rect", { x: x + bw * 0.2, y: y(norms[l]), width: bw * 0.6, height: H - pad - y(norms[l]), class: "bar", "data-layer": l }).appendChild(document.createElementNS(ns, "title")).textContent = `layer ${l}: ‖v‖ = ${norms[l].toFixed(3)}`;
    }
    if (gap) {
      el("circle", { cx: x + bw / 2, cy: y(gap.before[l]), r: 4, class: "gap-before" }).appendChild(document.createElementNS(ns, "title")).textContent = `layer ${l}: gap before ${gap.before[l].toFixed(3)}`;
      el("circle", { cx: x + bw / 2, cy: y(gap.after[l]), r: 4, class: "gap-after" }).appendChild(document.createElementNS(ns, "title")).textContent = `layer ${l}: gap after ${gap.after[l].toFixed(3)}`;
    }
    if (n <= 32 || l % Math.ceil(n / 16) === 0) el("text", { x: x + bw / 2, y: H - pad + 12, "text-anchor": "middle", class: "tick" }, String(l));
  }
  el("text", { x: pad, y: 12, class: "tick" }, `max ${max.toFixed(2)} · bars ‖v_l‖${gap ? " · ○ gap before · ● after" : ""}`);
  svg.dataset.drawn = "true";
}

async function chooseVectorsFile(file) {
  if (!file) return;
  showError("");
  if (!state.loaded) return showError("load a model first, then its vector file");
  try {
    const bytes = new Uint8Array(await file.arrayBuffer());
    useVectorsInfo(await call("setVectors", { name: file.name, bytes }, null, [bytes.buffer]));
    $("variant").value = "dataset";
  } catch (err) {
    fail(err);
  } finally {
    $("vectors-input").value = "";
  }
}

/// "Compute vectors here": dataset-level CMRM over the built-in calibration set, in the worker;
/// Stop cancels. The result is cached by the worker (model, revision, set, anchor, method).
async function calibrate() {
  showError("");
  state.busy = true;
  setStatus("calibrating");
  const bar = $("calibrate-progress");
  bar.hidden = false;
  bar.value = 0;
  $("calibrate-text").textContent = "starting…";
  try {
    const result = await call("calibrate", { options: { calibration: CALIBRATION_URL } }, (ev) => {
      if (ev.kind !== "progress") return;
      bar.value = ev.done / ev.total;
      $("calibrate-text").textContent = `${ev.done} / ${ev.total} prompts${ev.etaS != null ? ` · ${ev.etaS.toFixed(0)} s left` : ""}`;
    });
    bar.value = 1;
    $("variant").value = "dataset";
    useVectorsInfo(result.vectors);
    $("calibrate-text").textContent = result.fromCache
      ? `${result.prompts} prompts, from this browser's cache`
      : `${result.prompts} prompts in ${result.seconds.toFixed(1)} s (${(result.secondsPerPrompt * 1000).toFixed(0)} ms per prompt)${result.cached ? "; cached for next time" : ""}`;
  } catch (err) {
    bar.hidden = true;
    $("calibrate-text").textContent = "";
    // Stop is not a failure: say where it stopped.
    if (err.kind === "cancelled") $("calibrate-text").textContent = err.message;
    else return fail(err);
  }
  state.busy = false;
  setStatus("ready");
}

/// Download the vectors in use as a file (made in the worker; nothing is uploaded).
async function saveVectors(format) {
  try {
    const bytes = await call("exportVectors", { format });
    const model = (state.info?.model || "model").replace(/\/+$/, "").split("/").pop();
    const a = document.createElement("a");
    a.href = URL.createObjectURL(new Blob([bytes], { type: "application/octet-stream" }));
    a.download = `${model}.cmrm-vectors.${format}`;
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 10_000);
  } catch (err) {
    fail(err);
  }
}

// ---------------------------------------------------------------- image input

async function chooseImage(file) {
  if (!file) return;
  showError("");
  const bytes = new Uint8Array(await file.arrayBuffer());
  const previous = [state.image, state.imageName];
  [state.image, state.imageName] = [bytes, file.name];
  if (state.loaded) {
    const ok = await sendImage(bytes);
    if (!ok) { [state.image, state.imageName] = previous; return; }
  } else {
    $("image-info").textContent = `${file.name} (${mb(file.size)}): used once a model is loaded`;
  }
  if ($("preview").src.startsWith("blob:")) URL.revokeObjectURL($("preview").src);
  $("preview").src = URL.createObjectURL(file);
  $("preview").hidden = false;
}

async function sendImage(bytes) {
  try {
    const copy = bytes.slice();
    const info = await call("setImage", { bytes: copy }, null, [copy.buffer]);
    $("image-info").textContent = `${state.imageName}: ${info.width}×${info.height}${info.downscaled ? " (downscaled)" : ""} → ${info.imageTokens} image tokens, encoded in ${(info.encodeSeconds * 1000).toFixed(0)} ms (vision tower ${(info.vision.seconds * 1000).toFixed(0)} ms + projector ${(info.projector.seconds * 1000).toFixed(0)} ms on ${info.vision.on === "webgpu" ? "WebGPU" : "the CPU"})`;
    return true;
  } catch (err) {
    fail(err);
    return false;
  } finally {
    $("image-input").value = "";
  }
}

// ---------------------------------------------------------------- compare

function paneEls(pane) {
  return pane === "unaltered" ? [$("pane-unaltered"), $("speed-unaltered")] : [$("pane-steered"), $("speed-steered")];
}

async function compare() {
  const prompt = $("prompt").value.trim();
  if (!prompt) return showError("type a question first");
  showError("");
  for (const p of ["unaltered", "steered"]) {
    const [text, speed] = paneEls(p);
    text.textContent = "";
    text.dataset.done = "false";
    delete text.dataset.ids;
    speed.textContent = "";
  }
  state.busy = true;
  setStatus("generating");
  const options = {
    prompt,
    maxNewTokens: Number($("max-tokens").value) || 64,
    alpha: Number($("alpha").value),
    layers: $("layers").value.trim() || "all",
    positions: $("positions").value,
    variant: $("variant").value,
    gap: $("gap").checked,
  };
  try {
    const result = await call("compare", { options }, (ev) => {
      if (ev.kind === "token") paneEls(ev.pane)[0].textContent += ev.text;
      else if (ev.kind === "prefill") paneEls(ev.pane)[1].textContent = `prefill ${ev.promptTokens} tokens in ${ev.seconds.toFixed(2)} s`;
      else if (ev.kind === "done") {
        const [text, speed] = paneEls(ev.pane);
        text.textContent = ev.result.text;
        text.dataset.ids = JSON.stringify(ev.result.generatedIds);
        text.dataset.done = "true";
        speed.textContent = `${ev.result.generatedIds.length} tokens · ${ev.result.decodeTokensPerS.toFixed(1)} tokens/s${ev.result.cancelled ? " · stopped" : ev.result.stoppedOnEos ? " · end of answer" : ""}`;
      } else if (ev.kind === "vectors") {
        if (ev.vectors.variant === "sample") { state.vectorsInfo = ev.vectors; drawChart(); }
      } else if (ev.kind === "gap") { state.lastGap = ev.gap; drawChart(); }
    });
    $("compare-info").textContent = `α = ${result.alpha}, layers ${result.layers.join(",")}, ${result.vectors.variant}-level vectors` +
      (result.notice ? ` — ${result.notice}` : "");
  } catch (err) {
    return fail(err);
  }
  state.busy = false;
  setStatus("ready");
}

// ---------------------------------------------------------------- wiring

function wire() {
  const select = $("model-select");
  select.replaceChildren();
  for (const [key, b] of Object.entries(BUNDLED)) select.add(new Option(b.label, key));
  for (const repo of HUB_MODELS) select.add(new Option(`${repo} (Hugging Face Hub)`, repo));
  select.add(new Option("another Hub repo id or folder URL…", "custom"));
  const wanted = params.get("model");
  if (wanted && BUNDLED[wanted]) select.value = wanted;
  else if (wanted) {
    if (!HUB_MODELS.includes(wanted)) { select.value = "custom"; $("custom-repo").value = wanted; }
    else select.value = wanted;
  }
  select.onchange = showPlan;
  $("custom-repo").onchange = showPlan;
  if ($("weights")) $("weights").onchange = showPlan;
  $("load-model").onclick = loadModel;
  $("compare").onclick = compare;
  if ($("calibrate")) {
    $("calibrate").onclick = calibrate;
    $("save-safetensors").onclick = () => saveVectors("safetensors");
    $("save-gguf").onclick = () => saveVectors("gguf");
  }
  $("stop").onclick = () => worker.postMessage({ type: "stop" });
  $("alpha").oninput = () => setAlpha($("alpha").value);
  $("image-input").onchange = (e) => chooseImage(e.target.files[0]);
  $("vectors-input").onchange = (e) => chooseVectorsFile(e.target.files[0]);
  $("prompt").onkeydown = (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && !$("compare").disabled) compare(); };
  $("clear-cache").onclick = async () => {
    try { $("cache-info").textContent = (await call("clearCache")) ? "cached models deleted" : "nothing was cached"; } catch (err) { fail(err); }
  };
  const drop = $("drop-zone");
  drop.ondragover = (e) => { e.preventDefault(); drop.classList.add("over"); };
  drop.ondragleave = () => drop.classList.remove("over");
  drop.ondrop = (e) => { e.preventDefault(); drop.classList.remove("over"); chooseImage(e.dataTransfer.files[0]); };
  document.onpaste = (e) => {
    const item = [...(e.clipboardData?.items || [])].find((i) => i.kind === "file");
    if (item) chooseImage(item.getAsFile());
  };
}

/// The example buttons of a bundled model: each sets its image and question.
function showExamples(examples) {
  const box = $("examples");
  if (!box) return;
  box.replaceChildren();
  box.hidden = examples.length === 0;
  examples.forEach((ex, i) => {
    const button = document.createElement("button");
    button.className = "secondary";
    button.dataset.testid = `example-${i}`;
    button.textContent = `Example: ${ex.label}`;
    button.title = ex.prompt;
    button.onclick = async () => {
      $("prompt").value = ex.prompt;
      try {
        const r = await fetch(new URL(ex.image, location.href));
        if (!r.ok) throw new Error(`${ex.image}: HTTP ${r.status}`);
        const blob = await r.blob();
        await chooseImage(new File([blob], ex.image.split("/").pop(), { type: blob.type }));
      } catch (err) { fail(err); }
    };
    box.append(button);
  });
}

/// An embed downloads by itself only this much (the bundled model, a small one); a bigger model
/// waits for the reader's click, with its size and origin shown.
const EMBED_AUTOLOAD_BYTES = 50e6;

/// "huggingface.co/owner/name", or the host of a URL (labelled when it is not this page's).
function origin(spec, hubPath) {
  if (!spec) return "";
  if (/^[\w.-]+\/[\w.-]+$/.test(spec)) return `huggingface.co/${spec}${hubPath ?? ""}`;
  try {
    const url = new URL(spec, location.href);
    return url.host === location.host ? `this site (${url.pathname})` : `${url.host} (another site)`;
  } catch { return spec; }
}

/// Where the embed's model, vectors and catalog come from: answers are the model's, not cmrm's.
function showEmbedSource(choice) {
  const model = choice.bundled ? choice.bundled.about : origin(choice.options.model);
  const vectors = params.get("vectors") ? origin(params.get("vectors")) : "the catalog's entry, or computed for each prompt";
  const catalog = new URL(CATALOG_URL).host === location.host ? "" : ` · catalog: ${new URL(CATALOG_URL).host} (another site)`;
  $("embed-source").textContent = `Model: ${model} · vectors: ${vectors}${catalog} · computed in your browser by cmrm; nothing you type or upload leaves it.`;
}

async function embedLoad() {
  await loadModel();
  const imageUrl = params.get("image");
  if (state.loaded && imageUrl) {
    try {
      const r = await fetch(imageUrl);
      if (!r.ok) throw new Error(`${imageUrl}: HTTP ${r.status}`);
      const blob = await r.blob();
      await chooseImage(new File([blob], imageUrl.split("/").pop() || "image", { type: blob.type }));
    } catch (err) { fail(err); }
  }
}

async function embedStart() {
  // embed.html?model=…&vectors=…&image=…&prompt=…: show the sources, load (a big model only
  // after a click), set the image, fill the prompt.
  if (params.get("prompt")) $("prompt").value = params.get("prompt");
  const choice = modelChoice();
  showEmbedSource(choice);
  if (!choice.bundled) {
    try {
      const plan = await call("plan", { options: choice.options });
      const left = plan.totalBytes - plan.cachedBytes;
      if (left > EMBED_AUTOLOAD_BYTES) {
        const button = $("load-model");
        button.textContent = `Load the model: ${mb(left)} to download from ${origin(choice.options.model)}`;
        button.hidden = false;
        button.onclick = () => { button.hidden = true; embedLoad(); };
        return;
      }
    } catch (err) { return fail(err); }
  }
  await embedLoad();
}

startWorker();
wire();
// Test hooks (tests/e2e): crash the worker as a runaway decoder would, to check the recovery.
if (params.has("testHooks")) window.cmrmTest = { crashWorker: () => call("crashForTest").catch(fail) };
setAlpha($("alpha").value);
drawChart();
setStatus("no model");
showPlan();
if (EMBED) embedStart();
