// The web UI's page: the runs list, one run's live view (server-sent events from its folder), start / stop /
// resume, and sampling. Plain DOM, no libraries; the loss curve is an SVG drawn here.
"use strict";

const TOKEN = document.querySelector('meta[name="finetune-token"]').content;
const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";

// What the open run's events have said so far. points: step -> that step's metrics line (the latest one wins,
// so a resumed run's repeated steps replace the old ones).
const view = { run: null, source: null, points: new Map(), last: null, maxSteps: null, data: null,
               status: null, settings: {}, runs: [] };
// For tests and benchmarks: when each metrics update reached the page (ms since the epoch) and at which step.
window.finetuneUI = { updates: [] };

// ---- talking to the server ------------------------------------------------------------------------------------

async function post(path, body) {
  const response = await fetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-Finetune-Token": TOKEN },
    body: JSON.stringify(body),
  });
  const data = await response.json().catch(() => ({ error: response.statusText }));
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

function fileUrl(picture) {
  // A file under the output root; the version (its mtime) makes the browser fetch a rewritten file again.
  const path = picture.path.split("/").map(encodeURIComponent).join("/");
  return `/files/${path}?v=${picture.version}`;
}

// ---- the runs list and the start form -------------------------------------------------------------------------

async function refreshRuns() {
  let data;
  try {
    data = await (await fetch("/api/runs")).json();
  } catch (error) {
    $("connection").textContent = "server not reachable";
    return;
  }
  view.runs = data.runs;
  $("root").textContent = data.root;
  const list = $("run-list");
  const shown = JSON.stringify([data.runs, view.run]);  // redrawn only when it changed: the page idles while it waits
  if (list.dataset.shown !== shown) {
    list.dataset.shown = shown;
    showRunList(list, data.runs);
  }
  fillSelect($("config"), data.configs.map((name) => [name, name]));
  fillSelect($("sample-run"), data.runs.filter((run) => run.samplable).map((run) => [run.name, run.name]));
}

function showRunList(list, runs) {
  list.replaceChildren(...runs.map((run) => {
    const item = document.createElement("li");
    item.dataset.run = run.name;
    item.title = run.detail;
    item.classList.toggle("selected", run.name === view.run);
    const name = document.createElement("span");
    name.textContent = run.name;
    item.append(name, stateBadge(run.state));
    item.addEventListener("click", () => openRun(run.name));
    return item;
  }));
  if (!runs.length) list.innerHTML = '<li class="muted">no runs under the root yet</li>';
}

function fillSelect(select, options) {
  const chosen = select.value;
  const wanted = options.map(([value]) => value).join("\n");
  if (select.dataset.options === wanted) return;
  select.dataset.options = wanted;
  select.replaceChildren(...options.map(([value, label]) => new Option(label, value)));
  if (options.some(([value]) => value === chosen)) select.value = chosen;
}

function stateBadge(state) {
  const badge = document.createElement("span");
  badge.className = `state ${state}`;
  badge.textContent = state;
  return badge;
}

async function startRun(event) {
  event.preventDefault();
  $("start-error").textContent = "";
  const overrides = $("overrides").value.split("\n").map((line) => line.trim()).filter(Boolean);
  $("start").disabled = true;
  try {
    const result = await post("/api/start", { config: $("config").value, overrides });
    await refreshRuns();
    openRun(result.run);
  } catch (error) {
    $("start-error").textContent = error.message;
  } finally {
    $("start").disabled = false;
  }
}

async function runAction(action) {
  $("action-message").textContent = "";
  try {
    const result = await post(`/api/${action}`, { run: view.run });
    $("action-message").textContent = result.message || `${action}: ok`;
    refreshRuns();
  } catch (error) {
    $("action-message").textContent = error.message;
  }
}

// ---- one run, live ----------------------------------------------------------------------------------------------

function openRun(name) {
  if (view.source) view.source.close();
  Object.assign(view, { run: name, points: new Map(), last: null, maxSteps: null, data: null, status: null,
                        startStep: null });
  for (const item of $("run-list").children) item.classList.toggle("selected", item.dataset.run === name);
  $("no-run").hidden = true;
  $("run-detail").hidden = false;
  $("run-name").textContent = name;
  $("action-message").textContent = "";
  for (const id of ["grid", "base", "reverse", "forward"]) $(id).hidden = true;
  history.replaceState(null, "", `#runs/${encodeURIComponent(name)}`);

  const source = new EventSource(`/api/events?run=${encodeURIComponent(name)}`);
  view.source = source;
  source.onopen = () => { $("connection").textContent = "live"; };
  source.onerror = () => {
    $("connection").textContent = "reconnecting…";
    // The browser retries a dropped stream itself, but not one refused outright: try again shortly.
    if (source.readyState === EventSource.CLOSED) setTimeout(() => { if (view.source === source) openRun(name); }, 2000);
  };
  source.addEventListener("metrics", (event) => showMetrics(JSON.parse(event.data)));
  source.addEventListener("status", (event) => showStatus(JSON.parse(event.data)));
  source.addEventListener("pictures", (event) => showPictures(JSON.parse(event.data)));
  source.addEventListener("evaluation", (event) => showEvaluation(JSON.parse(event.data)));
  source.addEventListener("settings", (event) => { view.settings = JSON.parse(event.data); showNumbers(); });
}

