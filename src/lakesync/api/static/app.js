// lakesync web page: start copies, follow them live (SSE, polling as a fallback), list recent jobs.
// Plain ES module, no build step. Everything from the server is written with textContent.

const TOKEN_KEY = "lakesync.token";
const FOLLOW_KEY = "lakesync.followJob";
const SAMPLES_PREFIX = "lakesync.samples.";
const MAX_SAMPLES = 400;
const POLL_MS = 1000;
const JOBS_REFRESH_MS = 5000;
const HEALTH_REFRESH_MS = 15000;
const HEALTH_RETRY_MS = 2000; // while the server is unreachable
const LOG_REFRESH_MS = 3000;
const LOG_END_TRIES = 10; // refreshes after a job ended, until its last lines are in
const STALE_SECONDS = 30; // a running job that reports nothing this long may have lost its run
const JOBS_PAGE_SIZE = 10;
const ERRORS_PAGE_SIZE = 50;
// /jobs/{jobId}: the job's own page (same script, job mode)
const JOB_PAGE = (() => {
  const m = /^\/jobs\/([A-Za-z0-9_-]{1,200})\/?$/.exec(location.pathname);
  return m ? m[1] : null;
})();
const DEFAULT_OPERATION = "copy-taskdetail";

const ACTIVE = new Set(["pending", "in_progress"]);
const STATUS_LABEL = {
  pending: "Pending",
  in_progress: "In progress",
  completed: "Completed",
  failed: "Failed",
  cancelled: "Cancelled",
};

const $ = (id) => document.getElementById(id);
const isActive = (s) => ACTIVE.has(s);
const isFinal = (s) => s === "completed" || s === "failed" || s === "cancelled";

const state = {
  operations: [],
  jobId: null,
  job: null,
  es: null,
  pollTimer: null,
  pollFailures: 0,
  followSeq: 0,
  endHandled: false,
  samples: [],
  announced: { status: null, decile: -1 },
  authRequired: false,
  jobs: [],
  timersStarted: false,
  jobsFilter: { operation: "", status: "" },
  jobsCursors: [null], // the `before` of each page seen so far; the last is the current page
  jobsNext: null,
  destination: null,
  errors: { jobId: null, next: null, shown: 0 },
  logTimer: null,
  healthTimer: null,
  health: "unknown",
};

/* ------------------------------------------------------------------ formatting */

const numberFmt = new Intl.NumberFormat(undefined);
const rateFmt = new Intl.NumberFormat(undefined, { maximumFractionDigits: 1 });
const compactFmt = new Intl.NumberFormat(undefined, { notation: "compact", maximumFractionDigits: 1 });
const timeFmt = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit" });
const dateTimeFmt = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" });
const relFmt = typeof Intl.RelativeTimeFormat === "function"
  ? new Intl.RelativeTimeFormat(undefined, { numeric: "auto" }) : null;

const fmt = (n) => numberFmt.format(Number(n) || 0);
const fmtRate = (n) => (n >= 100 ? numberFmt.format(Math.round(n)) : rateFmt.format(n));

function fmtDuration(seconds) {
  if (seconds == null || !Number.isFinite(seconds) || seconds < 0) return "—";
  if (seconds < 1) return seconds < 0.05 ? "0 s" : `${rateFmt.format(seconds)} s`;
  if (seconds < 60) return `${seconds < 10 ? rateFmt.format(seconds) : Math.round(seconds)} s`;
  const s = Math.round(seconds);
  if (s < 3600) return `${Math.floor(s / 60)} min ${String(s % 60).padStart(2, "0")} s`;
  return `${Math.floor(s / 3600)} h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")} min`;
}

function parseTime(iso) {
  if (!iso) return null;
  const t = Date.parse(iso);
  return Number.isNaN(t) ? null : t;
}

function jobSeconds(job, now = Date.now()) {
  const start = parseTime(job.startTime);
  if (start == null) return null;
  const end = parseTime(job.endTime) ?? (isActive(job.status) ? now : parseTime(job.updatedAt));
  return end == null ? null : Math.max(0, (end - start) / 1000);
}

function fmtRelative(iso) {
  const t = parseTime(iso);
  if (t == null) return "—";
  const diff = (t - Date.now()) / 1000;
  const abs = Math.abs(diff);
  if (!relFmt) return timeFmt.format(t);
  if (abs < 45) return "just now";
  if (abs < 3600) return relFmt.format(Math.round(diff / 60), "minute");
  if (abs < 86400) return relFmt.format(Math.round(diff / 3600), "hour");
  return relFmt.format(Math.round(diff / 86400), "day");
}

function shortId(id) {
  return id.length > 16 ? `${id.slice(0, 10)}…${id.slice(-4)}` : id;
}

function buttonLabel(operation) {
  if (operation === DEFAULT_OPERATION) return "Copy TaskDetail Data";
  return `Run ${operation}`;
}

/* ------------------------------------------------------------------ API access */

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function getToken() {
  try { return sessionStorage.getItem(TOKEN_KEY) || ""; } catch { return ""; }
}

function setToken(token) {
  try {
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
  } catch { /* storage disabled: the token lives only until reload */ }
  memoryToken = token;
}
let memoryToken = "";
const token = () => getToken() || memoryToken;

/* ------------------------------------------------------------------ JSON as written */

/** A number as the server wrote it ("7.0", "9007199254740993"): what JSON.parse loses. */
class JsonNumber {
  constructor(text) { this.text = text; }
  toString() { return this.text; }
}

/** JSON.parse that keeps numbers exact. JSON.parse makes every number a double, so a 64-bit
 *  integer past 2^53 (an Iceberg snapshot id) comes out rounded and 7.0 comes out 7. Here
 *  an integer a double cannot hold is kept as its digits (a string), every other number is
 *  a Number; with `exact`, every number is a JsonNumber holding its text (documents shown
 *  as written). Throws SyntaxError on what JSON.parse refuses. */
function parseJson(text, { exact = false } = {}) {
  const NUMBER = /-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?/y;
  const STRING = /"(?:[^"\\\u0000-\u001f]|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))*"/y;
  let i = 0;
  const fail = () => { throw new SyntaxError(`Unexpected JSON at position ${i}`); };
  const ws = () => { while (i < text.length && " \t\n\r".includes(text[i])) i++; };
  const token = (re) => {
    re.lastIndex = i;
    const m = re.exec(text);
    if (!m) fail();
    i = re.lastIndex;
    return m[0];
  };
  const number = (t) => {
    if (exact) return new JsonNumber(t);
    const n = Number(t);
    return /^-?\d+$/.test(t) && !Number.isSafeInteger(n) ? t : n;
  };
  const put = (o, k, v) => Object.defineProperty(o, k, { value: v, enumerable: true, writable: true, configurable: true });
  function value() {
    ws();
    const c = text[i];
    if (c === "{") {
      i++;
      const o = {};
      ws();
      if (text[i] === "}") { i++; return o; }
      for (;;) {
        ws();
        const k = JSON.parse(token(STRING));
        ws();
        if (text[i++] !== ":") fail();
        put(o, k, value());
        ws();
        const d = text[i++];
        if (d === "}") return o;
        if (d !== ",") fail();
      }
    }
    if (c === "[") {
      i++;
      const a = [];
      ws();
      if (text[i] === "]") { i++; return a; }
      for (;;) {
        a.push(value());
        ws();
        const d = text[i++];
        if (d === "]") return a;
        if (d !== ",") fail();
      }
    }
    if (c === '"') return JSON.parse(token(STRING));
    for (const [word, v] of [["true", true], ["false", false], ["null", null]]) {
      if (text.startsWith(word, i)) { i += word.length; return v; }
    }
    return number(token(NUMBER));
  }
  const v = value();
  ws();
  if (i !== text.length) fail();
  return v;
}

/** A value as JSON with its numbers as written (JsonNumber) and a space after each `,` and
 *  `:`, so a long document wraps between its fields, as `lakesync inspect` prints it. */
function showJson(v) {
  if (v instanceof JsonNumber) return v.text;
  if (Array.isArray(v)) return `[${v.map(showJson).join(", ")}]`;
  if (v && typeof v === "object") {
    return `{${Object.entries(v).map(([k, x]) => `${JSON.stringify(k)}: ${showJson(x)}`).join(", ")}}`;
  }
  return JSON.stringify(v);
}

function plainError(status, body) {
  if (body && typeof body.error === "string" && body.error.trim()) return body.error.trim();
  if (status === 404) return "Not found on the lakesync server.";
  if (status === 413) return "The request is too large.";
  if (status === 429) return "Too many requests; wait a moment and try again.";
  if (status >= 500) return `The lakesync server had a problem (HTTP ${status}). Try again in a moment; the server log has the details.`;
  return `The request failed (HTTP ${status}).`;
}

