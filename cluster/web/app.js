// cineray playground: plain browser JavaScript over the public HTTP API (no build step).
//
// Flow: POST /v1/videos -> follow /v1/videos/{id}/events (SSE: progress, preview, then one
// terminal event) -> show /content. If the event stream drops, poll GET /v1/videos/{id}.
// The gallery lists GET /v1/videos and verifies each finished clip with POST /v1/verify.
// The token lives in sessionStorage; EventSource and <video src> cannot send headers, so those
// URLs carry it as ?access_token= (the API accepts that on GET routes).
"use strict";

const TOKEN_KEY = "cineray.token";
const TERMINAL = ["completed", "failed", "cancelled"];
// Request fields the server may name that the form shows under another field.
const PARAM_ALIASES = {
  width: "size", height: "size", camera: "camera.motion", camera_speed: "camera.speed",
  focal_length_mm: "camera.focal_length_mm", image: "input_reference", n: "form",
};

const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem(TOKEN_KEY) || "";
let currentId = null; // the job shown in the "Current video" panel
let stream = null; // its EventSource
const verified = new Map(); // job id -> promise of its /v1/verify result (a clip never changes)

class ApiError extends Error {
  constructor(status, error, retryAfter) {
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.error = error;
    this.retryAfter = retryAfter;
  }
}

// ---------------------------------------------------------------------------------------------
// API
// ---------------------------------------------------------------------------------------------

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (token) headers.Authorization = `Bearer ${token}`;
  const res = await fetch(path, { ...options, headers });
  let body = null;
  try {
    body = await res.json();
  } catch {
    body = null; // a non-JSON answer (a proxy's error page): reported by status below
  }
  if (!res.ok) {
    const error = (body && body.error) || { message: `HTTP ${res.status} ${res.statusText}` };
    if (body && body.category && !error.category) error.category = body.category;
    throw new ApiError(res.status, error, res.headers.get("Retry-After"));
  }
  return body;
}

// Same-origin URLs get ?access_token=; others (e.g. a presigned object-store URL) are left as is.
function withToken(url) {
  const u = new URL(url, location.href);
  if (u.origin === location.origin && token) u.searchParams.set("access_token", token);
  return u.origin === location.origin ? u.pathname + u.search : u.href;
}

function contentUrl(job, variant = "video", index = 0) {
  const given = variant === "preview" ? job.preview_url : job.content_url;
  if (given && index === 0) return withToken(given);
  const id = encodeURIComponent(job.id);
  return withToken(`/v1/videos/${id}/content?variant=${variant}&index=${index}`);
}

// ---------------------------------------------------------------------------------------------
// Errors next to their fields
// ---------------------------------------------------------------------------------------------

function clearErrors() {
  for (const el of document.querySelectorAll(".field-error, .form-error")) {
    if (el.id === "err-gallery") continue;
    el.hidden = true;
    el.textContent = "";
  }
  for (const el of document.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
}

// The error element for an API `param` ("size", "camera.motion", "body.size", ...), or null.
function errorSlot(param) {
  if (!param) return null;
  let parts = String(param).split(".").filter((p) => p !== "body");
  while (parts.length) {
    const name = PARAM_ALIASES[parts.join(".")] || parts.join(".");
    const slot = document.querySelector(`[data-param="${CSS.escape(name)}"]`);
    if (slot) return slot;
    parts = parts.slice(0, -1); // "camera.motion.0" -> "camera.motion" -> "camera"
  }
  return null;
}

function showError(slot, message) {
  slot.textContent = message;
  slot.hidden = false;
  const field = slot.closest(".field, form")?.querySelector("input, textarea, select");
  if (field && slot.classList.contains("field-error")) {
    field.setAttribute("aria-invalid", "true");
    return field;
  }
  return null;
}

function describeError(e) {
  const err = e.error || {};
  if (err.code === "blocked_prompt") {
    return `This prompt was blocked (category: ${err.category || "unspecified"}). ` +
      "Rephrase it and try again.";
  }
  if (e.status === 401) return "The API token was not accepted: enter the token `cineray serve` printed.";
  if (e.status === 429 || e.status === 503) {
    const wait = e.retryAfter ? ` Try again in ${e.retryAfter} s.` : "";
    return `The render queue is full.${wait}`;
  }
  return err.message || e.message || String(e);
}

function showApiError(e) {
  const param = e.status === 401 ? "token" : e.error?.param;
  const slot = errorSlot(param) || $("err-form");
  const field = showError(slot, describeError(e));
  (field || slot).focus?.();
  if (!field) slot.scrollIntoView({ block: "nearest" });
}

// ---------------------------------------------------------------------------------------------
// The form
// ---------------------------------------------------------------------------------------------

function numberOrText(value) {
  const n = Number(value);
  return value.trim() !== "" && Number.isFinite(n) ? n : value;
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error(`cannot read ${file.name}`));
    reader.readAsDataURL(file);
  });
}