function showMetrics(message) {
  if (message.reset) Object.assign(view, { points: new Map(), last: null, data: null, startStep: null });
  for (const record of message.records) {
    if (record.event === "start") {
      // A (re)start: the steps after it will be trained again.
      for (const step of [...view.points.keys()]) if (step > record.step) view.points.delete(step);
      view.startStep = record.step;
      view.maxSteps = record.max_steps;
      view.last = view.points.size ? view.points.get(Math.max(...view.points.keys())) : null;
    } else if (record.data) {
      view.data = record.data;
    } else if ("loss" in record) {
      view.points.set(record.step, record);
      view.last = record;
      view.maxSteps = record.max_steps;
    }
  }
  showNumbers();
  drawCurve();
  showData();
  const step = view.last ? view.last.step : view.startStep;
  window.finetuneUI.updates.push({ step, shown: Date.now() });
}

function showStatus(status) {
  view.status = status;
  const badge = $("state");
  badge.className = `state ${status.state}`;
  badge.textContent = status.state;
  $("state-detail").textContent = status.detail;
  $("stop").disabled = !["running", "starting"].includes(status.state);
  $("resume").disabled = !["stopped", "crashed"].includes(status.state);
  $("log").hidden = !status.log;
  $("log").textContent = status.log || "";
  showNumbers();
  refreshRuns();
}

function showNumbers() {
  const last = view.last;
  const total = view.maxSteps || view.settings.max_train_steps;
  const step = last ? last.step : view.startStep;
  $("step").textContent = step == null ? "–" : `${step} / ${total ?? "?"}`;
  $("progress-bar").style.width = step != null && total ? `${Math.min(100, (100 * step) / total)}%` : "0";
  $("speed").textContent = last && last.images_per_s != null ? last.images_per_s.toFixed(1) : "–";
  $("loss").textContent = last && last.loss != null ? last.loss.toFixed(4) : "–";
  $("lr").textContent = last && last.lr != null ? last.lr.toExponential(2) : "–";
  $("grad-norm").textContent = last && last.grad_norm != null ? last.grad_norm.toFixed(3) : "–";
  const running = view.status && view.status.state === "running";
  $("eta").textContent = running && last && total && last.step_time ? duration((total - last.step) * last.step_time)
                                                                      : "–";
}

function duration(seconds) {
  const s = Math.max(0, Math.round(seconds));
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), rest = s % 60;
  return (h ? `${h}:${String(m).padStart(2, "0")}` : `${m}`) + `:${String(rest).padStart(2, "0")}`;
}

function showData() {
  const table = $("data");
  if (!view.data) return;
  const skipped = Object.entries(view.data).filter(([name]) => name.startsWith("skipped"))
                                           .reduce((sum, [, count]) => sum + count, 0);
  $("skipped").textContent = String(skipped);
  table.replaceChildren(...Object.entries(view.data).map(([name, count]) => {
    const row = document.createElement("tr");
    row.className = name.startsWith("skipped") ? "bad" : "";
    row.append(cell(name), cell(String(count)));
    return row;
  }));
}

function cell(text) {
  const td = document.createElement("td");
  td.textContent = text;
  return td;
}

function showPictures(pictures) {
  const captions = { grid: "sample grid", base: "the base, before training (same prompts and seeds)",
                     reverse: "reverse process", forward: "forward process" };
  for (const [name, picture] of Object.entries(pictures)) {
    const image = $(name);
    if (!picture) {
      image.hidden = true;
      if (name === "base") $("base-caption").textContent = "";  // another run's caption must not stay
      continue;
    }
    const url = fileUrl(picture);
    if (image.dataset.url !== url) {
      image.dataset.url = url;
      image.onload = () => { scale(image, 640); image.hidden = false; };
      image.src = url;
    }
    const step = picture.path.match(/step-(\d+)\.png$/);
    const caption = $(`${name}-caption`);
    if (caption) caption.textContent = step ? `${captions[name]} at step ${step[1]}` : captions[name];
  }
}

function scale(image, widest, most = 6) {
  // Tiny pixel-space samples are shown enlarged (pixelated, at most `most` times), larger ones as they are.
  const factor = Math.max(1, Math.min(most, Math.floor(widest / image.naturalWidth)));
  image.style.width = `${image.naturalWidth * factor}px`;
}

function showEvaluation(evaluation) {
  const table = $("evaluation");
  if (!evaluation || !evaluation.metrics) return;
  table.replaceChildren(...Object.entries(evaluation.metrics).map(([name, value]) => {
    const row = document.createElement("tr");
    row.append(cell(name), cell(typeof value === "number" ? value.toPrecision(4) : String(value)));
    return row;
  }));
}

// ---- the loss curve ---------------------------------------------------------------------------------------------

