"use strict";
// The adaptserve console. Plain DOM and fetch, no framework and no third-party code: the
// page must work offline, and the server's CSP lets it talk to this origin only. Every
// call below is a public API call, so "Copy as curl / openai" can show exactly what ran.
// Text from the server (names, generations, errors) only ever lands in textContent.

const $ = (selector, root = document) => root.querySelector(selector);
const $$ = (selector, root = document) => [...root.querySelectorAll(selector)];

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  node.append(...children.flat().filter((child) => child !== null && child !== undefined));
  return node;
}

const formatBytes = (n) =>
  n >= 1 << 20 ? `${(n / (1 << 20)).toFixed(1)} MB` : n >= 1024 ? `${(n / 1024).toFixed(1)} kB` : `${n} B`;

// --- tokens: typed once, kept in sessionStorage (dies with the tab; never a cookie) ------

const TOKEN_KEYS = { admin: "adaptserve.adminToken", inference: "adaptserve.apiKey" };
const token = (kind) => sessionStorage.getItem(TOKEN_KEYS[kind]) || "";

function authHeaders(kind) {
  const secret = token(kind);
  return secret ? { Authorization: `Bearer ${secret}` } : {};
}

async function call(path, { method = "GET", json, form, auth = "inference" } = {}) {
  const headers = authHeaders(auth);
  let body = form;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  const response = await fetch(path, { method, headers, body });
  const data = await response.json().catch(() => null);
  return { ok: response.ok, status: response.status, data, error: data && data.error };
}

function setupTokens() {
  const admin = $("#admin-token");
  const key = $("#api-key");
  admin.value = token("admin");
  key.value = token("inference");
  const show = () => {
    const held = [token("admin") && "admin token", token("inference") && "API key"].filter(Boolean);
    $("#tokens-status").textContent = held.length ? `Using ${held.join(" and ")} for this tab.` : "";
  };
  $("#tokens").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEYS.admin, admin.value.trim());
    sessionStorage.setItem(TOKEN_KEYS.inference, key.value.trim());
    show();
    refreshAll();
  });
  $("#forget-tokens").addEventListener("click", () => {
    Object.values(TOKEN_KEYS).forEach((k) => sessionStorage.removeItem(k));
    admin.value = key.value = "";
    show();
    refreshAll();
  });
  show();
}

// --- tabs (WAI-ARIA tabs pattern: arrows move between tabs, one tab stop) -----------------

function selectTab(tab, focus = false) {
  for (const other of $$('[role="tab"]')) {
    const selected = other === tab;
    other.setAttribute("aria-selected", String(selected));
    other.tabIndex = selected ? 0 : -1;
    $(`#${other.getAttribute("aria-controls")}`).hidden = !selected;
  }
  if (focus) tab.focus();
  history.replaceState(null, "", `#${tab.id.replace("tab-", "")}`);
  if (tab.id === "tab-routes") loadRoutes();
}

function setupTabs() {
  const tabs = $$('[role="tab"]');
  tabs.forEach((tab, index) => {
    tab.addEventListener("click", () => selectTab(tab));
    tab.addEventListener("keydown", (event) => {
      const moves = { ArrowRight: index + 1, ArrowLeft: index - 1, Home: 0, End: tabs.length - 1 };
      if (!(event.key in moves)) return;
      event.preventDefault();
      selectTab(tabs[(moves[event.key] + tabs.length) % tabs.length], true);
    });
  });
  const wanted = $(`#tab-${location.hash.slice(1)}`);
  selectTab(wanted && wanted.getAttribute("role") === "tab" ? wanted : tabs[0]);
}

// --- adapters -------------------------------------------------------------------------------

const state = {
  base: null, // the base model's id, from /v1/models
  models: [], // adapter cards from /v1/models (public: name, task, version)
  entries: null, // from GET /v1/adapters when the admin token is accepted
  expanded: new Set(), // adapters whose version history is open
  tokensByAdapter: {}, // from /metrics
  lastRequests: [], // what the playground last sent, for "Copy as curl / openai"
  vision: false, // the base classifies images: the playground takes a dropped image
  image: null, // the File the playground classifies on a vision base
};

const adapterNames = (task) => state.models.filter((m) => m.task === task).map((m) => m.id);