async function api(path, { method = "GET", body } = {}) {
  const headers = { Accept: "application/json" };
  const t = token();
  if (t) headers.Authorization = `Bearer ${t}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let res;
  try {
    res = await fetch(path, {
      method, headers, cache: "no-store",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch {
    setHealth("bad", "Server unreachable");
    throw new ApiError(0, "Could not reach the lakesync server. Check that it is running and that you are online, then try again.");
  }
  let data = null;
  const text = await res.text();
  if (text) {
    try { data = parseJson(text); } catch { data = null; }
  }
  if (res.status === 401) {
    requireAuth(Boolean(t));
    throw new ApiError(401, "This server needs an API token. Enter it in the form above.");
  }
  if (!res.ok) throw new ApiError(res.status, plainError(res.status, data));
  return { status: res.status, data, text };
}

/* ------------------------------------------------------------------ alerts, notices, live region */

function showAlert(text) {
  $("alert-text").textContent = text;
  $("alert").hidden = false;
}

function clearAlert() {
  $("alert").hidden = true;
  $("alert-text").textContent = "";
}

function showNotice(kind, headline, jobId) {
  const el = $("notice");
  el.replaceChildren();
  el.dataset.kind = kind;
  const strong = document.createElement("strong");
  strong.textContent = headline;
  el.append(strong);
  if (jobId) {
    el.append(document.createTextNode(" · Job "));
    const code = document.createElement("code");
    code.textContent = jobId;
    el.append(code);
  }
}

function hideNotice() {
  $("notice").replaceChildren();
}

function announce(text) {
  const live = $("live");
  live.textContent = "";
  // a fresh text node after a tick makes screen readers announce repeated messages too
  setTimeout(() => { live.textContent = text; }, 30);
}

/* ------------------------------------------------------------------ auth */

function requireAuth(hadToken) {
  const first = !state.authRequired;
  state.authRequired = true;
  stopFollowing();
  const card = $("auth-card");
  const help = $("auth-help");
  if (hadToken) {
    setToken("");
    help.textContent = "The saved API token was not accepted. Enter the current value of LAKESYNC_API_TOKEN. It is kept only in this browser tab.";
  }
  card.hidden = false;
  updateMetricsLink();
  if (!state.jobs.length) renderJobsMessage("Enter the API token above to see the jobs.");
  if (!state.job) $("job-empty").firstElementChild.textContent = "Enter the API token above to see the current job.";
  if (first || hadToken) $("token-input").focus();
}

async function saveToken(event) {
  event.preventDefault();
  const input = $("token-input");
  const value = input.value.trim();
  if (!value) {
    input.setAttribute("aria-invalid", "true");
    showAlert("Enter the API token (the value of LAKESYNC_API_TOKEN) before saving.");
    input.focus();
    return;
  }
  input.removeAttribute("aria-invalid");
  setToken(value);
  input.value = "";
  state.authRequired = false;
  $("auth-card").hidden = true;
  $("job-empty").firstElementChild.replaceChildren(EMPTY_JOB_TEXT.cloneNode(true));
  clearAlert();
  announce("Token saved.");
  await init();
}

/* ------------------------------------------------------------------ operations */

async function loadOperations() {
  let ops = [];
  try {
    const { data } = await api("/api/operations");
    ops = (data && Array.isArray(data.operations)) ? data.operations : [];
  } catch (e) {
    if (e.status !== 401) showAlert(`Could not load the operations: ${e.message}`);
    return;
  }
  state.operations = ops;
  const select = $("operation-select");
  const previous = select.value || DEFAULT_OPERATION;
  select.replaceChildren();
  for (const op of ops) {
    const opt = document.createElement("option");
    opt.value = op.name;
    opt.textContent = op.name;
    select.append(opt);
  }
  if (ops.some((o) => o.name === previous)) select.value = previous;
  $("operation-field").hidden = ops.length <= 1;
  const filter = $("filter-operation");
  const chosen = filter.value;
  filter.replaceChildren(new Option("All", ""), ...ops.map((o) => new Option(o.name, o.name)));
  filter.value = ops.some((o) => o.name === chosen) ? chosen : "";
  filter.closest(".field").hidden = ops.length <= 1;
  onOperationChange();
  renderOperations();
}

function operationOf(name) {
  return state.operations.find((o) => o.name === name) || null;
}

function selectedOperation() {
  const select = $("operation-select");
  return select.value || (state.operations[0] && state.operations[0].name) || DEFAULT_OPERATION;
}

function onOperationChange() {
  const name = selectedOperation();
  $("copy-button-label").textContent = buttonLabel(name);
  const op = operationOf(name);
  if (op && op.description) {
    const sentence = op.description.replace(/[.\s]+$/, "");
    $("operation-description").textContent = `${sentence}. The copy runs in the background; you can close this page and come back.`;
  }
  renderSchedule(op);
  $("opt-source").placeholder = op && op.source ? `Default: ${op.source}` : "The operation's default source";
  const roots = (op && op.allowedRoots) || [];
  $("opt-source-help").textContent = "Directory, file, glob or s3:// URI"
    + (roots.length ? `, under ${roots.join(" or ")}` : "") + ".";
  $("opt-source").title = op && op.source ? `The operation's source: ${op.source}` : "";
  updateCopyButton();
}

// The user picked another operation: the card shows that operation's latest job.
async function showOperationJob() {
  const name = selectedOperation();
  if (state.job && state.job.operation === name) return;
  let latest = null;
  try {
    const { data } = await api(`/api/jobs?limit=1&operation=${encodeURIComponent(name)}`);
    latest = data && data.jobs && data.jobs[0];
  } catch (e) {
    if (e.status !== 401) showAlert(`Could not load the jobs of ${name}: ${e.message}`);
    return;
  }
  if (selectedOperation() !== name) return; // the user moved on
  if (latest) {
    follow(latest.jobId, latest);
    return;
  }
  stopFollowing();
  forget();
  state.jobId = null;
  state.job = null;
  state.samples = [];
  closeErrors();
  $("job-body").hidden = true;
  $("job-empty").hidden = false;
  $("job-empty").firstElementChild.textContent = `No ${name} job has run yet. Press ${buttonLabel(name)} to start one.`;
  $("job-card").dataset.status = "none";
  $("job-title").textContent = "Current job";
  $("job-id").textContent = "—";
  $("job-page-link").hidden = true;
  setBadge($("status-badge"), null, "No job yet");
  highlightRow();
  updateCopyButton();
}

// The selected operation's schedule: how often it runs by itself, when next, how it last went.
function renderSchedule(op) {
  const el = $("operation-schedule");
  const s = op && op.schedule;
  el.hidden = !s;
  if (!s) return;
  const when = s.schedule ? `on the cron schedule “${s.schedule}” (${s.timezone})` : `every ${s.every}`;
  const next = parseTime(op.nextRun);
  let text = `Runs by itself ${when}; ` + (s.paused ? "paused." : `next run ${next == null ? "—" : zoned(op.nextRun, s.timezone, s.nextRunZone)}.`);
  const last = s.lastRun;
  if (last) {
    const result = last.outcome === "started" ? (last.result || "started") : last.outcome;
    text += ` Last run ${fmtRelative(last.slot)}: ${result.replace("_", " ")}.`;
  }
  el.textContent = text;
}

// Each operation: its source and collection, schedule, next run in the schedule's own time
// zone, its last job's result, and Pause/Unpause for a scheduled one.
function renderOperations() {
  const body = $("operations-body");
  body.replaceChildren(...state.operations.map((op) => {
    const tr = document.createElement("tr");
    // on a phone the cells stack: each says what it is (data-label, as the jobs table)
    const td = (text, title, label) => {
      const c = document.createElement("td");
      c.textContent = text;
      if (title) c.title = title;
      if (label) c.dataset.label = label;
      tr.append(c);
      return c;
    };
    td(op.name, op.description || op.name);
    // the collection stays whole; the source is cut from the left (its end names the data)
    const target = document.createElement("div");
    target.className = "c-target";
    td("", `${op.source} → ${op.collection}`, "Source → collection").append(target);
    const from = document.createElement("span");
    from.className = "c-target__source";
    from.textContent = sourceTail(op.source);
    const into = document.createElement("span");
    into.className = "c-target__collection";
    into.textContent = ` → ${op.collection}`;
    target.append(from, into);
    const s = op.schedule;
    const when = s ? (s.schedule ? `${s.schedule} (${s.timezone})` : `every ${s.every}`) : "none";
    td(when, when, "Schedule");
    const next = s ? (s.paused ? "paused" : zoned(op.nextRun, s.timezone, s.nextRunZone)) : "—";
    td(next, s && !s.paused ? `${next} (${s.timezone})` : "", "Next run");
    const last = op.lastJob;
    const cell = td("", "", "Last job");
    if (last) {
      const a = document.createElement("a");
      a.href = `/jobs/${encodeURIComponent(last.jobId)}`;
      a.textContent = last.status.replace("_", " ");
      a.title = `Job ${last.jobId}`;
      cell.append(a);
    } else {
      cell.textContent = "—";
    }
    const actions = td("");
    if (s) {
      const b = document.createElement("button");
      b.type = "button";
      b.className = "btn btn--ghost btn--sm";
      b.textContent = s.paused ? "Unpause" : "Pause";
      b.setAttribute("aria-label", `${b.textContent} the schedule of ${op.name}`);
      b.addEventListener("click", () => toggleSchedule(op.name, s.paused, b));
      actions.append(b);
    }
    return tr;
  }));
  $("operations-card").hidden = state.operations.length === 0;
}