// The JSON body of POST /v1/videos; empty fields are left out (the server's defaults apply).
async function readForm() {
  const body = { prompt: $("prompt").value.trim() };
  const put = (key, value, target = body) => {
    if (value !== "" && value !== undefined) target[key] = value;
  };
  put("negative_prompt", $("negative_prompt").value.trim());
  for (const key of ["seconds", "frames", "fps", "seed", "steps", "guidance"]) {
    const raw = $(key).value;
    // A number input reports "" for text it cannot parse: say so instead of dropping it.
    if (raw === "" && $(key).validity.badInput) throw new FieldError(key, "Enter a number.");
    put(key, raw === "" ? "" : numberOrText(raw));
  }
  put("size", $("size").value.trim());
  put("upscale", $("upscale").value);
  put("sampler", $("sampler").value);
  const camera = {};
  put("motion", $("camera-motion").value, camera);
  put("speed", $("camera-speed").value === "" ? "" : numberOrText($("camera-speed").value), camera);
  const focal = $("camera-focal").value;
  put("focal_length_mm", focal === "" ? "" : numberOrText(focal), camera);
  if (Object.keys(camera).length) body.camera = camera;
  const file = $("image").files[0];
  if (file) body.input_reference = await readFile(file);
  return body;
}

class FieldError extends Error {
  constructor(param, message) {
    super(message);
    this.error = { param, message };
  }
}

async function submit(event) {
  event.preventDefault();
  clearErrors();
  if (!token) {
    showError($("err-token"), "Enter the API token first (`cineray serve` prints it).");
    $("token").focus();
    return;
  }
  if (!$("prompt").value.trim()) {
    showError($("err-prompt"), "Describe the video you want.");
    $("prompt").focus();
    return;
  }
  $("submit").disabled = true;
  try {
    const body = await readForm();
    const job = await api("/v1/videos", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    follow(job);
    refreshGallery();
  } catch (e) {
    showApiError(e);
  } finally {
    $("submit").disabled = false;
  }
}

// ---------------------------------------------------------------------------------------------
// Following one job
// ---------------------------------------------------------------------------------------------

function setProgress(state) {
  const bar = $("progress");
  if (typeof state.progress === "number") bar.value = state.progress;
  if (state.status) bar.dataset.status = state.status;
  const stage = state.stage && state.stage !== state.status ? ` — ${state.stage}` : "";
  $("stage").textContent = `${state.status || "queued"}: ${Math.round(bar.value)}%${stage}`;
}

function showPreview(job) {
  const video = $("preview");
  if (video.dataset.job === job.id) return;
  video.dataset.job = job.id;
  video.src = contentUrl(job, "preview");
  $("preview-box").hidden = false;
}

function follow(job) {
  if (stream) stream.close();
  currentId = job.id;
  $("job").hidden = false;
  $("job").dataset.job = job.id;
  $("result-box").hidden = true;
  $("preview-box").hidden = true;
  $("preview").removeAttribute("data-job");
  $("result").removeAttribute("src");
  $("progress").value = 0;
  $("cancel").hidden = false;
  setProgress(job);
  if (TERMINAL.includes(job.status)) return finish(job);
  if (job.preview_url) showPreview(job);

  const es = new EventSource(withToken(`/v1/videos/${encodeURIComponent(job.id)}/events`));
  stream = es;
  const mine = () => currentId === job.id && stream === es;
  es.addEventListener("progress", (e) => mine() && setProgress(JSON.parse(e.data)));
  es.addEventListener("preview", (e) => {
    if (mine()) showPreview({ id: job.id, ...JSON.parse(e.data) });
  });
  for (const name of TERMINAL) {
    es.addEventListener(name, (e) => {
      es.close();
      if (mine()) finish(JSON.parse(e.data));
    });
  }
  // A dropped stream (proxy timeout, restarted ingress): fall back to polling the job.
  es.onerror = () => {
    if (es.readyState === EventSource.CLOSED || !mine()) return;
    es.close();
    if (mine()) poll(job.id);
  };
}

async function poll(id) {
  while (currentId === id) {
    try {
      const job = await api(`/v1/videos/${encodeURIComponent(id)}`);
      if (currentId !== id) return;
      setProgress(job);
      if (job.preview_url) showPreview(job);
      if (TERMINAL.includes(job.status)) return finish(job);
    } catch (e) {
      if (e.status === 404 || e.status === 401) return showApiError(e);
    }
    await new Promise((r) => setTimeout(r, 1000));
  }
}

function finish(job) {
  stream = null;
  $("cancel").hidden = true;
  setProgress(job);
  if (job.status === "completed") {
    $("progress").value = 100;
    const video = $("result");
    video.src = contentUrl(job);
    $("download").href = contentUrl(job);
    $("download").download = `cineray-${job.id}.mp4`;
    const size = job.size ? `${job.size}, ` : "";
    $("result-info").textContent = `${size}${job.frames ?? "?"} frames at ${job.fps ?? "?"} fps`;
    $("result-box").hidden = false;
  } else if (job.error) {
    const e = new ApiError(400, job.error);
    showError(errorSlot(job.error.param) || $("err-form"), describeError(e));
  }
  refreshGallery();
}

async function cancel() {
  if (!currentId) return;
  try {
    finish(await api(`/v1/videos/${encodeURIComponent(currentId)}`, { method: "DELETE" }));
  } catch (e) {
    showApiError(e);
  }
}

// ---------------------------------------------------------------------------------------------
// Gallery
// ---------------------------------------------------------------------------------------------

function el(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  for (const c of children) node.append(c);
  return node;
}

function verificationText(v) {
  const wm = v.watermark || {};
  const c2 = v.c2pa || {};
  const mark = wm.watermarked
    ? `found, payload ${wm.payload || "unreadable"} (confidence ${Number(wm.confidence).toFixed(2)})`
    : "not found";
  let state = c2.state || "?";
  if (c2.valid_apart_from_trust && state !== "Trusted") state += " (issuer not in your trust list)";
  if (c2.trusted_with_local_ca) state += `; with the cluster's CA: ${c2.trusted_with_local_ca}`;
  const match = v.payload_matches_manifest;
  return [["Watermark", mark], ["C2PA", state],
    ["Payload matches manifest", match == null ? "-" : match ? "yes" : "NO"]];
}

function renderVerification(box, v) {
  box.replaceChildren();
  for (const [k, val] of verificationText(v)) box.append(el("dt", { textContent: k }), el("dd", { textContent: val }));
  box.dataset.state = "done";
}

let verifyQueue = Promise.resolve();
function verify(job, box) {
  box.replaceChildren(el("dd", { textContent: "verifying…" }));
  if (!verified.has(job.id)) {
    // One verification at a time (each decodes a clip on the cluster), each asked once.
    const answer = verifyQueue.then(() => api("/v1/verify", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ video_id: job.id }),
    }));
    verifyQueue = answer.catch(() => {});
    verified.set(job.id, answer);
    answer.catch(() => verified.delete(job.id)); // a failed check may be retried on refresh
  }
  verified.get(job.id).then((v) => renderVerification(box, v), (e) => {
    box.replaceChildren(el("dd", { textContent: `verification failed: ${describeError(e)}` }));
    box.dataset.state = "error";
  });
}