async function loadModels() {
  const result = await call("/v1/models");
  if (!result.ok) {
    state.models = [];
    if (result.status === 401 || result.status === 403) return "this server needs an API key for inference: enter it above.";
    return result.error ? result.error.message : `HTTP ${result.status}`;
  }
  const cards = result.data.data;
  const baseCard = cards.find((card) => card.parent === null) || {};
  state.base = baseCard.id || null;
  state.vision = baseCard.task === "image-classify";
  state.models = cards.filter((card) => card.parent !== null);
  $("#base-name").textContent = state.base ? `· ${state.base}` : "";
  return null;
}

async function loadAdapters() {
  const note = $("#adapters-note");
  const modelsProblem = await loadModels();
  let entries = null;
  let rejected = [];
  let message = "Enter the admin token to see tiers and version history, and to upload. A server started "
    + "without one made its own: it is in the .admin-token file in the server's adapters folder.";
  if (token("admin")) {
    const result = await call("/v1/adapters", { auth: "admin" });
    if (result.ok) {
      ({ adapters: entries, rejected } = result.data);
      message = "";
    } else if (result.status === 404) {
      message = "Adapter management is not served on this port (the server runs it on its admin port).";
    } else {
      message = `The admin token was refused: ${result.error ? result.error.message : result.status}.`;
    }
  }
  if (modelsProblem) message = `${message} Models: ${modelsProblem}`.trim();
  // State changes only after the last await, so overlapping refreshes each render a whole answer.
  state.entries = entries;
  note.textContent = message;
  note.hidden = !message;
  renderRejected(rejected);
  renderAdapters();
  applyBaseKind();
}

function adapterRows() {
  if (state.entries) {
    return state.entries.map((entry) => {
      const current = entry.versions.find((v) => v.version === entry.current) || entry.versions[0];
      return { entry, name: entry.name, task: current.task, current: entry.current, labels: current.labels };
    });
  }
  return state.models.map((m) => ({ entry: null, name: m.id, task: m.task, current: m.version, labels: null }));
}

function renderAdapters() {
  const body = $("#adapters-table tbody");
  body.replaceChildren();
  const rows = adapterRows();
  if (!rows.length) {
    body.append(el("tr", {}, el("td", { colspan: 11, class: "muted", text: "No adapters yet." })));
  }
  for (const row of rows) {
    const entry = row.entry;
    const dash = "–";
    body.append(
      el("tr", { "data-adapter": row.name },
        el("th", { scope: "row", text: row.name }),
        el("td", { text: row.task }),
        el("td", {}, el("code", { text: row.current || dash })),
        el("td", { text: entry ? String(entry.versions.length) : dash }),
        el("td", {}, entry ? el("span", { class: `tier tier-${entry.status}`, text: entry.status }) : dash),
        el("td", { text: entry ? (entry.pinned ? "yes" : "no") : dash }),
        el("td", { text: entry ? formatBytes(entry.size_bytes) : dash }),
        el("td", { text: row.labels ? row.labels.join(", ") : dash }),
        el("td", { text: entry ? String(entry.requests) : dash }),
        el("td", { "data-tokens-for": row.name, text: String(state.tokensByAdapter[row.name] ?? 0) }),
        el("td", { class: "actions" }, entry ? entryActions(entry) : null),
      ),
    );
    if (entry && state.expanded.has(entry.name)) body.append(historyRow(entry));
  }
}

function entryActions(entry) {
  const open = state.expanded.has(entry.name);
  return [
    el("button", {
      type: "button", "aria-expanded": String(open), "aria-controls": `history-${entry.name}`,
      "aria-label": `Version history of ${entry.name}`, text: "History",
      onclick: () => {
        if (open) state.expanded.delete(entry.name);
        else state.expanded.add(entry.name);
        renderAdapters();
        $(`[aria-controls="history-${CSS.escape(entry.name)}"]`).focus();
      },
    }),
    el("button", {
      type: "button", "aria-label": `${entry.pinned ? "Unpin" : "Pin"} ${entry.name}`,
      text: entry.pinned ? "Unpin" : "Pin",
      onclick: () => manage(`/v1/adapters/${encodeURIComponent(entry.name)}/${entry.pinned ? "unpin" : "pin"}`, "POST"),
    }),
    el("button", {
      type: "button", class: "danger", "aria-label": `Delete ${entry.name} (every version)`, text: "Delete",
      onclick: () => {
        if (confirm(`Delete ${entry.name} and all ${entry.versions.length} of its versions?`)) {
          manage(`/v1/adapters/${encodeURIComponent(entry.name)}`, "DELETE");
        }
      },
    }),
  ];
}