// `Dec 7, 07:30 CET`: a time in the schedule's own zone, named as the CLI names it (the
// API's `name`: a browser writes `GMT+1` for Europe/Berlin, where the CLI says `CET`).
function zoned(iso, zone, name) {
  const at = parseTime(iso);
  if (at == null) return "—";
  try {
    const local = new Intl.DateTimeFormat(undefined, {
      month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", hourCycle: "h23",
      timeZone: zone, ...(name ? {} : { timeZoneName: "short" }),
    }).format(at);
    return name ? `${local} ${name}` : local;
  } catch {
    return dateTimeFmt.format(at);
  }
}

async function toggleSchedule(name, paused, button) {
  button.disabled = true;
  try {
    await api(`/api/operations/${encodeURIComponent(name)}/${paused ? "unpause" : "pause"}`, { method: "POST", body: {} });
    const { data } = await api("/api/operations");
    if (data && Array.isArray(data.operations)) state.operations = data.operations;
    renderOperations();
    renderSchedule(operationOf(selectedOperation()));
    announce(`Schedule of ${name} ${paused ? "resumed" : "paused"}`);
  } catch (e) {
    showAlert(e.message);
    button.disabled = false;
  }
}

// Next and last runs move on by themselves: re-read them without rebuilding the selector.
async function refreshSchedules() {
  if (state.operations.some((o) => o.schedule)) await refreshOperations();
}

// The operations' last job, watermark and schedule, re-read (a job started or ended).
async function refreshOperations() {
  try {
    const { data } = await api("/api/operations");
    if (data && Array.isArray(data.operations)) state.operations = data.operations;
  } catch (e) {
    return;
  }
  renderSchedule(state.operations.find((o) => o.name === selectedOperation()));
  renderOperations();
}

function updateCopyButton() {
  const btn = $("copy-button");
  if (btn.getAttribute("aria-busy") === "true") return;
  const job = state.job;
  const blocked = Boolean(job && isActive(job.status) && job.operation === selectedOperation());
  btn.disabled = blocked;
  btn.title = blocked ? "A copy is running; it must end before another one starts." : "";
}

/* ------------------------------------------------------------------ starting and cancelling */

function readOptions() {
  const options = {};
  const source = $("opt-source").value.trim();
  if (source) options.source = source;
  const mode = $("opt-mode").value;
  if (mode) options.mode = mode;
  const batchRaw = $("opt-batch").value.trim();
  if (batchRaw) {
    const n = Number(batchRaw);
    if (!Number.isInteger(n) || n < 1 || n > 100000) {
      throw new ApiError(400, "Batch size must be a whole number from 1 to 100,000 (or empty for the server default).");
    }
    options.batchSize = n;
  }
  return options;
}

async function startCopy(event) {
  event.preventDefault();
  clearAlert();
  const btn = $("copy-button");
  if (btn.disabled) return;
  let options;
  try {
    options = readOptions();
  } catch (e) {
    showAlert(e.message);
    $("opt-batch").focus();
    return;
  }
  btn.setAttribute("aria-busy", "true");
  btn.disabled = true;
  try {
    const { status, data } = await api("/api/jobs", {
      method: "POST",
      body: { operation: selectedOperation(), options },
    });
    if (status === 202) {
      showNotice("started", "Copy started as background process", data.jobId);
    } else {
      showNotice("existing", "A copy is already running", data.jobId);
    }
    // the notice is a status region and is announced; follow() skips announcing "queued"
    follow(data.jobId, data, { quietStart: true });
    refreshJobs();
  } catch (e) {
    if (e.status === 401) $("token-input").focus();
    else showAlert(e.message);
  } finally {
    btn.removeAttribute("aria-busy");
    updateCopyButton();
  }
}

async function showPreview() {
  clearAlert();
  const btn = $("preview-button");
  if (btn.disabled) return;
  let options;
  try {
    options = readOptions();
  } catch (e) {
    showAlert(e.message);
    return;
  }
  btn.setAttribute("aria-busy", "true");
  btn.disabled = true;
  try {
    const { data, text } = await api("/api/preview", {
      method: "POST",
      body: { operation: selectedOperation(), options },
    });
    renderPreview(data, parseJson(text, { exact: true }).documents || []);
  } catch (e) {
    if (e.status === 401) $("token-input").focus();
    else showAlert(e.message);
  } finally {
    btn.removeAttribute("aria-busy");
    btn.disabled = false;
  }
}

/** The preview; `documents` are its sample documents with their numbers as written. */
function renderPreview(p, documents) {
  let version = p.deltaVersion === null || p.deltaVersion === undefined ? "" : `, Delta version ${p.deltaVersion}`;
  // a snapshot id is a 64-bit integer: parseJson keeps it exact (digits) past 2^53
  if (p.icebergSnapshotId !== null && p.icebergSnapshotId !== undefined) version = `, Iceberg snapshot ${p.icebergSnapshotId}`;
  const rep = p.repeatedKeys || { keys: 0, records: 0, among: "" };
  $("preview-summary").textContent =
    `${p.source}: ${p.format}${version}, ${fmt(p.files)} file${p.files === 1 ? "" : "s"}, ` +
    `${fmt(p.rows)} rows (from ${p.rowsFrom}). Into ${p.collection} with _id = ${p.key}. ` +
    `Sample of ${fmt(p.sampleRows)}: ${fmt(p.sampleRejected)} rejected, ` +
    `${fmt(rep.keys)} key${rep.keys === 1 ? "" : "s"} repeated (${rep.among}). Nothing was written.`;
  const doubt = p.orderInDoubt || { files: 0, examples: [] };
  if (doubt.files) {
    $("preview-summary").textContent +=
      ` Lake order: ${fmt(doubt.files)} file${doubt.files === 1 ? "" : "s"} whose rows' order the table ` +
      `cannot tell (e.g. ${doubt.examples[0]}): a key repeated in them may be copied at an older version.`;
  }
  const body = $("preview-schema");
  body.replaceChildren();
  for (const c of p.schema || []) {
    const tr = document.createElement("tr");
    for (const text of [c.name + (c.key ? " (key)" : ""), c.arrowType, c.bsonType || "not written"]) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.append(td);
    }
    body.append(tr);
  }
  $("preview-documents").textContent = documents.map(showJson).join("\n") || "No valid record in the sample.";
  const list = $("preview-rejections");
  list.replaceChildren();
  for (const r of p.rejections || []) {
    const li = document.createElement("li");
    li.textContent = `${r.key || "(no key)"} (${fileTail(r.file)} row ${r.row}): ${r.reason}`;
    list.append(li);
  }
  $("preview-rejections-title").hidden = list.children.length === 0;
  $("preview").hidden = false;
  announce("Preview ready");
}

function askCancel() {
  $("cancel-confirm").hidden = false;
  $("cancel-button").setAttribute("aria-expanded", "true");
  $("cancel-yes").focus();
}

function closeCancel({ focus = false } = {}) {
  $("cancel-confirm").hidden = true;
  $("cancel-button").setAttribute("aria-expanded", "false");
  if (focus && !$("cancel-button").hidden) $("cancel-button").focus();
}

/** POST /api/jobs/{id}/{action} for the followed job, its button busy meanwhile; `done`
 *  gets the answer. The button is given back after a failure (and by `render` otherwise). */
async function jobAction(action, { idle, busy, done }) {
  const id = state.jobId;
  if (!id) return;
  const btn = $(`${action}-button`);
  btn.disabled = true;
  btn.textContent = busy;
  clearAlert();
  try {
    const { data } = await api(`/api/jobs/${encodeURIComponent(id)}/${action}`, { method: "POST" });
    done(id, data);
  } catch (e) {
    btn.disabled = false;
    btn.textContent = idle;
    if (e.status !== 401) showAlert(`Could not ${action} the job: ${e.message}`);
  }
}

function resumeJob() {
  return jobAction("resume", {
    idle: "Resume",
    busy: "Resuming…",
    done(id, data) {
      announce("Resume requested: the job continues from its last checkpoint.");
      state.job = null; // the job runs again: its ended status no longer holds
      state.logTries = 0;
      $("resume-button").disabled = false;
      $("resume-button").textContent = "Resume";
      follow(id, data);
      if (JOB_PAGE) loadLog();
      else refreshJobs();
    },
  });
}

