// The RAEE Serve console: plain JavaScript over the HTTP/JSON API (/openapi.json), no build step.
// Every string from the server goes into the page as text (textContent), never as HTML.
"use strict";

const INGEST_CHUNK = 64; // examples per Ingest call: the progress bar moves once per call
const REFRESH_MS = 3000;
const state = { key: sessionStorage.getItem("raee-api-key") || "", tasks: [], selected: null, timer: null };
const $ = (id) => document.getElementById(id);

// -- small helpers ---------------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "onclick") node.addEventListener("click", value);
    else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child));
  return node;
}

function fill(tbody, rows) {
  tbody.replaceChildren(...rows);
}

function show(id, visible) {
  $(id).hidden = !visible;
}

function percent(x) {
  return `${(100 * x).toFixed(1)} %`;
}

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

async function api(method, path, body) {
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (state.key) headers["x-api-key"] = state.key;
  let response;
  try {
    response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (err) {
    throw new ApiError(0, { message: `cannot reach the server (${err.message})` });
  }
  let data = null;
  try {
    data = await response.json();
  } catch (err) {
    data = null;
  }
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

function notice(message) {
  $("notice").textContent = message || "";
  show("notice", Boolean(message));
}

function explain(err) {
  if (err.status === 401) {
    $("api-key").focus();
    return `${err.message}. This server needs an API key: enter one at the top.`;
  }
  return err.message;
}

// -- SVG bar charts ---------------------------------------------------------------------------------

function barChart(container, values, names, options = {}) {
  const ns = "http://www.w3.org/2000/svg";
  const width = 420, height = 150, bottom = 20, top = 14;
  const max = options.max ?? Math.max(1, ...values);
  const step = width / Math.max(1, values.length);
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("role", "img");
  values.forEach((value, i) => {
    const h = ((height - bottom - top) * value) / max;
    const bar = document.createElementNS(ns, "rect");
    bar.setAttribute("x", i * step + step * 0.12);
    bar.setAttribute("y", height - bottom - h);
    bar.setAttribute("width", step * 0.76);
    bar.setAttribute("height", Math.max(h, value > 0 ? 1 : 0));
    bar.setAttribute("class", options.highlight === i ? "bar highlight" : "bar");
    const tip = document.createElementNS(ns, "title");
    tip.textContent = `${names[i]}: ${options.format ? options.format(value) : value}`;
    bar.append(tip);
    const label = document.createElementNS(ns, "text");
    label.setAttribute("x", i * step + step / 2);
    label.setAttribute("y", height - 5);
    label.setAttribute("class", "axis");
    label.textContent = names[i];
    svg.append(bar, label);
    if (options.labelValues && value > 0) {
      const v = document.createElementNS(ns, "text");
      v.setAttribute("x", i * step + step / 2);
      v.setAttribute("y", height - bottom - h - 3);
      v.setAttribute("class", "value");
      v.textContent = options.format ? options.format(value) : value;
      svg.append(v);
    }
  });
  container.replaceChildren(svg);
}

// -- tasks --------------------------------------------------------------------------------------------

async function loadTasks() {
  try {
    const reply = await api("GET", "/v1/tasks");
    state.tasks = reply.tasks || [];
    notice("");
  } catch (err) {
    state.tasks = [];
    notice(err.status === 403 ? `${err.message}. Without an admin key, type a task name in the forms below.`
                              : explain(err));
  }
  renderTasks();
}

function autoCell(task) {
  if (!task.auto) return el("span", { class: "muted" }, "not tuned yet");
  const a = task.auto;
  return el("span", {}, el("code", {}, a.policy), ` k=${a.k}: ${percent(a.validationAccuracy)} `,
            el("span", { class: "muted" }, `${a.objective || "accuracy"}, ${a.validationRows} rows`));
}

function headsCell(task) {
  if (!task.heads) return el("span", { class: "muted" }, "not fit yet");
  const cell = el("div", { class: "mini-chart" });
  const accuracy = task.heads.validationAccuracy || [];
  barChart(cell, accuracy, accuracy.map((_, i) => String(i)), { max: 1, format: percent,
                                                               highlight: task.heads.bestExit });
  return el("div", {}, cell, el("span", { class: "muted" },
    `v${task.heads.version}, best exit ${task.heads.bestExit}: ${percent(accuracy[task.heads.bestExit] || 0)}`));
}

function renderTasks() {
  const rows = state.tasks.map((task) => {
    const labels = (task.labels || []).map((lb) => `${lb.name} (${(task.labelRecords || {})[lb.name] || 0})`);
    const row = el("tr", { class: "task-row", "data-task": task.name, onclick: () => selectTask(task.name) },
      el("td", {}, el("a", { href: "#task" }, task.name)),
      el("td", { class: "num" }, task.records),
      el("td", {}, labels.join(", "), task.imbalanced ? el("span", { class: "warn" }, " imbalanced") : ""),
      el("td", {}, el("code", {}, task.template)),
      el("td", {}, autoCell(task)),
      el("td", {}, headsCell(task)));
    if (task.name === state.selected) row.classList.add("selected");
    return row;
  });
  if (rows.length === 0) {
    rows.push(el("tr", {}, el("td", { colspan: 6, class: "muted" }, "no tasks to show")));
  }
  fill($("tasks").tBodies[0], rows);
  $("task-names").replaceChildren(...state.tasks.map((t) => el("option", { value: t.name })));
  for (const id of ["try-task", "ingest-task"]) {
    if (!$(id).value && state.tasks.length) $(id).value = state.selected || state.tasks[0].name;
  }
  renderTryInputs();
}

async function selectTask(name) {
  state.selected = name;
  for (const row of document.querySelectorAll(".task-row")) {
    row.classList.toggle("selected", row.dataset.task === name);
  }
  $("try-task").value = name;
  $("ingest-task").value = name;
  renderTryInputs();
  $("task-name").textContent = name;
  show("task-section", true);
  clearInterval(state.timer);
  state.timer = setInterval(refreshTask, REFRESH_MS);
  await refreshTask();
}

async function refreshTask() {
  const name = state.selected;
  if (!name) return;
  const path = `/v1/tasks/${encodeURIComponent(name)}`;
  try {
    const [task, stats] = await Promise.all([api("GET", path), api("GET", `${path}/stats`)]);
    if (name !== state.selected) return;
    renderStats(stats);
    const depth = task.depth;
    const layers = [...Array(depth + 1).keys()].map(String);
    barChart($("earliest-exits"), (task.earliestExitCounts || []).map(Number), layers, { labelValues: true });
    show("heads-card", Boolean(task.heads));
    if (task.heads) {
      barChart($("heads-chart"), task.heads.validationAccuracy, layers,
               { max: 1, format: percent, highlight: task.heads.bestExit });
    }
  } catch (err) {
    notice(explain(err));
  }
}

function renderStats(stats) {
  const counts = (stats.exitLayerCounts || []).map(Number);
  const layers = counts.map((_, i) => String(i));
  barChart($("recent-exits"), counts, layers, { labelValues: true });
  const mean = stats.answers ? counts.reduce((s, c, i) => s + c * i, 0) / stats.answers : 0;
  // Each replica counts its own answers: say whose these are.
  const whose = replica ? ` on replica ${replica}` : "";
  $("recent-summary").textContent = stats.answers
    ? `last ${stats.answers} answers${whose} (window ${stats.window}) since ${stats.since}; mean exit ${mean.toFixed(2)} of ${stats.depth}`
    : `no answers${whose} since it started`;
  if (stats.answers && Number(stats.coverageChecked)) {  // drift: traffic unlike the records
    const outside = Number(stats.outsideCoverage || 0), checked = Number(stats.coverageChecked);
    $("recent-summary").textContent += `; answered by the key ${Number(stats.keyAnswers || 0)}; outside the records' `
      + `coverage ${outside} of ${checked} checked (${((100 * outside) / checked).toFixed(0)} %)`;
  }
  fill($("latency").tBodies[0], [
    ["p50", stats.latencyP50Ms], ["p90", stats.latencyP90Ms], ["p99", stats.latencyP99Ms],
  ].map(([name, ms]) => el("tr", {}, el("th", {}, name), el("td", { class: "num" }, `${Number(ms).toFixed(1)} ms`))));
}

// -- try it -----------------------------------------------------------------------------------------

function inputsOf(name) {
  // A task's named inputs: one text box each for a sentence-pair task; `text` alone otherwise.
  const task = state.tasks.find((t) => t.name === name);
  return task && task.inputs && task.inputs.length > 1 ? task.inputs : ["text"];
}

function renderTryInputs() {
  const inputs = inputsOf($("try-task").value.trim());
  const several = inputs.length > 1;
  show("try-text", !several);
  show("try-inputs", several);
  const shown = [...$("try-inputs").querySelectorAll("textarea")].map((box) => box.dataset.input);
  if (several && shown.join("\n") !== inputs.join("\n")) {
    $("try-inputs").replaceChildren(...inputs.map((name) => el("label", { class: "input" }, name,
      el("textarea", { rows: "2", "data-input": name, placeholder: `the ${name}` }))));
  }
}

async function classify(event) {
  event.preventDefault();
  const task = $("try-task").value.trim();
  const options = { returnNeighbours: true };
  const inputs = inputsOf(task);
  const example = inputs.length > 1
    ? { inputs: Object.fromEntries([...$("try-inputs").querySelectorAll("textarea")]
        .map((box) => [box.dataset.input, box.value])) }
    : { text: $("try-text").value };
  if ($("try-policy").value.trim()) options.policy = $("try-policy").value.trim();
  if ($("try-k").value) options.k = Number($("try-k").value);
  show("try-error", false);
  $("try-submit").disabled = true;
  try {
    const reply = await api("POST", `/v1/tasks/${encodeURIComponent(task)}:classify`,
                            { ...example, options });
    renderAnswer(reply, task);
    if (task === state.selected) refreshTask();
  } catch (err) {
    show("try-result", false);
    $("try-error").textContent = explain(err);
    show("try-error", true);
  } finally {
    $("try-submit").disabled = false;
  }
}

function renderAnswer(reply, task) {
  $("try-label").textContent = reply.label;
  $("try-exit").textContent = reply.exitLayer;
  $("try-depth").textContent = reply.depth;
  $("try-answered-by").textContent = reply.policy;
  // the key head answers before any layer: "exit layer 0" alone would read as the embedding exit
  $("try-source").textContent = reply.answeredBy === "key" ? "the key (no backbone layer ran)" : reply.answeredBy || "backbone";
  $("try-coverage").textContent = reply.coverage === "outside"
    ? "; outside what the records cover (no early stop)" : "";
  $("try-depth-bar").firstElementChild.style.width = `${(100 * reply.exitLayer) / Math.max(1, reply.depth)}%`;
  barChart($("try-scores"), reply.scores.map((s) => s.score), reply.scores.map((s) => s.label),
           { max: 1, format: (x) => x.toFixed(3), labelValues: true });
  const t = reply.timings;
  fill($("try-timings").tBodies[0], [
    ["queue", t.queueUs], ["key (encode)", t.encodeUs], ["retrieve", t.retrieveUs], ["forward", t.forwardUs],
    ["total", t.totalUs],
  ].map(([name, us]) => el("tr", {}, el("th", {}, name), el("td", { class: "num" }, (Number(us) / 1000).toFixed(2)))));
  fill($("try-neighbours").tBodies[0], (reply.neighbours || []).map((n, i) => el("tr", {},
    el("td", { class: "num" }, i + 1), el("td", {}, n.label), el("td", { class: "num" }, Number(n.similarity).toFixed(3)),
    el("td", {}, (n.exitLayers || []).join(" ")), el("td", {}, el("code", {}, n.id)),
    el("td", {}, el("button", { type: "button", class: "delete-record", onclick: (event) => deleteRecord(task, n.id, event.target) },
                    "delete")))));
  show("try-result", true);
}

async function deleteRecord(task, id, button) {
  // A mislabelled or unwanted record goes from every store; from the next answer on it is no neighbour.
  if (!window.confirm(`Delete record ${id} from task ${task}?`)) return;
  button.disabled = true;
  try {
    const reply = await api("POST", `/v1/tasks/${encodeURIComponent(task)}/records:delete`, { ids: [id] });
    const row = button.closest("tr");
    row.classList.add("deleted");
    button.textContent = (reply.deletedIds || []).length ? "deleted" : "already gone";
    if (task === state.selected) refreshTask();
  } catch (err) {
    button.disabled = false;
    notice(explain(err));
  }
}

// -- ingest -----------------------------------------------------------------------------------------

function parseFile(name, content) {
  // Returns {rows: [{line, text, label}], rejected: [{line, reason}]}; line numbers count from 1.
  const lines = content.split(/\r?\n/);
  if (lines.length && lines[lines.length - 1] === "") lines.pop();
  const rows = [], rejected = [];
  if (/\.(jsonl|ndjson)$/i.test(name)) {
    lines.forEach((line, i) => {
      if (!line.trim()) return;
      try {
        const item = JSON.parse(line);
        if (item === null || typeof item !== "object" || Array.isArray(item)) throw new Error("not an object");
        const label = item.label === undefined || item.label === null ? "" : String(item.label);
        if ("text" in item) {
          rows.push({ line: i + 1, text: typeof item.text === "string" ? item.text : "", label });
        } else {  // a task with several inputs: every other field is an input, named as the task names it
          const inputs = Object.fromEntries(Object.entries(item).filter(([k]) => k !== "label")
            .map(([k, v]) => [k, typeof v === "string" ? v : ""]));
          rows.push({ line: i + 1, inputs, label });
        }
      } catch (err) {
        rejected.push({ line: i + 1, reason: `not a JSON object (${err.message})` });
      }
    });
    return { rows, rejected };
  }
  const header = (lines[0] || "").split("\t");
  const textAt = header.indexOf("text"), labelAt = header.indexOf("label");
  // a 'text' column, or (a task with several inputs) a column per input, named as the task names it
  const inputAt = header.map((name, at) => [name, at]).filter(([name]) => name !== "label");
  if (labelAt < 0 || !inputAt.length) {
    throw new Error("line 1: the header needs a 'text' (or a column per input) and a 'label' column, tab-separated");
  }
  lines.slice(1).forEach((line, i) => {
    const cells = line.split("\t");
    if (cells.length !== header.length) {
      rejected.push({ line: i + 2, reason: `${cells.length} tab-separated fields; the header has ${header.length}` });
    } else if (textAt >= 0) {
      rows.push({ line: i + 2, text: cells[textAt], label: cells[labelAt] });
    } else {
      rows.push({ line: i + 2, inputs: Object.fromEntries(inputAt.map(([name, at]) => [name, cells[at]])),
                  label: cells[labelAt] });
    }
  });
  return { rows, rejected };
}

async function ingest(event) {
  event.preventDefault();
  const task = $("ingest-task").value.trim();
  const file = $("ingest-file").files[0];
  show("ingest-error", false);
  show("ingest-summary", false);
  show("ingest-rejections", false);
  if (!file) return;
  let parsed;
  try {
    parsed = parseFile(file.name, await file.text());
  } catch (err) {
    $("ingest-error").textContent = `${file.name}: ${err.message}`;
    show("ingest-error", true);
    return;
  }
  const { rows, rejected } = parsed;
  const progress = $("ingest-progress");
  progress.max = Math.max(1, rows.length);
  progress.value = 0;
  show("ingest-progress", true);
  $("ingest-submit").disabled = true;
  let added = 0, present = 0;
  try {
    for (let start = 0; start < rows.length; start += INGEST_CHUNK) {
      const chunk = rows.slice(start, start + INGEST_CHUNK);
      let reply;
      try {
        reply = await api("POST", `/v1/tasks/${encodeURIComponent(task)}:ingest`,
                          { examples: chunk.map((r) => (r.inputs ? { inputs: r.inputs, label: r.label }
                                                                 : { text: r.text, label: r.label })) });
      } catch (err) {
        const stored = start ? `; the rows before line ${chunk[0].line} were stored` : "";
        throw new ApiError(err.status, { message: `${explain(err)} (stopped at line ${chunk[0].line}${stored})` });
      }
      added += reply.added || 0;
      present += reply.alreadyPresent || 0;
      for (const r of reply.rejections || []) rejected.push({ line: chunk[r.index].line, reason: r.reason });
      progress.value = start + chunk.length;
    }
  } catch (err) {
    $("ingest-error").textContent = err.message;
    show("ingest-error", true);
  } finally {
    $("ingest-submit").disabled = false;
  }
  rejected.sort((a, b) => a.line - b.line);
  $("ingest-summary").textContent =
    `${file.name}: ${added} added, ${present} already present, ${rejected.length} rejected`;
  show("ingest-summary", true);
  fill($("ingest-rejections").tBodies[0],
       rejected.map((r) => el("tr", {}, el("td", { class: "num" }, r.line), el("td", {}, r.reason))));
  show("ingest-rejections", rejected.length > 0);
  await loadTasks();
  if (state.selected === task) refreshTask();
}

// -- start ------------------------------------------------------------------------------------------

async function serverState() {
  try {
    const response = await fetch("/readyz");
    const body = await response.json();
    $("server-state").textContent = body.status === "SERVING" ? "serving" : "not ready";
    $("server-state").className = body.status === "SERVING" ? "pill ok" : "pill bad";
  } catch (err) {
    $("server-state").textContent = "unreachable";
    $("server-state").className = "pill bad";
  }
}

let replica = "";  // this server's name among replicas (GetServerInfo)

async function loadServerInfo() {
  // What the server runs and the policies it knows (GetServerInfo); the policy box offers them.
  try {
    const info = await api("GET", "/v1/server");
    $("server-info").textContent = `replica ${info.replica} · ${info.backbone} · depth ${info.depth} · keys ${info.encoder} · v${info.version}`;
    replica = info.replica;
    $("policies").replaceChildren(...info.policies.map((name) => el("option", { value: name })));
  } catch (err) {
    $("server-info").textContent = "";
  }
}

// -- operations -----------------------------------------------------------------------------------

const SHOWN_OPERATIONS = 12;  // the newest; `raee-admin operation list` has them all
const STATES = { STATE_QUEUED: "queued", STATE_RUNNING: "running", STATE_SUCCEEDED: "succeeded",
                 STATE_FAILED: "failed", STATE_CANCELLED: "cancelled" };

async function loadOperations() {
  let operations = [];
  try {
    operations = (await api("GET", "/v1/operations")).operations || [];
  } catch (err) {
    fill($("operations").tBodies[0], [el("tr", {}, el("td", { colspan: 6, class: "muted" }, explain(err)))]);
    return;
  }
  const rows = operations.slice(0, SHOWN_OPERATIONS).map((op) => {
    const total = Number(op.progressTotal || 0), done = Number(op.progressDone || 0);
    // A known total: a bar of done/total. Unknown: an indeterminate bar while it runs.
    const bar = el("progress", total ? { max: total, value: done } : op.done ? { max: 1, value: 1 } : {});
    const what = op.error && op.error.message ? op.error.message : op.progressMessage;
    const state = STATES[op.state] || op.state;
    const cancel = op.done ? "" : el("button", { type: "button", class: "cancel", onclick: () => cancelOperation(op.name) },
                                     "Cancel");
    return el("tr", { class: `operation ${state}`, "data-operation": op.name },
      el("td", {}, el("code", {}, op.name)), el("td", {}, op.kind), el("td", {}, op.task || "-"),
      el("td", { class: "state" }, state),
      el("td", {}, bar, " ", el("span", { class: "muted" }, total ? `${done}/${total} ` : "", what || "")),
      el("td", {}, cancel));
  });
  if (rows.length === 0) rows.push(el("tr", {}, el("td", { colspan: 6, class: "muted" }, "no operations yet")));
  fill($("operations").tBodies[0], rows);
}

async function cancelOperation(name) {
  try {
    await api("POST", `/v1/operations/${encodeURIComponent(name)}:cancel`, {});
  } catch (err) {
    notice(explain(err));
  }
  loadOperations();
}

async function fitHeads() {
  if (!state.selected) return;
  try {
    await api("POST", `/v1/tasks/${encodeURIComponent(state.selected)}:fitHeads`, {});
    notice("");
  } catch (err) {
    notice(explain(err));
  }
  loadOperations();
}

function start() {
  $("api-key").value = state.key;
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("api-key").value.trim();
    if (!/^[\x21-\x7e]*$/.test(key)) {
      notice("API key: only printable ASCII characters can be sent in a header");
      return;
    }
    state.key = key;
    sessionStorage.setItem("raee-api-key", state.key);
    loadTasks();
    loadServerInfo();
    loadOperations();
    if (state.selected) refreshTask();
  });
  $("try-form").addEventListener("submit", classify);
  $("try-task").addEventListener("input", renderTryInputs);
  $("fit-heads").addEventListener("click", fitHeads);
  $("ingest-form").addEventListener("submit", ingest);
  serverState();
  setInterval(serverState, 5000);
  loadOperations();
  setInterval(loadOperations, 1000);
  loadTasks();
  loadServerInfo();
}

start();