function historyRow(entry) {
  const rows = entry.versions.map((v) => {
    const isCurrent = v.version === entry.current;
    const ref = `${entry.name}@${v.version}`;
    return el("tr", { "data-version": v.version },
      el("td", {}, el("code", { text: v.version }), isCurrent ? el("span", { class: "badge", text: "current" }) : null),
      el("td", { text: v.created_at ? new Date(v.created_at * 1000).toLocaleString() : "–" }),
      el("td", {}, el("code", { title: v.sha256, text: v.sha256.slice(0, 12) })),
      el("td", { text: `r=${v.rank}` }),
      el("td", { text: v.status }),
      el("td", { text: `${v.requests} requests` }),
      el("td", { class: "actions" },
        isCurrent ? null : el("button", {
          type: "button", "aria-label": `Make ${ref} current`, text: "Make current",
          onclick: () => {
            if (confirm(`Serve ${ref} for new requests of ${entry.name}?`)) {
              manage(`/v1/adapters/${encodeURIComponent(entry.name)}/rollback?version=${encodeURIComponent(v.version)}`, "POST");
            }
          },
        }),
        el("button", {
          type: "button", class: "danger", "aria-label": `Delete ${ref}`, text: "Delete",
          onclick: () => {
            if (confirm(`Delete version ${ref}?`)) manage(`/v1/adapters/${encodeURIComponent(ref)}`, "DELETE");
          },
        }),
      ),
    );
  });
  const warnings = [...new Set(entry.versions.flatMap((v) => v.warnings || []))];
  return el("tr", { class: "history", id: `history-${entry.name}` },
    el("td", { colspan: 11 },
      el("table", { "aria-label": `Versions of ${entry.name}` }, el("tbody", {}, rows)),
      warnings.length ? el("ul", { class: "warnings" }, warnings.map((w) => el("li", { text: w }))) : null,
    ),
  );
}

async function manage(path, method) {
  const result = await call(path, { method, auth: "admin" });
  const note = $("#adapters-note");
  await loadAdapters();
  if (!result.ok) {
    note.textContent = result.error ? result.error.message : `HTTP ${result.status}`;
    note.hidden = false;
  }
}

function renderRejected(rejected) {
  const box = $("#rejected");
  box.replaceChildren();
  if (!rejected.length) return;
  box.append(el("h2", { text: "Folders in the store that were refused" }));
  for (const item of rejected) {
    box.append(el("section", { class: "rejected", "aria-label": `${item.name} refused` },
      el("h3", { text: item.version ? `${item.name}@${item.version}` : item.name }),
      problemList(item.problems)));
  }
}

// A validation problem reads "subject: message" when it concerns one file, key or module.
function problemList(problems, attrs = {}) {
  return el("ul", { class: "problems", ...attrs }, problems.map((problem) => {
    const match = /^(\S+): (.+)$/.exec(problem);
    const item = el("li", { "data-problem": problem });
    item.append(...(match ? [el("code", { text: match[1] }), ` ${match[2]}`] : [problem]));
    return item;
  }));
}

// --- upload: drag and drop (a folder, its files, or an archive) or the file input -----------

// The files of a PEFT folder the server accepts; anything else in a folder is left behind.
const ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "manifest.json", "config.json"];
const ARCHIVE = /\.(tar\.gz|tgz|zip)$/i;
let chosen = { files: [], skipped: [] };

const entryFile = (entry) => new Promise((resolve, reject) => entry.file(resolve, reject));

async function folderFiles(directory) {
  const reader = directory.createReader();
  const files = [];
  // readEntries returns the listing in batches; an empty batch ends it.
  for (let batch = await new Promise((ok, no) => reader.readEntries(ok, no)); batch.length;
    batch = await new Promise((ok, no) => reader.readEntries(ok, no))) {
    for (const entry of batch) if (entry.isFile) files.push(await entryFile(entry));
  }
  return files;
}

async function dropped(dataTransfer) {
  const entries = [...dataTransfer.items].map((item) => item.webkitGetAsEntry && item.webkitGetAsEntry());
  const folder = entries.find((entry) => entry && entry.isDirectory);
  if (!folder) return { files: [...dataTransfer.files], folder: null };
  return { files: await folderFiles(folder), folder: folder.name };
}