function cancelJob() {
  closeCancel();
  return jobAction("cancel", {
    idle: "Cancel",
    busy: "Cancelling…",
    done(id, data) {
      announce("Cancellation requested. It takes effect after the current batch.");
      onStatus(data);
    },
  });
}

/* ------------------------------------------------------------------ following a job */

function remember(jobId) {
  if (JOB_PAGE) return;
  try { sessionStorage.setItem(FOLLOW_KEY, jobId); } catch { /* ignore */ }
  const hash = `#job=${encodeURIComponent(jobId)}`;
  if (location.hash !== hash) history.replaceState(null, "", hash);
}

function hashJob() {
  const m = /^#job=([A-Za-z0-9_-]{1,200})$/.exec(location.hash);
  return m ? m[1] : null;
}

function rememberedJob() {
  try { return hashJob() || sessionStorage.getItem(FOLLOW_KEY); } catch { return hashJob(); }
}

function forget() {
  if (JOB_PAGE) return;
  try { sessionStorage.removeItem(FOLLOW_KEY); } catch { /* ignore */ }
  if (location.hash) history.replaceState(null, "", location.pathname + location.search);
}

function stopFollowing() {
  if (state.es) { state.es.close(); state.es = null; }
  if (state.pollTimer) { clearTimeout(state.pollTimer); state.pollTimer = null; }
  state.followSeq += 1;
  setTransport("idle");
}

function follow(jobId, initial, { quietStart = false } = {}) {
  const sameJob = jobId === state.jobId;
  stopFollowing();
  const seq = state.followSeq;
  state.jobId = jobId;
  state.endHandled = false;
  if (!sameJob) {
    state.job = null;
    state.samples = loadSamples(jobId);
    state.announced = { status: null, decile: -1 };
    closeErrors();
    closeCancel();
  }
  state.pollFailures = 0;
  remember(jobId);
  if (quietStart && initial) state.announced.status = initial.status;
  if (initial && initial.jobId === jobId) onStatus(initial, { quiet: !sameJob && isFinal(initial.status) });
  else renderShell(jobId);
  if (state.job && isFinal(state.job.status)) return; // nothing more will change
  openStream(jobId, seq);
}

function openStream(jobId, seq) {
  if (typeof EventSource !== "function") { startPolling(jobId, seq); return; }
  let url = `/api/jobs/${encodeURIComponent(jobId)}/events`;
  const t = token();
  if (t) url += `?access_token=${encodeURIComponent(t)}`;
  const es = new EventSource(url);
  state.es = es;
  setTransport("connecting");
  es.onopen = () => { if (seq === state.followSeq) setTransport("live"); };
  es.addEventListener("status", (ev) => {
    if (seq !== state.followSeq) return;
    setTransport("live");
    let data;
    try { data = parseJson(ev.data); } catch { return; }
    onStatus(data);
  });
  es.addEventListener("end", () => {
    es.close();
    if (state.es === es) state.es = null;
    if (seq !== state.followSeq) return;
    setTransport("idle");
    // The stream ends with the job; make sure the final status was seen.
    if (!state.job || !isFinal(state.job.status)) startPolling(jobId, seq);
  });
  es.onerror = () => {
    es.close();
    if (state.es === es) state.es = null;
    if (seq !== state.followSeq) return;
    if (state.job && state.job.jobId === jobId && isFinal(state.job.status)) return;
    startPolling(jobId, seq); // EventSource failed (proxy, auth, network): poll instead
  };
}

function startPolling(jobId, seq) {
  if (state.pollTimer) clearTimeout(state.pollTimer);
  state.pollFailures = 0;
  setTransport("polling");
  const tick = async () => {
    state.pollTimer = null;
    if (seq !== state.followSeq) return;
    let delay = POLL_MS;
    try {
      const { data } = await api(`/api/jobs/${encodeURIComponent(jobId)}`);
      if (seq !== state.followSeq) return;
      const recovered = state.pollFailures > 0;
      state.pollFailures = 0;
      setTransport("polling");
      onStatus(data);
      if (isFinal(data.status)) { setTransport("idle"); return; }
      if (recovered && typeof EventSource === "function") {
        checkHealth();
        openStream(jobId, seq); // the server is back: the live stream again, not polling
        return;
      }
    } catch (e) {
      if (seq !== state.followSeq) return;
      if (e.status === 401) return; // init() follows again once the token is saved
      if (e.status === 404) { jobVanished(jobId, e.message); return; }
      state.pollFailures += 1;
      setTransport("offline");
      if (state.job) render(state.job); // no ETA while the server cannot be reached
      delay = Math.min(POLL_MS * 2 ** state.pollFailures, 10000);
    }
    state.pollTimer = setTimeout(tick, delay);
  };
  tick();
}

function jobVanished(jobId, message) {
  stopFollowing();
  forget();
  renderShell(jobId);
  const err = $("error");
  err.replaceChildren();
  const strong = document.createElement("strong");
  strong.textContent = "This job can no longer be found.";
  err.append(strong, document.createTextNode(message));
  err.hidden = false;
  $("message").textContent = "";
  setBadge($("status-badge"), null, "Unknown");
  state.job = null;
  updateCopyButton();
}

function onStatus(job, { quiet = false } = {}) {
  if (!job || job.jobId !== state.jobId) return;
  const prev = state.job;
  if (prev) {
    if (isFinal(prev.status) && !isFinal(job.status)) return; // a stale answer after the end
    if (prev.updatedAt && job.updatedAt && job.updatedAt < prev.updatedAt) return;
  }
  state.job = job;
  addSample(job);
  render(job);
  syncRow(job);
  // the operations' "last job" follows it: started, then ended
  if (!JOB_PAGE && (!prev || prev.status !== job.status)) refreshOperations();
  if (!quiet) announceProgress(job);
  else state.announced = { status: job.status, decile: 10 };
  if (isFinal(job.status) && !state.endHandled) {
    state.endHandled = true;
    stopFollowing();
    if (!quiet && !JOB_PAGE) refreshJobs();
    if (JOB_PAGE) loadLog();
  }
}

function announceProgress(job) {
  const a = state.announced;
  if (job.status !== a.status) {
    a.status = job.status;
    if (job.status === "pending") announce("Copy queued; waiting for a worker.");
    else if (job.status === "in_progress") announce("Copy in progress.");
    else if (job.status === "completed") announce(`Copy completed. ${job.message || ""}`);
    else if (job.status === "failed") announce("Copy failed. The error is shown below the progress.");
    else if (job.status === "cancelled") announce(`Copy cancelled. ${job.message || ""}`);
    return;
  }
  if (job.status === "in_progress") {
    const decile = Math.floor((job.percentComplete || 0) / 10);
    if (decile > a.decile && decile < 10) {
      a.decile = decile;
      if (decile > 0) {
        announce(`${decile * 10} percent: ${fmt(job.processedRecords)} of ${fmt(job.totalRecords)} records processed.`);
      }
    }
  }
}

/* ------------------------------------------------------------------ throughput samples */

function loadSamples(jobId) {
  try {
    const raw = sessionStorage.getItem(SAMPLES_PREFIX + jobId);
    const list = raw ? JSON.parse(raw) : [];
    return Array.isArray(list) ? list.filter((p) => Number.isFinite(p.t) && Number.isFinite(p.v)) : [];
  } catch { return []; }
}

function saveSamples() {
  if (!state.jobId) return;
  try {
    sessionStorage.setItem(SAMPLES_PREFIX + state.jobId, JSON.stringify(state.samples));
  } catch { /* full or disabled: the chart still works for this page view */ }
}

function addSample(job) {
  if (!(job.recordsPerSecond > 0)) return;
  // final statuses close the curve of a job that was watched live
  if (job.status !== "in_progress" && !(isFinal(job.status) && state.samples.length)) return;
  const start = parseTime(job.startTime);
  const at = parseTime(job.updatedAt) ?? Date.now();
  if (start == null) return;
  const t = Math.max(0, (at - start) / 1000);
  const last = state.samples[state.samples.length - 1];
  if (last && t <= last.t) return;
  state.samples.push({ t, v: job.recordsPerSecond });
  if (state.samples.length > MAX_SAMPLES) {
    // keep the whole life of the job at half the resolution
    state.samples = state.samples.filter((_, i) => i % 2 === 0 || i === state.samples.length - 1);
  }
  saveSamples();
}

/* ------------------------------------------------------------------ rendering the job */

function setBadge(el, status, text) {
  el.dataset.status = status || "none";
  el.textContent = text || STATUS_LABEL[status] || status || "Unknown";
}

function setTransport(mode) {
  const el = $("transport");
  el.dataset.mode = mode;
  const labels = { live: "Live", connecting: "Connecting…", polling: "Polling", offline: "Reconnecting…" };
  el.hidden = !labels[mode];
  el.textContent = labels[mode] || "";
  el.title = {
    live: "Updates stream from the server as each batch is written",
    connecting: "Opening the live update stream",
    polling: "Live stream unavailable; checking the status every second",
    offline: "The server cannot be reached; retrying",
  }[mode] || "";
}