function galleryItem(job) {
  const when = job.created_at ? new Date(job.created_at * 1000).toLocaleString() : "";
  const item = el("li", { className: "card" });
  item.dataset.job = job.id;
  item.dataset.status = job.status;
  if (job.status === "completed" || job.preview_url) {
    const variant = job.status === "completed" ? "video" : "preview";
    item.append(el("video", {
      src: contentUrl(job, variant), controls: true, muted: true, loop: true, preload: "metadata",
      ariaLabel: `Video: ${job.prompt}`,
    }));
  }
  const status = job.status === "in_progress" ? `in progress ${job.progress}%` : job.status;
  item.append(el("p", { className: "prompt", textContent: job.prompt || "(no prompt)" }),
    el("p", { className: "hint", textContent: `${status} · ${job.size || ""} · ${when}` }));
  if (job.error) item.append(el("p", { className: "field-error", textContent: describeError(new ApiError(400, job.error)) }));
  const open = el("button", { type: "button", textContent: "Open" });
  open.addEventListener("click", () => {
    follow(job);
    $("job").scrollIntoView({ block: "nearest" });
  });
  item.append(open);
  if (job.status === "completed") {
    const box = el("dl", { className: "verify" });
    box.setAttribute("aria-label", "Verification");
    item.append(box);
    verify(job, box);
  }
  return item;
}

async function refreshGallery() {
  if (!token) return;
  $("err-gallery").hidden = true;
  try {
    const list = await api("/v1/videos?limit=12");
    $("gallery").replaceChildren(...list.data.map(galleryItem));
    if (!list.data.length) $("gallery").append(el("li", { className: "hint", textContent: "No videos yet." }));
  } catch (e) {
    showError(e.status === 401 ? $("err-token") : $("err-gallery"), describeError(e));
  }
}

// ---------------------------------------------------------------------------------------------
// Token and start-up
// ---------------------------------------------------------------------------------------------

async function useToken(value) {
  token = value.trim();
  clearErrors();
  if (!token) return;
  sessionStorage.setItem(TOKEN_KEY, token);
  $("token").value = "";
  $("token").placeholder = "saved for this session";
  $("token-state").textContent = "Token saved for this browser session.";
  await refreshGallery();
}

function start() {
  // `cineray serve` may print a URL ending in #token=...: keep it, then drop it from the bar.
  const fromHash = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromHash) history.replaceState(null, "", location.pathname + location.search);
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    useToken($("token").value);
  });
  $("generate").addEventListener("submit", submit);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("generate").requestSubmit();
  });
  $("cancel").addEventListener("click", cancel);
  $("refresh").addEventListener("click", refreshGallery);
  $("image").addEventListener("change", () => {
    const file = $("image").files[0];
    const img = $("image-preview");
    img.hidden = !file;
    if (file) img.src = URL.createObjectURL(file);
  });
  if (fromHash || token) useToken(fromHash || token);
  else $("token").focus();
}

start();