function choose(files, folder) {
  const fromFolder = folder !== null;
  chosen = {
    files: fromFolder ? files.filter((f) => ADAPTER_FILES.includes(f.name)) : files,
    skipped: fromFolder ? files.filter((f) => !ADAPTER_FILES.includes(f.name)).map((f) => f.name) : [],
  };
  const name = $("#upload-name");
  const archive = files.find((f) => ARCHIVE.test(f.name));
  if (!name.value) name.value = folder || (archive ? archive.name.replace(ARCHIVE, "") : "");
  const list = $("#upload-files-list");
  list.replaceChildren(...chosen.files.map((f) => el("li", { text: `${f.name} (${formatBytes(f.size)})` })));
  if (chosen.skipped.length) list.append(el("li", { class: "muted", text: `left out: ${chosen.skipped.join(", ")}` }));
  clearUploadErrors();
}

function clearUploadErrors() {
  for (const id of ["upload-name", "upload-files"]) $(`#${id}`).removeAttribute("aria-invalid");
  $("#upload-name-error").hidden = true;
  $("#upload-files-error").hidden = true;
}

function showUploadProblems(problems) {
  // Problems about the name go beside the name field; the rest concern the files.
  const aboutName = (p) => /^(name |form field `name`)/.test(p);
  const nameProblems = problems.filter(aboutName);
  const fileProblems = problems.filter((p) => !aboutName(p));
  if (nameProblems.length) {
    $("#upload-name").setAttribute("aria-invalid", "true");
    const box = $("#upload-name-error");
    box.textContent = nameProblems.join("; ");
    box.hidden = false;
  }
  if (fileProblems.length) {
    $("#upload-files").setAttribute("aria-invalid", "true");
    const box = $("#upload-files-error");
    box.replaceWith(problemList(fileProblems, { id: "upload-files-error", class: "problems field-error" }));
  }
}

async function upload(event) {
  event.preventDefault();
  clearUploadErrors();
  const status = $("#upload-status");
  const form = new FormData();
  form.append("name", $("#upload-name").value.trim());
  // The part's file name is what the server keys on (it never trusts it as a path).
  for (const file of chosen.files) form.append("file", file, file.name);
  status.textContent = "Uploading…";
  const result = await call("/v1/adapters", { method: "POST", form, auth: "admin" });
  if (result.ok) {
    const d = result.data;
    status.textContent = result.status === 201
      ? `Uploaded ${d.name}@${d.version} (${d.task}, r=${d.rank}, ${formatBytes(d.size_bytes)}).`
      : `${d.name}@${d.version} holds these exact bytes already; nothing changed.`;
    chosen = { files: [], skipped: [] };
    $("#upload").reset();
    $("#upload-files-list").replaceChildren();
    await loadAdapters();
    return;
  }
  const error = result.error || { message: `HTTP ${result.status}` };
  status.textContent = `Refused (${result.status}): ${error.message}`;
  if (Array.isArray(error.details)) {
    showUploadProblems(error.details.map((p) => (typeof p === "string" ? p : `${p.field}: ${p.message}`)));
  } else if (result.status === 413) {
    showUploadProblems([error.message]);
  }
}

function setupUpload() {
  const zone = $("#dropzone");
  const input = $("#upload-files");
  input.addEventListener("change", () => choose([...input.files], null));
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", async (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    const { files, folder } = await dropped(event.dataTransfer);
    choose(files, folder);
  });
  $("#upload").addEventListener("submit", upload);
}

// --- playground ----------------------------------------------------------------------------

const mode = () => $('input[name="mode"]:checked').value;

function renderPickers() {
  const names = adapterNames(mode());
  $$("#column-pickers select").forEach((select, index) => {
    const previous = select.value;
    select.replaceChildren(el("option", { value: "", text: "(none)" }), ...names.map((n) => el("option", { value: n, text: n })));
    // Keep the user's choice; otherwise start the first picker on the first adapter.
    select.value = names.includes(previous) ? previous : index === 0 && names.length ? names[0] : "";
  });
}

// A vision base classifies images only: the form becomes an image drop with classify mode.
// Its own head (mobilenet-v2: ImageNet) answers the base column.
function applyBaseKind() {
  if (state.vision) $('input[name="mode"][value="classify"]').checked = true;
  $("#mode-generate-label").hidden = state.vision;
  $("#prompt-field").hidden = state.vision;
  $("#image-field").hidden = !state.vision;
  applyMode();
}