function renderShell(jobId) {
  $("job-empty").hidden = true;
  $("job-body").hidden = false;
  $("job-id").textContent = jobId;
  $("job-title").textContent = "Current job";
  setBadge($("status-badge"), "pending", "Loading…");
  highlightRow();
}

// A job's first run plans before it copies; the contract fixes the status values, so it
// says so in its message (`Planning: listing the lake's files`), as the CLI's bar reads it.
function isPlanning(job) {
  return job.status === "in_progress" && !job.processedRecords
    && String(job.message || "").startsWith("Planning: ");
}

function setProgress(job) {
  const bar = $("progress");
  const fill = $("progress-fill");
  const pct = Math.max(0, Math.min(100, Number(job.percentComplete) || 0));
  const waiting = job.status === "pending" || (job.status === "in_progress" && !job.totalRecords);
  if (waiting || isPlanning(job)) {
    // before its first record a job plans (lists the files, finds repeated keys): it says
    // so in its message, shown here instead of a 0% that looks stuck
    bar.dataset.indeterminate = "true";
    bar.removeAttribute("aria-valuenow");
    bar.setAttribute("aria-valuetext", job.status === "pending" ? "Waiting for a worker"
      : (isPlanning(job) ? job.message : "Counting records"));
    $("progress-percent").textContent = isPlanning(job) ? "Planning…" : "—";
    fill.style.width = "0%";
    return;
  }
  bar.dataset.indeterminate = "false";
  if (isFinal(job.status) && !job.totalRecords && !job.processedRecords) {
    bar.setAttribute("aria-valuenow", "0");
    bar.setAttribute("aria-valuetext", "No records were read");
    $("progress-percent").textContent = "—";
    fill.style.width = "0%";
    return;
  }
  // never show 100% before the job really completed
  const shown = job.status === "completed" ? 100 : Math.min(Math.floor(pct), 99);
  bar.setAttribute("aria-valuenow", String(shown));
  bar.setAttribute("aria-valuetext", `${shown} percent, ${fmt(job.processedRecords)} of ${fmt(job.totalRecords)} records`);
  $("progress-percent").textContent = `${shown}%`;
  fill.style.width = `${job.status === "completed" ? 100 : pct}%`;
}

function render(job) {
  $("job-empty").hidden = true;
  $("job-body").hidden = false;
  const card = $("job-card");
  card.dataset.status = job.status;
  $("job-title").textContent = JOB_PAGE ? `Job of ${job.operation}`
    : (isActive(job.status) ? "Current job" : "Last job");
  $("job-id").textContent = job.jobId;
  const pageLink = $("job-page-link");
  pageLink.hidden = Boolean(JOB_PAGE);
  pageLink.href = `/jobs/${encodeURIComponent(job.jobId)}`;
  setBadge($("status-badge"), job.status);
  setProgress(job);

  const total = job.totalRecords || 0;
  $("progress-counts").textContent = isFinal(job.status) && !total && !job.processedRecords
    ? "No records read"
    : (isPlanning(job) ? (total ? `${fmt(total)} records` : "")
      : `${fmt(job.processedRecords)} / ${fmt(total)} records`);
  $("stat-inserted").textContent = fmt(job.insertedRecords);
  $("stat-updated").textContent = fmt(job.updatedRecords);
  $("stat-unchanged").textContent = fmt(job.unchangedRecords);
  $("stat-errors").textContent = fmt(job.errorRecords);
  $("stat-errors").disabled = !job.errorRecords;
  $("stat-duplicate-wrap").hidden = job.duplicateRecords == null;
  $("stat-duplicate").textContent = fmt(job.duplicateRecords);
  $("stat-deleted-wrap").hidden = !job.deletedRecords;
  $("stat-deleted").textContent = fmt(job.deletedRecords);
  const silent = silentSeconds(job);
  const offline = state.pollFailures > 0 || state.health === "bad";
  const moving = silent == null && !offline;
  card.dataset.quiet = String(!moving && isActive(job.status)); // stills the bar's animation
  // while it runs, the current rate; once it ended, its average over the whole job
  const secs = jobSeconds(job);
  const ended = isFinal(job.status);
  $("stat-rate").previousElementSibling.textContent = ended ? "Records/s (average)" : "Records/s";
  if (ended) {
    $("stat-rate").textContent = secs > 0 && job.processedRecords ? fmtRate(job.processedRecords / secs) : "—";
  } else {
    $("stat-rate").textContent = job.recordsPerSecond > 0 && moving ? fmtRate(job.recordsPerSecond) : "—";
  }
  // "Copy started as background process" is about this job: gone once it ended
  const notice = $("notice").querySelector("code");
  if (ended && notice && notice.textContent === job.jobId) hideNotice();
  let eta = "—";
  if (job.status === "completed") eta = "Done";
  else if (job.status === "in_progress" && job.etaSeconds != null && moving) eta = fmtDuration(job.etaSeconds);
  $("stat-eta").textContent = eta;

  let message = job.message || "";
  if (job.status === "in_progress" && job.cancelRequested) message = "Cancelling after the current batch…";
  else if (offline && isActive(job.status)) message = "The server cannot be reached; this shows the job as it was last seen.";
  else if (silent != null) {
    message = `No progress reported for ${fmtDuration(silent)}: the run may have stopped. `
      + "lakesync continues the job from its last checkpoint once the run's lease expires.";
  }
  if (job.status === "failed") message = "The copy failed and was stopped.";
  $("message").textContent = message;

  const err = $("error");
  if (job.status === "failed" || job.error) {
    err.replaceChildren();
    const strong = document.createElement("strong");
    strong.textContent = job.status === "failed" ? "What went wrong" : "Last error";
    err.append(strong, document.createTextNode(job.error || "The job failed without a reason; see the server log."));
    err.hidden = false;
  } else {
    err.hidden = true;
    err.replaceChildren();
  }

  const start = parseTime(job.startTime);
  $("meta-start").textContent = start == null ? "—" : dateTimeFmt.format(start);
  $("meta-start").title = job.startTime || "";
  renderDuration();
  $("meta-attempt").textContent = job.attempt ? `#${job.attempt}` : "—";
  $("meta-source").textContent = (job.options && job.options.source) || "Server default";
  $("meta-destination").textContent = destinationText(job);

  const cancel = $("cancel-button");
  cancel.hidden = !isActive(job.status);
  cancel.disabled = Boolean(job.cancelRequested);
  cancel.textContent = job.cancelRequested ? "Cancelling…" : "Cancel";
  if (cancel.hidden || cancel.disabled) closeCancel();
  $("resume-button").hidden = job.status !== "failed";
  if (state.errors.jobId === job.jobId && !$("errors-panel").hidden) {
    $("errors-summary").textContent = errorsSummary(job);
  }
  if (JOB_PAGE) renderDetails(job);

  renderChart();
  updateCopyButton();
  highlightRow();
}

// Seconds since a running job last reported (heartbeat or batch), when that is too long.
function silentSeconds(job, now = Date.now()) {
  if (job.status !== "in_progress") return null;
  const last = Math.max(parseTime(job.heartbeatAt) ?? 0, parseTime(job.updatedAt) ?? 0);
  if (!last) return null;
  const secs = (now - last) / 1000;
  return secs > STALE_SECONDS ? secs : null;
}

function destinationText(job) {
  const d = state.destination;
  const op = operationOf(job.operation);
  const parts = [];
  if (d) parts.push(d.mongodbUri, `database ${d.database}`);
  if (op) parts.push(`collection ${op.collection}`);
  return parts.length ? parts.join(" · ") : "—";
}

function renderDuration() {
  const job = state.job;
  if (!job) return;
  const secs = jobSeconds(job);
  $("meta-duration").textContent = secs == null ? "—" : fmtDuration(secs);
}

/* ------------------------------------------------------------------ throughput chart */

const SVG_NS = "http://www.w3.org/2000/svg";

function svgEl(name, attrs, text) {
  const el = document.createElementNS(SVG_NS, name);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (text != null) el.textContent = text;
  return el;
}