function drawCurve() {
  const svg = $("curve");
  const points = [...view.points.values()].filter((p) => p.loss > 0).sort((a, b) => a.step - b.step);
  svg.replaceChildren();
  const [width, height, left, right, top, bottom] = [640, 220, 52, 12, 10, 24];
  if (points.length < 2) {
    svg.append(text(width / 2, height / 2, points.length ? "one point so far" : "no losses logged yet", "middle"));
    return;
  }
  const shown = thinned(points, 600);
  const x0 = shown[0].step, x1 = shown[shown.length - 1].step;
  const logs = shown.map((p) => Math.log10(p.loss));
  const y0 = Math.min(...logs), y1 = Math.max(...logs) + 1e-9;
  const lrMax = Math.max(...shown.map((p) => p.lr || 0)) || 1;
  const x = (step) => left + ((step - x0) / (x1 - x0 || 1)) * (width - left - right);
  const y = (fraction) => top + (1 - fraction) * (height - top - bottom);
  svg.append(
    line(left, top, left, height - bottom), line(left, height - bottom, width - right, height - bottom),
    polyline(shown.map((p, i) => [x(p.step), y((logs[i] - y0) / (y1 - y0))]), "loss-line"),
    polyline(shown.map((p) => [x(p.step), y((p.lr || 0) / lrMax)]), "lr-line"),
    text(left - 4, top + 10, (10 ** y1).toPrecision(3), "end"),
    text(left - 4, height - bottom, (10 ** y0).toPrecision(3), "end"),
    text(left, height - 6, `step ${x0}`, "start"),
    text(width - right, height - 6, `step ${x1}`, "end"),
    text(width - right, top + 10, `lr max ${lrMax.toExponential(1)}`, "end"),
  );
}

function thinned(points, most) {
  if (points.length <= most) return points;
  const every = points.length / most;
  const kept = Array.from({ length: most }, (_, k) => points[Math.floor(k * every)]);
  kept.push(points[points.length - 1]);
  return kept;
}

function polyline(coordinates, className) {
  const element = document.createElementNS(SVG, "polyline");
  element.setAttribute("points", coordinates.map(([a, b]) => `${a.toFixed(1)},${b.toFixed(1)}`).join(" "));
  element.setAttribute("class", className);
  return element;
}

function line(xa, ya, xb, yb) {
  const element = document.createElementNS(SVG, "line");
  for (const [name, value] of Object.entries({ x1: xa, y1: ya, x2: xb, y2: yb })) element.setAttribute(name, value);
  element.setAttribute("class", "axis");
  return element;
}

function text(xPos, yPos, content, anchor) {
  const element = document.createElementNS(SVG, "text");
  element.setAttribute("x", xPos);
  element.setAttribute("y", yPos);
  element.setAttribute("text-anchor", anchor);
  element.textContent = content;
  return element;
}

// ---- sampling ---------------------------------------------------------------------------------------------------

async function startSample(event) {
  event.preventDefault();
  const request = {
    run: $("sample-run").value, prompt: $("prompt").value,
    num_inference_steps: Number($("steps").value), guidance_scale: Number($("guidance").value),
    seed: Number($("seed").value), scheduler: $("scheduler").value, num_images_per_prompt: Number($("count").value),
  };
  $("sample-status").textContent = "starting…";
  $("sample-button").disabled = true;
  try {
    await post("/api/sample", request);
    followSample();
  } catch (error) {
    $("sample-status").textContent = error.message;
    $("sample-button").disabled = false;
  }
}

async function followSample() {
  const job = await (await fetch("/api/sample")).json();
  const fraction = job.total ? job.step / job.total : 0;
  $("sample-bar").style.width = `${100 * fraction}%`;
  if (job.state === "loading" || job.state === "sampling") {
    $("sample-status").textContent = job.state === "loading" ? "loading the pipeline…"
                                                             : `step ${job.step} / ${job.total}`;
    setTimeout(followSample, 200);
    return;
  }
  $("sample-button").disabled = false;
  if (job.state === "failed") {
    $("sample-status").textContent = job.error;
    return;
  }
  $("sample-status").textContent = `${job.images.length} images from ${job.run}, written to ${job.grid}`;
  $("sample-images").replaceChildren(...job.images.map((path) => {
    const image = new Image();
    image.alt = path;
    image.className = "sample";
    image.onload = () => scale(image, 160, 16);
    image.src = fileUrl({ path, version: job.version });
    return image;
  }));
}

// ---- tabs and start-up ------------------------------------------------------------------------------------------

function showTab() {
  const sample = location.hash.startsWith("#sample");
  $("runs-view").hidden = sample;
  $("sample-view").hidden = !sample;
  $("tab-runs").classList.toggle("active", !sample);
  $("tab-sample").classList.toggle("active", sample);
}

window.addEventListener("hashchange", showTab);
$("start-form").addEventListener("submit", startRun);
$("stop").addEventListener("click", () => runAction("stop"));
$("resume").addEventListener("click", () => runAction("resume"));
$("sample-form").addEventListener("submit", startSample);
showTab();
refreshRuns().then(() => {
  const wanted = location.hash.match(/^#runs\/(.+)$/);
  if (wanted) openRun(decodeURIComponent(wanted[1]));
});
setInterval(refreshRuns, 3000);