function applyMode() {
  const classify = mode() === "classify";
  for (const id of ["#as-chat-label", "#sampling"]) $(id).hidden = classify;
  $("#use-base").closest("label").hidden = classify && !state.vision;
  $('label[for="prompt"]').textContent = classify ? "Text to classify" : "Prompt";
  renderPickers();
}

function chooseImage(file) {
  state.image = file || null;
  const preview = $("#image-preview");
  $("#image-file").removeAttribute("aria-invalid");
  $("#image-file-error").hidden = true;
  if (!file) {
    preview.hidden = true;
    return;
  }
  // A data: URL, which the page's CSP allows for images (blob: it does not).
  const reader = new FileReader();
  reader.addEventListener("load", () => {
    preview.src = reader.result;
    preview.hidden = false;
  });
  reader.readAsDataURL(file);
}

function setupImageDrop() {
  const zone = $("#image-drop");
  $("#image-file").addEventListener("change", (event) => chooseImage(event.target.files[0]));
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    chooseImage(event.dataTransfer.files[0]);
  });
}

function setupPlayground() {
  $$('input[name="mode"]').forEach((radio) => radio.addEventListener("change", applyMode));
  setupImageDrop();
  $("#play").addEventListener("submit", (event) => {
    event.preventDefault();
    run();
  });
  $("#prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      run();
    }
  });
  $("#show-request").addEventListener("click", toggleRequestView);
}

const FIELD_INPUTS = {
  prompt: "prompt", messages: "prompt", inputs: "prompt", images: "image-file", max_new_tokens: "max-new-tokens",
  temperature: "temperature",
};

function clearFieldErrors() {
  for (const id of new Set(Object.values(FIELD_INPUTS))) {
    $(`#${id}`).removeAttribute("aria-invalid");
    $(`#${id}-error`).hidden = true;
  }
}

// Marks the inputs an error names ("body.temperature", "max_new_tokens", "messages.0.content");
// returns false when it names none of them.
function showFieldErrors(error) {
  const problems = Array.isArray(error.details) && error.details.length && typeof error.details[0] === "object"
    ? error.details : [{ field: error.param, message: error.message }];
  let shown = false;
  for (const { field, message } of problems) {
    const key = String(field || "").split(".").find((part) => part in FIELD_INPUTS);
    if (!key) continue;
    const id = FIELD_INPUTS[key];
    $(`#${id}`).setAttribute("aria-invalid", "true");
    const box = $(`#${id}-error`);
    box.textContent = message;
    box.hidden = false;
    shown = true;
  }
  return shown;
}

function numberField(id) {
  const raw = $(`#${id}`).value.trim();
  return raw === "" ? undefined : Number(raw);
}

function columnsToRun() {
  const picks = [...new Set($$("#column-pickers select").map((s) => s.value).filter(Boolean))];
  if (mode() === "classify" && !state.vision) return picks;
  return $("#use-base").checked ? [null, ...picks] : picks;
}

function requestFor(adapter) {
  const text = $("#prompt").value;
  // An image goes as a multipart file; `body` holds the other form fields.
  if (state.vision) return { path: "/v1/classify", image: state.image, body: adapter ? { adapter } : {} };
  if (mode() === "classify") return { path: "/v1/classify", body: { inputs: text, adapter } };
  const body = $("#as-chat").checked ? { messages: [{ role: "user", content: text }] } : { prompt: text };
  if (adapter) body.adapter = adapter;
  body.max_new_tokens = numberField("max-new-tokens");
  body.temperature = numberField("temperature");
  body.stream = true;
  return { path: "/v1/generate", body: JSON.parse(JSON.stringify(body)) }; // drops undefined fields
}

async function run() {
  // One run at a time: a second would leave the first writing into columns no longer shown.
  if ($("#run").disabled) return;
  clearFieldErrors();
  const targets = columnsToRun();
  const status = $("#play-status");
  if (!targets.length) {
    status.textContent = "Pick the base or at least one adapter.";
    return;
  }
  if (state.vision && !state.image) {
    showFieldErrors({ param: "images", message: "Drop an image here or choose one first." });
    status.textContent = "No image yet.";
    return;
  }
  status.textContent = "Running…";
  state.lastRequests = targets.map((adapter) => ({ adapter, ...requestFor(adapter) }));
  $("#show-request").disabled = false;
  if (!$("#request-view").hidden) renderRequestView();
  const columns = state.lastRequests.map(makeColumn);
  $("#columns").replaceChildren(...columns.map((c) => c.node));
  $("#columns").dataset.state = "running";
  $("#columns").setAttribute("aria-busy", "true");
  const runOne = mode() === "classify" ? classifyColumn : streamColumn;
  $("#run").disabled = true;
  await Promise.all(state.lastRequests.map((request, i) => runOne(columns[i], request).catch((error) =>
    columnError(columns[i], { status: 0, error: { message: `request failed: ${error.message}` } }))));
  $("#run").disabled = false;
  $("#columns").dataset.state = "done";
  $("#columns").removeAttribute("aria-busy");
  status.textContent = "Done.";
}