function niceMax(v) {
  if (v <= 0) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

function renderChart() {
  const svg = $("throughput-chart");
  const W = Math.max(240, Math.round(svg.clientWidth || 560));
  const H = Math.max(100, Math.round(svg.clientHeight || 130));
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.replaceChildren();
  const job = state.job;
  const pts = state.samples;
  const summary = $("chart-summary");

  if (!pts.length) {
    const secs = job && isFinal(job.status) ? jobSeconds(job) : null;
    if (secs && job.processedRecords) {
      // nothing was sampled while it ran (too short, or not watched): show its average
      const avg = job.processedRecords / secs;
      drawAverage(svg, W, H, avg);
      summary.textContent = `Average over the whole job: ${fmtRate(avg)} records per second `
        + `(${fmt(job.processedRecords)} record${job.processedRecords === 1 ? "" : "s"} in ${fmtDuration(secs)}).`;
      return;
    }
    svg.append(svgEl("text", { x: W / 2, y: H / 2 + 4, "text-anchor": "middle", class: "empty-label" },
      job && isFinal(job.status) ? "No throughput for this job" : "Waiting for data…"));
    summary.textContent = job && isFinal(job.status)
      ? "No records were processed, so there is no throughput to show."
      : "No throughput samples yet; they appear while a copy runs.";
    return;
  }

  const pad = { l: 46, r: 12, t: 12, b: 22 };
  const iw = W - pad.l - pad.r;
  const ih = H - pad.t - pad.b;
  const t0 = pts.length > 1 ? pts[0].t : 0;
  const tMax = Math.max(pts[pts.length - 1].t, t0 + 0.1);
  const peak = Math.max(...pts.map((p) => p.v));
  const yMax = niceMax(peak * 1.1);
  const x = (t) => pad.l + ((t - t0) / (tMax - t0)) * iw;
  const y = (v) => pad.t + ih - (v / yMax) * ih;

  for (const frac of [0, 0.5, 1]) {
    const yy = y(yMax * frac);
    svg.append(svgEl("line", { x1: pad.l, x2: W - pad.r, y1: yy, y2: yy, class: "grid-line" }));
    svg.append(svgEl("text", { x: pad.l - 6, y: yy + 4, "text-anchor": "end", class: "axis-label" },
      compactFmt.format(yMax * frac)));
  }
  svg.append(svgEl("text", { x: pad.l, y: H - 6, "text-anchor": "start", class: "axis-label" }, fmtDuration(t0)));
  svg.append(svgEl("text", { x: W - pad.r, y: H - 6, "text-anchor": "end", class: "axis-label" }, fmtDuration(tMax)));

  const coords = pts.map((p) => [x(p.t), y(p.v)]);
  if (coords.length === 1) coords.unshift([pad.l, coords[0][1]]);
  const line = coords.map(([cx, cy], i) => `${i ? "L" : "M"}${cx.toFixed(1)},${cy.toFixed(1)}`).join(" ");
  const base = (pad.t + ih).toFixed(1);
  const area = `${line} L${coords[coords.length - 1][0].toFixed(1)},${base} L${coords[0][0].toFixed(1)},${base} Z`;
  svg.append(svgEl("path", { d: area, class: "area" }));
  svg.append(svgEl("path", { d: line, class: "line" }));
  const [lx, ly] = coords[coords.length - 1];
  svg.append(svgEl("circle", { cx: lx, cy: ly, r: 3.5, class: "dot" }));

  const avg = pts.reduce((s, p) => s + p.v, 0) / pts.length;
  const latest = pts[pts.length - 1].v;
  summary.textContent = `${fmt(pts.length)} sample${pts.length === 1 ? "" : "s"} over ${fmtDuration(tMax)} of the job: `
    + `latest ${fmtRate(latest)}, peak ${fmtRate(peak)}, average ${fmtRate(avg)} records per second.`;
}

function drawAverage(svg, W, H, avg) {
  const pad = { l: 46, r: 12, t: 12, b: 22 };
  const ih = H - pad.t - pad.b;
  const yMax = niceMax(avg * 1.4);
  const y = (v) => pad.t + ih - (v / yMax) * ih;
  for (const frac of [0, 0.5, 1]) {
    const yy = y(yMax * frac);
    svg.append(svgEl("line", { x1: pad.l, x2: W - pad.r, y1: yy, y2: yy, class: "grid-line" }));
    svg.append(svgEl("text", { x: pad.l - 6, y: yy + 4, "text-anchor": "end", class: "axis-label" },
      compactFmt.format(yMax * frac)));
  }
  const ya = y(avg);
  svg.append(svgEl("line", { x1: pad.l, x2: W - pad.r, y1: ya, y2: ya, class: "avg-line" }));
  svg.append(svgEl("text", { x: W - pad.r, y: ya - 6, "text-anchor": "end", class: "axis-label" },
    `average ${fmtRate(avg)}/s`));
  svg.append(svgEl("text", { x: pad.l, y: H - 6, "text-anchor": "start", class: "axis-label" },
    "whole job (no live samples)"));
}

/* ------------------------------------------------------------------ recent jobs table */

let jobsLoading = null;
let jobsAgain = false; // a refresh was asked for while one was in flight

function refreshJobs({ autoFollow = false } = {}) {
  // one refresh at a time; one asked for meanwhile runs after it: the answer in flight may
  // predate what was asked for (a job's end), and would otherwise stand until the next tick
  if (jobsLoading) {
    jobsAgain = true;
    return jobsLoading;
  }
  jobsLoading = (async () => {
    try {
      const { data } = await api(jobsUrl());
      state.jobs = (data && data.jobs) || [];
      state.jobsNext = (data && data.next) || null;
      renderJobs(state.jobs);
      renderPager();
      const newest = state.jobs[0];
      const busy = state.job && isActive(state.job.status);
      const unfiltered = !state.jobsFilter.operation && !state.jobsFilter.status
        && state.jobsCursors.length === 1;
      if (autoFollow && unfiltered && newest && isActive(newest.status) && newest.jobId !== state.jobId && !busy) {
        follow(newest.jobId, newest); // a copy started elsewhere (CLI, another tab): show it
      }
      return state.jobs;
    } catch (e) {
      if (e.status !== 401 && !state.jobs.length) renderJobsMessage(`Could not load the jobs: ${e.message}`);
      return null;
    } finally {
      jobsLoading = null;
      if (jobsAgain) {
        jobsAgain = false;
        refreshJobs();
      }
    }
  })();
  return jobsLoading;
}

function jobsUrl() {
  const q = new URLSearchParams({ limit: String(JOBS_PAGE_SIZE) });
  if (state.jobsFilter.operation) q.set("operation", state.jobsFilter.operation);
  if (state.jobsFilter.status) q.set("status", state.jobsFilter.status);
  const before = state.jobsCursors[state.jobsCursors.length - 1];
  if (before) q.set("before", before);
  return `/api/jobs?${q}`;
}

function renderPager() {
  const page = state.jobsCursors.length;
  $("jobs-page").textContent = `Page ${page}`;
  $("jobs-newer").disabled = page <= 1;
  $("jobs-older").disabled = !state.jobsNext;
}

function onJobsFilter() {
  state.jobsFilter = { operation: $("filter-operation").value, status: $("filter-status").value };
  state.jobsCursors = [null];
  refreshJobs();
}

function olderJobs() {
  if (!state.jobsNext) return;
  state.jobsCursors.push(state.jobsNext);
  refreshJobs();
}

function newerJobs() {
  if (state.jobsCursors.length <= 1) return;
  state.jobsCursors.pop();
  refreshJobs();
}

function renderJobsMessage(text) {
  const tr = document.createElement("tr");
  tr.className = "jobs-table__empty";
  const td = document.createElement("td");
  td.colSpan = 8;
  td.textContent = text;
  tr.append(td);
  $("jobs-body").replaceChildren(tr);
}

function cell(cls, label) {
  const td = document.createElement("td");
  td.className = cls;
  if (label) td.dataset.label = label;
  return td;
}

function renderJobs(jobs) {
  if (!jobs.length) {
    const filtered = state.jobsFilter.operation || state.jobsFilter.status;
    renderJobsMessage(filtered ? "No jobs match these filters." : "No jobs yet. Jobs you start appear here.");
    return;
  }
  $("jobs-body").replaceChildren(...jobs.map(jobRow));
  highlightRow();
}

// One row of the table: its cells, filled by fillRow (which also updates it in place).
function jobRow(job) {
  const tr = document.createElement("tr");
  tr.dataset.jobId = job.jobId;

  const tdJob = cell("c-job");
  const link = document.createElement("a");
  link.className = "job-link";
  link.href = `/jobs/${encodeURIComponent(job.jobId)}`;
  link.title = `Open the page of job ${job.jobId}`;
  link.setAttribute("aria-label", `Job ${job.jobId}`);
  const code = document.createElement("code");
  code.textContent = shortId(job.jobId);
  link.append(code);
  tdJob.append(link);

  const tdOp = cell("c-op", "Operation");
  tdOp.textContent = job.operation;
  const tdSource = cell("c-source", "Source");
  const source = document.createElement("span");
  const full = (job.options && job.options.source) || "default";
  source.textContent = sourceTail(full); // its end names the data; the whole path in the title
  source.title = full;
  tdSource.append(source);

  const tdStatus = cell("c-status");
  const badge = document.createElement("span");
  badge.className = "badge";
  tdStatus.append(badge);

  const tdWhen = cell("c-when when", "Started");
  tdWhen.append(document.createElement("time"));

  const tdResult = cell("c-result result");
  tdResult.append(document.createElement("span"));

  tr.append(tdJob, tdOp, tdSource, tdStatus, tdWhen, cell("c-dur dur", "Duration"),
    cell("c-num num", "Records"), tdResult);
  fillRow(tr, job);
  return tr;
}

function fillRow(tr, job) {
  tr.dataset.status = job.status;
  setBadge(tr.querySelector(".badge"), job.status);

  const time = tr.querySelector("time");
  time.dateTime = job.startTime || "";
  const start = parseTime(job.startTime);
  time.title = start == null ? "" : dateTimeFmt.format(start);
  time.textContent = fmtRelative(job.startTime) + (job.trigger === "schedule" ? " · scheduled" : "");

  const secs = jobSeconds(job);
  tr.querySelector(".c-dur").textContent =
    secs == null ? "—" : fmtDuration(secs) + (isActive(job.status) ? " so far" : "");

  tr.querySelector(".c-num").textContent = job.totalRecords
    ? `${fmt(job.processedRecords)} / ${fmt(job.totalRecords)}`
    : (job.processedRecords ? fmt(job.processedRecords) : "—");

  const failed = job.status === "failed";
  const tdResult = tr.querySelector(".c-result");
  tdResult.classList.toggle("result--failed", failed);
  const text = tdResult.querySelector("span");
  text.textContent = failed ? (job.error || job.message || "Failed") : (job.message || "");
  text.title = text.textContent;
}

// The followed job's row follows its live status (at most once a second, and at its end).
function syncRow(job) {
  const i = state.jobs.findIndex((j) => j.jobId === job.jobId);
  if (i < 0) return;
  state.jobs[i] = job;
  const now = Date.now();
  if (!isFinal(job.status) && now - (state.rowSyncedAt || 0) < 1000) return;
  state.rowSyncedAt = now;
  const tr = $("jobs-body").querySelector(`tr[data-job-id="${CSS.escape(job.jobId)}"]`);
  if (tr) fillRow(tr, job);
}

function highlightRow() {
  for (const tr of $("jobs-body").querySelectorAll("tr[data-job-id]")) {
    if (tr.dataset.jobId === state.jobId) tr.setAttribute("aria-current", "true");
    else tr.removeAttribute("aria-current");
  }
}

/* ------------------------------------------------------------------ server health */

async function checkHealth() {
  const el = $("server-health");
  let st = "bad";
  let label = "Server unreachable";
  try {
    const res = await fetch("/readyz", { cache: "no-store" });
    if (res.ok) { st = "ok"; label = "Server ready"; }
    else {
      let why = "";
      try { why = (await res.json()).error || ""; } catch { /* ignore */ }
      st = "warn";
      label = "Server not ready";
      el.title = why;
    }
  } catch { /* unreachable */ }
  setHealth(st, label);
}

// The header's server state; checked again soon while the server cannot be reached, and
// a job followed before the outage is followed live again once it answers.
function setHealth(st, label) {
  const el = $("server-health");
  const text = el.querySelector(".health__text");
  const was = state.health;
  state.health = st;
  if (el.dataset.state !== st || text.textContent !== label) {
    el.dataset.state = st;
    text.textContent = label;
  }
  if (st === "ok") el.title = "The API answers and MongoDB is reachable";
  if (state.healthTimer) clearTimeout(state.healthTimer);
  state.healthTimer = setTimeout(() => {
    if (!document.hidden || st !== "ok") checkHealth();
    else setHealth(state.health, text.textContent);
  }, st === "ok" ? HEALTH_REFRESH_MS : HEALTH_RETRY_MS);
  if (was === "bad" && st === "ok" && !state.authRequired) {
    const job = state.job;
    if (state.jobId && (!job || isActive(job.status)) && !state.es) follow(state.jobId, job);
    if (!JOB_PAGE) refreshJobs();
  }
}

function updateMetricsLink() {
  // /metrics needs the token when one is set, and a link cannot send it
  $("footer-metrics").hidden = Boolean(state.authRequired || token());
}

/* ------------------------------------------------------------------ rejected records */

function errorsSummary(job) {
  const n = job.errorRecords || 0;
  return `${fmt(n)} record${n === 1 ? " was" : "s were"} rejected and not written. `
    + "Each row names the lake file and row, and why.";
}

function closeErrors() {
  $("errors-panel").hidden = true;
  $("stat-errors").setAttribute("aria-expanded", "false");
  $("errors-body").replaceChildren();
  state.errors = { jobId: null, next: null, shown: 0 };
}

function toggleErrors() {
  if (!$("errors-panel").hidden) { closeErrors(); return; }
  const job = state.job;
  if (!job || !job.errorRecords) return;
  state.errors = { jobId: job.jobId, next: null, shown: 0 };
  const base = `/api/jobs/${encodeURIComponent(job.jobId)}/errors`;
  $("errors-csv").href = `${base}?format=csv`;
  $("errors-ndjson").href = `${base}?format=ndjson`;
  $("errors-summary").textContent = errorsSummary(job);
  $("errors-body").replaceChildren();
  $("errors-panel").hidden = false;
  $("stat-errors").setAttribute("aria-expanded", "true");
  loadErrors();
}

async function loadErrors() {
  const { jobId, next } = state.errors;
  if (!jobId) return;
  const more = $("errors-more");
  more.disabled = true;
  const q = new URLSearchParams({ limit: String(ERRORS_PAGE_SIZE) });
  if (next) q.set("after", next);
  try {
    const { data } = await api(`/api/jobs/${encodeURIComponent(jobId)}/errors?${q}`);
    if (state.errors.jobId !== jobId) return;
    $("errors-body").append(...data.errors.map(errorRow));
    state.errors.next = data.next;
    state.errors.shown += data.errors.length;
    more.hidden = !data.next;
    if (!state.errors.shown) {
      const tr = document.createElement("tr");
      tr.className = "jobs-table__empty";
      const td = document.createElement("td");
      td.colSpan = 4;
      td.textContent = "No rejected records are kept for this job (they expire with it).";
      tr.append(td);
      $("errors-body").append(tr);
    }
  } catch (e) {
    if (e.status !== 401) showAlert(`Could not load the rejected records: ${e.message}`);
  } finally {
    more.disabled = false;
  }
}

function errorRow(rec) {
  const tr = document.createElement("tr");
  const cells = [
    ["c-key", "Key", rec.key == null ? "—" : String(rec.key)],
    ["c-file", "File", rec.file ? fileTail(rec.file) : "—", rec.file],
    ["c-row num", "Row", rec.row == null ? "—" : fmt(rec.row)],
    ["c-reason", "Reason", rec.reason || ""],
  ];
  for (const [cls, label, text, full] of cells) {
    const td = cell(cls, label);
    td.textContent = text;
    td.title = full || text;
    tr.append(td);
  }
  return tr;
}

// The end of a lake path (its last two parts): what tells files apart; the title has it all.
// `…/tasks/part-0.parquet`: a path shortened from the left at a `/`, never inside a name.
function sourceTail(path, keep = 2) {
  const scheme = /^[a-z][a-z0-9+.-]*:\/\//i.exec(path);
  const rest = scheme ? path.slice(scheme[0].length) : path;
  const parts = rest.split("/").filter(Boolean);
  return parts.length > keep ? `…/${parts.slice(-keep).join("/")}` : path;
}

function fileTail(path) {
  const parts = path.split("/");
  return parts.length > 2 ? `…/${parts.slice(-2).join("/")}` : path;
}

// With a token, a plain link cannot authenticate: fetch the file and save it.
async function download(event) {
  const t = token();
  if (!t) return; // the link downloads by itself
  event.preventDefault();
  const a = event.currentTarget;
  try {
    const res = await fetch(a.href, { headers: { Authorization: `Bearer ${t}` }, cache: "no-store" });
    if (!res.ok) throw new ApiError(res.status, plainError(res.status, null));
    const url = URL.createObjectURL(await res.blob());
    const save = document.createElement("a");
    save.href = url;
    save.download = (/filename="([^"]+)"/.exec(res.headers.get("Content-Disposition") || "") || [])[1] || "errors";
    document.body.append(save);
    save.click();
    save.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  } catch (e) {
    showAlert(`Could not download the rejected records: ${e.message}`);
  }
}

/* ------------------------------------------------------------------ the job page */

function detail(dl, name, value) {
  if (value == null || value === "") return;
  const div = document.createElement("div");
  const dt = document.createElement("dt");
  dt.textContent = name;
  const dd = document.createElement("dd");
  dd.textContent = String(value);
  div.append(dt, dd);
  dl.append(div);
}

function when(iso) {
  const t = parseTime(iso);
  return t == null ? null : `${dateTimeFmt.format(t)} (${iso})`;
}

function watermarkText(w) {
  if (!w) return null;
  return `${w.column} ${w.iso || w.value}`;
}

function renderDetails(job) {
  const dl = $("details");
  dl.replaceChildren();
  const o = job.options || {};
  const cp = job.checkpoint || {};
  detail(dl, "Job", job.jobId);
  detail(dl, "Operation", job.operation);
  detail(dl, "Status", STATUS_LABEL[job.status] || job.status);
  detail(dl, "Started by", job.trigger);
  detail(dl, "Source", o.source || "the operation's default");
  detail(dl, "Mode", o.mode || "the operation's default");
  detail(dl, "Batch size", o.batchSize);
  detail(dl, "Delta version", o.deltaVersion);
  detail(dl, "Changes since Delta version", o.sinceDeltaVersion);
  // 64-bit ids: parseJson keeps one past 2^53 as its exact digits
  detail(dl, "Iceberg snapshot", o.icebergSnapshotId);
  detail(dl, "Changes since Iceberg snapshot", o.sinceIcebergSnapshotId);
  detail(dl, "Watermark from", watermarkText(cp.since));
  detail(dl, "Watermark up to", watermarkText(cp.until));
  if (job.partitions) detail(dl, "Partitions", `${fmt(job.partitionsDone || 0)} of ${fmt(job.partitions)} done`);
  detail(dl, "Runs", job.attempt ? `${fmt(job.attempt)}${job.failures ? ` (${fmt(job.failures)} failed in a row)` : ""}` : "none yet");
  detail(dl, "Checkpoint", cp.batches ? `file ${fmt((cp.fileIndex || 0) + 1)}${cp.file ? ` (${cp.file})` : ""}, row ${fmt(cp.row || 0)}, ${fmt(cp.batches)} batches` : null);
  detail(dl, "Records", `${fmt(job.processedRecords)} of ${fmt(job.totalRecords)} processed: `
    + `${fmt(job.insertedRecords)} inserted, ${fmt(job.updatedRecords)} updated, `
    + `${fmt(job.unchangedRecords)} unchanged, `
    + (job.duplicateRecords != null ? `${fmt(job.duplicateRecords)} duplicate, ` : "")
    + `${fmt(job.errorRecords)} rejected`
    + (job.deletedRecords ? `, ${fmt(job.deletedRecords)} deleted` : ""));
  detail(dl, "Started", when(job.startTime));
  detail(dl, "Ended", when(job.endTime));
  detail(dl, "Last update", when(job.updatedAt));
  detail(dl, "Copied into", destinationText(job));
  const known = new Set(["source", "mode", "batchSize", "deltaVersion", "sinceDeltaVersion", "icebergSnapshotId", "sinceIcebergSnapshotId"]);
  const other = Object.entries(o).filter(([k]) => !known.has(k));
  if (other.length) detail(dl, "Other options", other.map(([k, v]) => `${k}=${JSON.stringify(v)}`).join(", "));
  detail(dl, "Error", job.error);
}