function makeColumn(request) {
  const title = request.adapter || `${state.base || "base"} (base)`;
  const output = el("output", { class: "text", "aria-label": `Output of ${title}` });
  const stats = el("p", { class: "stats muted" });
  const node = el("section", { class: "column", "data-model": request.adapter || "__base__", "aria-label": title },
    el("h3", { text: title }), output, stats);
  return { node, output, stats };
}

function columnError(column, result) {
  const error = result.error || { message: `HTTP ${result.status}` };
  // Request-wide problems (a bad parameter) show at their field; the column says where to look.
  const atField = showFieldErrors(error);
  column.node.dataset.state = "error";
  column.output.classList.add("error");
  column.output.textContent = atField ? `${error.message} (see the form above)` : error.message;
}

async function streamColumn(column, request) {
  const started = performance.now();
  let first = null;
  let text = "";
  let final = null;
  const response = await fetch(request.path, {
    method: "POST", headers: { "Content-Type": "application/json", ...authHeaders("inference") },
    body: JSON.stringify(request.body),
  });
  if (!response.ok) {
    const data = await response.json().catch(() => null);
    columnError(column, { status: response.status, error: data && data.error });
    return;
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (let chunk = await reader.read(); !chunk.done; chunk = await reader.read()) {
    buffer += decoder.decode(chunk.value, { stream: true });
    // Server-sent events end with a blank line; each of ours is one `data:` line.
    for (let cut = buffer.indexOf("\n\n"); cut >= 0; cut = buffer.indexOf("\n\n")) {
      const payload = buffer.slice(0, cut).replace(/^data: /, "");
      buffer = buffer.slice(cut + 2);
      if (payload === "[DONE]") continue;
      const event = JSON.parse(payload);
      if (first === null) first = performance.now(); // the first token may decode to no text yet
      if (event.text) {
        text += event.text;
        column.output.textContent = text;
      }
      if (event.finish_reason) final = event;
    }
  }
  const ended = performance.now();
  if (!final) {
    columnError(column, { status: 0, error: { message: "the stream ended early" } });
    return;
  }
  if (final.error) {
    columnError(column, { status: 500, error: final.error });
    return;
  }
  const tokens = final.usage.completion_tokens;
  // Decode speed: tokens after the first over the time after the first (TTFT shown apart).
  const decodeS = first !== null ? (ended - first) / 1000 : 0;
  const rate = tokens > 1 && decodeS > 0 ? ((tokens - 1) / decodeS).toFixed(1) : "–";
  column.node.dataset.state = "done";
  column.stats.replaceChildren(
    el("span", { "data-stat": "ttft", text: `TTFT ${first !== null ? Math.round(first - started) : "–"} ms` }),
    el("span", { "data-stat": "tps", text: `${rate} tok/s` }),
    el("span", { "data-stat": "tokens", text: `${tokens} tokens` }),
    el("span", { "data-stat": "finish", text: final.finish_reason }),
  );
}

// Past this many labels (ImageNet's 1000) a column shows the highest scores only.
const MAX_BARS = 10;

function imageForm(request) {
  const form = new FormData();
  form.append("image", request.image, request.image.name);
  for (const [key, value] of Object.entries(request.body)) form.append(key, value);
  return form;
}

async function classifyColumn(column, request) {
  const started = performance.now();
  const result = request.image
    ? await call(request.path, { method: "POST", form: imageForm(request) })
    : await call(request.path, { method: "POST", json: request.body });
  if (!result.ok) {
    columnError(column, result);
    return;
  }
  let entries = Object.entries(result.data.results[0].scores);
  if (entries.length > MAX_BARS) entries = entries.sort((a, b) => b[1] - a[1]).slice(0, MAX_BARS);
  column.output.replaceChildren(el("ul", { class: "bars" }, entries.map(([label, score]) =>
    el("li", { "data-label": label, "data-score": String(score) },
      el("span", { class: "label", text: label }),
      el("span", { class: "bar", "aria-hidden": "true" }, barFill(score)),
      el("span", { class: "value", text: `${(score * 100).toFixed(1)} %` })))));
  column.node.dataset.state = "done";
  column.stats.replaceChildren(
    el("span", { text: `top: ${result.data.results[0].label}` }),
    el("span", { text: `${Math.round(performance.now() - started)} ms` }),
  );
}

function barFill(score) {
  const fill = el("span", { class: "fill" });
  fill.style.width = `${(score * 100).toFixed(1)}%`; // CSSOM, which the CSP allows (style attributes it does not)
  return fill;
}

// --- "Copy as curl / openai": the requests exactly as the page sent them ----------------------

const shellQuote = (s) => `'${s.replace(/'/g, `'\\''`)}'`;

function curlFor(request) {
  const auth = token("inference") ? ` \\\n  -H "Authorization: Bearer $ADAPTSERVE_API_KEY"` : "";
  if (request.image) {
    const fields = Object.entries(request.body).map(([key, value]) => ` -F ${shellQuote(`${key}=${value}`)}`).join("");
    return `curl ${location.origin}${request.path}${auth} \\\n  -F ${shellQuote(`image=@${request.image.name}`)}${fields}`;
  }
  const stream = request.body.stream ? " -N" : "";
  return `curl${stream} ${location.origin}${request.path} \\\n  -H 'Content-Type: application/json'${auth} \\\n  -d ${shellQuote(JSON.stringify(request.body))}`;
}

function openaiFor(request) {
  const b = request.body;
  const model = request.adapter || state.base || "base";
  const args = [`model=${JSON.stringify(model)}`];
  if (b.messages) args.push(`messages=${JSON.stringify(b.messages)}`);
  else args.push(`prompt=${JSON.stringify(b.prompt)}`);
  if (b.max_new_tokens !== undefined) args.push(`max_tokens=${b.max_new_tokens}`);
  if (b.temperature !== undefined) args.push(`temperature=${b.temperature}`);
  const endpoint = b.messages ? "chat.completions" : "completions";
  return [
    "import os",
    "from openai import OpenAI",
    "",
    `client = OpenAI(base_url="${location.origin}/v1", api_key=os.environ.get("ADAPTSERVE_API_KEY", "none"))`,
    `response = client.${endpoint}.create(${args.join(", ")})`,
    b.messages ? "print(response.choices[0].message.content)" : "print(response.choices[0].text)",
  ].join("\n");
}

function snippet(label, text) {
  const pre = el("pre", { tabindex: "0", "aria-label": label }, el("code", { text }));
  const copied = el("span", { class: "muted", role: "status" });
  const copy = async () => {
    try {
      await navigator.clipboard.writeText(text);
      copied.textContent = "Copied.";
    } catch {
      // No clipboard permission (e.g. plain http on another host): select it for Ctrl+C instead.
      getSelection().selectAllChildren(pre);
      copied.textContent = "Selected; press Ctrl+C.";
    }
  };
  return el("div", { class: "snippet" },
    el("div", { class: "row" }, el("strong", { text: label }),
      el("button", { type: "button", "aria-label": `Copy ${label}`, text: "Copy", onclick: copy }), copied),
    pre);
}

function renderRequestView() {
  const blocks = state.lastRequests.flatMap((request) => {
    const who = request.adapter || "base";
    const out = [snippet(`curl — ${who}`, curlFor(request))];
    if (request.path === "/v1/generate") out.push(snippet(`openai — ${who}`, openaiFor(request)));
    return out;
  });
  $("#request-snippets").replaceChildren(...blocks);
}

function toggleRequestView() {
  const view = $("#request-view");
  const button = $("#show-request");
  view.hidden = !view.hidden;
  button.setAttribute("aria-expanded", String(!view.hidden));
  if (!view.hidden) renderRequestView();
}

// --- routes --------------------------------------------------------------------------------

async function loadRoutes() {
  const note = $("#routes-note");
  const body = $("#routes-body");
  if (!token("admin")) {
    note.textContent = "Routes are part of the management API: enter the admin token to see them.";
    body.replaceChildren();
    return;
  }
  const result = await call("/v1/routes", { auth: "admin" });
  // Rendered in one replaceChildren after the await, so overlapping refreshes never stack up.
  if (!result.ok) {
    note.textContent = result.status === 404
      ? "Routing is not served on this port."
      : result.error ? result.error.message : `HTTP ${result.status}`;
    body.replaceChildren();
    return;
  }
  const routes = result.data.routes;
  note.textContent = routes.length ? "" : "No routes yet: PUT /v1/routes/{task} defines one.";
  body.replaceChildren(...routes.map((route) => {
    const total = route.targets.reduce((sum, t) => sum + t.weight, 0) || 1;
    return el("section", { class: "route", "aria-label": `Route ${route.task}` },
      el("h3", { text: route.task }),
      el("ul", { class: "bars" }, route.targets.map((t) => {
        const resolved = route.resolves_to[t.adapter];
        return el("li", { "data-target": t.adapter },
          el("code", { class: "label", text: t.adapter }),
          el("span", { class: "bar", "aria-hidden": "true" }, barFill(t.weight / total)),
          el("span", { class: "value", text: `${t.weight}` }),
          el("span", { class: resolved ? "muted" : "field-error", text: resolved ? `→ ${resolved}` : "not registered" }));
      })),
      route.fallback ? el("p", { class: "muted", text: `fallback: ${route.fallback}` }) : null);
  }));
}

// --- live panel: the server's own /metrics (Prometheus text), every 2 s -------------------------

const LIVE_EVERY_MS = 2000;
// The server counts a request's tokens when it finishes, so a 2 s difference is bursty;
// the rate is averaged over the samples of the last RATE_WINDOW_MS instead.
const RATE_WINDOW_MS = 10_000;
const tokenSamples = []; // [{at: ms, tokens: total generated}], oldest first

function parseMetrics(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    const match = /^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/.exec(line);
    if (!match) continue;
    const labels = {};
    for (const [, key, value] of (match[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[key] = value;
    samples.push({ name: match[1], labels, value: Number(match[3]) });
  }
  return samples;
}

const sum = (samples, name) => samples.filter((s) => s.name === name).reduce((total, s) => total + s.value, 0);

function setLive(key, text) {
  for (const node of $$(`[data-live="${key}"]`)) node.textContent = text;
}

async function refreshLive() {
  if (document.visibilityState !== "visible") return;
  const response = await fetch("/metrics").catch(() => null);
  if (!response || !response.ok) return;
  const samples = parseMetrics(await response.text());
  const now = performance.now();
  const tokens = sum(samples, "adaptserve_generated_tokens_total");
  setLive("running", String(sum(samples, "vllm:num_requests_running")));
  setLive("waiting", String(sum(samples, "vllm:num_requests_waiting")));
  const previous = tokenSamples[tokenSamples.length - 1];
  if (previous && tokens < previous.tokens) tokenSamples.length = 0; // a restarted server starts from 0
  tokenSamples.push({ at: now, tokens });
  while (tokenSamples.length > 2 && now - tokenSamples[1].at >= RATE_WINDOW_MS) tokenSamples.shift();
  const oldest = tokenSamples[0];
  setLive("tps", oldest.at < now ? ((tokens - oldest.tokens) / ((now - oldest.at) / 1000)).toFixed(1) : "–");
  setLive("kv", `${(sum(samples, "vllm:kv_cache_usage_perc") * 100).toFixed(1)} %`);
  for (const tier of ["device", "cpu", "stored"]) {
    const count = samples.find((s) => s.name === "adaptserve_adapters_resident" && s.labels.tier === tier);
    const bytes = samples.find((s) => s.name === "adaptserve_adapter_resident_bytes" && s.labels.tier === tier);
    if (count) setLive(`tier-${tier}`, `${count.value} · ${formatBytes(bytes ? bytes.value : 0)}`);
  }
  state.tokensByAdapter = {};
  for (const s of samples.filter((s) => s.name === "adaptserve_generated_tokens_total")) {
    state.tokensByAdapter[s.labels.adapter] = s.value;
  }
  for (const cell of $$("[data-tokens-for]")) {
    cell.textContent = String(state.tokensByAdapter[cell.dataset.tokensFor] ?? 0);
  }
}

// --- start ---------------------------------------------------------------------------------

function refreshAll() {
  loadAdapters();
  if (!$("#view-routes").hidden) loadRoutes();
}

document.addEventListener("DOMContentLoaded", () => {
  setupTokens();
  setupTabs();
  setupUpload();
  setupPlayground();
  $("#refresh-adapters").addEventListener("click", loadAdapters);
  refreshAll();
  refreshLive();
  setInterval(refreshLive, LIVE_EVERY_MS);
});