async function loadLog() {
  const id = state.jobId;
  if (!JOB_PAGE || !id) return;
  if (state.logTimer) { clearTimeout(state.logTimer); state.logTimer = null; }
  let lines = [];
  try {
    const { data } = await api(`/api/jobs/${encodeURIComponent(id)}/logs`);
    lines = data.lines || [];
    renderLog(lines);
  } catch (e) {
    if (e.status !== 401 && e.status !== 0) showAlert(`Could not load the job's log: ${e.message}`);
  }
  // While the job runs, and after it ended until its last lines arrived (a run's lines are
  // stored in the background, a moment after the status it wrote), up to LOG_END_TRIES.
  const job = state.job;
  const waiting = !job || isActive(job.status)
    || (!loggedEnd(lines, job) && (state.logTries = (state.logTries || 0) + 1) <= LOG_END_TRIES);
  if (waiting) {
    state.logTimer = setTimeout(() => { if (!document.hidden) loadLog(); else state.logTimer = null; }, LOG_REFRESH_MS);
  }
}

function loggedEnd(lines, job) {
  const ended = parseTime(job.endTime);
  if (ended == null) return true;
  return lines.some((line) => (parseTime(line.time) ?? 0) >= ended - 1000);
}

function renderLog(lines) {
  const ol = $("job-log");
  if (!lines.length) {
    const li = document.createElement("li");
    li.className = "job-log__empty muted";
    li.textContent = "No log lines yet.";
    ol.replaceChildren(li);
    return;
  }
  ol.replaceChildren(...lines.map((line) => {
    const li = document.createElement("li");
    li.dataset.level = line.level;
    const t = document.createElement("time");
    t.dateTime = line.time;
    const at = parseTime(line.time);
    t.textContent = at == null ? line.time : timeFmt.format(at);
    t.title = at == null ? "" : dateTimeFmt.format(at);
    const level = document.createElement("span");
    level.className = "job-log__level";
    level.textContent = line.level;
    const msg = document.createElement("span");
    msg.className = "job-log__msg";
    msg.textContent = line.cause ? `${line.message} (${line.cause})` : line.message;
    li.append(t, level, msg);
    return li;
  }));
}

async function loadDestination() {
  try {
    const { data } = await api("/api/destination");
    state.destination = data;
    if (state.job) render(state.job);
  } catch { /* shown as "—"; 401 is handled by api() */ }
}

/* ------------------------------------------------------------------ start-up */

async function init() {
  checkHealth();
  updateMetricsLink();
  if (JOB_PAGE) {
    await Promise.all([loadOperations(), loadDestination()]);
    if (state.authRequired) return;
    follow(JOB_PAGE);
    loadLog();
    startTimers();
    return;
  }
  const [, jobs] = await Promise.all([loadOperations(), refreshJobs(), loadDestination()]);
  if (state.authRequired) return;
  const newest = jobs && jobs[0];
  const remembered = rememberedJob();
  if (newest && isActive(newest.status) && newest.jobId !== remembered) {
    follow(newest.jobId, newest); // a copy is running (maybe started elsewhere): follow it
  } else if (remembered) {
    const known = jobs && jobs.find((j) => j.jobId === remembered);
    follow(remembered, known);
  } else if (newest) {
    follow(newest.jobId, newest); // show the last result
  }
  startTimers();
}

function startTimers() {
  if (state.timersStarted) return;
  state.timersStarted = true;
  setInterval(() => {
    if (!document.hidden && !state.authRequired && !JOB_PAGE) refreshJobs({ autoFollow: true });
  }, JOBS_REFRESH_MS);
  setInterval(() => { if (!document.hidden && !state.authRequired) refreshSchedules(); }, 15000);
  setInterval(() => {
    const job = state.job;
    if (!job || !isActive(job.status)) return;
    renderDuration();
    if (silentSeconds(job) != null) render(job); // say the run went quiet, drop the ETA
  }, 1000);
  if (typeof ResizeObserver === "function") {
    let last = 0;
    new ResizeObserver((entries) => {
      const w = Math.round(entries[0].contentRect.width);
      if (w !== last) { last = w; if (state.job) renderChart(); }
    }).observe($("throughput-chart"));
  }
}

let EMPTY_JOB_TEXT = null;

function wire() {
  const empty = $("job-empty").firstElementChild;
  EMPTY_JOB_TEXT = document.createDocumentFragment();
  for (const n of empty.childNodes) EMPTY_JOB_TEXT.append(n.cloneNode(true));
  $("start-form").addEventListener("submit", startCopy);
  $("preview-button").addEventListener("click", showPreview);
  $("preview-close").addEventListener("click", () => { $("preview").hidden = true; });
  $("cancel-button").addEventListener("click", askCancel);
  $("cancel-yes").addEventListener("click", cancelJob);
  $("cancel-no").addEventListener("click", () => closeCancel({ focus: true }));
  $("cancel-confirm").addEventListener("keydown", (e) => { if (e.key === "Escape") closeCancel({ focus: true }); });
  $("resume-button").addEventListener("click", resumeJob);
  $("stat-errors").addEventListener("click", toggleErrors);
  $("errors-more").addEventListener("click", loadErrors);
  $("errors-csv").addEventListener("click", download);
  $("errors-ndjson").addEventListener("click", download);
  $("filter-operation").addEventListener("change", onJobsFilter);
  $("filter-status").addEventListener("change", onJobsFilter);
  $("jobs-older").addEventListener("click", olderJobs);
  $("jobs-newer").addEventListener("click", newerJobs);
  $("log-refresh").addEventListener("click", loadLog);
  if (JOB_PAGE) {
    document.body.classList.add("page--job");
    document.title = `Job ${JOB_PAGE} · lakesync`;
    $("job-page-nav").hidden = false;
    $("details-card").hidden = false;
    $("log-card").hidden = false;
  }
  $("token-form").addEventListener("submit", saveToken);
  $("operation-select").addEventListener("change", () => { onOperationChange(); showOperationJob(); });
  $("alert-close").addEventListener("click", clearAlert);
  $("jobs-refresh").addEventListener("click", () => refreshJobs());
  if (!JOB_PAGE) window.addEventListener("hashchange", () => {
    const id = hashJob();
    if (id && id !== state.jobId && !state.authRequired) follow(id);
  });
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && !state.authRequired) refreshJobs({ autoFollow: true });
  });
}

wire();
init();
