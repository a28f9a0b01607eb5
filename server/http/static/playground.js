// The playground: one page, no build step, nothing fetched from anywhere but this server.
//
// The form is drawn from the server's own /openapi.json?endpoint_id=... (the pydantic schemas), so ranges and
// defaults are never copied here. Images go through the server's storage upload emulation, requests through its
// queue, and progress comes from the status stream read with fetch() (EventSource can't send the Authorization
// header a keyed server needs).

const $ = (selector) => document.querySelector(selector);
const state = { schema: null, components: {}, uploads: [], running: null, snippet: "curl" };
const MAX_IMAGES = 4;

// ---- API calls -------------------------------------------------------------------------------------------

function authHeaders() {
  const key = $("#api-key").value.trim();
  return key ? { Authorization: `Key ${key}` } : {};
}

async function api(method, url, body) {
  const headers = { ...authHeaders() };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(url, { method, headers, body: body === undefined ? undefined : toJson(body) });
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = { detail: text }; }
  return { status: response.status, ok: response.ok, data };
}

// JSON with seeds beyond 2^53 kept exact (they are BigInts here).
function toJson(value) {
  return JSON.stringify(value, (k, v) => (typeof v === "bigint" ? `__bigint__${v}` : v)).replace(/"__bigint__(\d+)"/g, "$1");
}

// ---- the form, from the schema ----------------------------------------------------------------------------

function resolve(schema) {
  if (schema && schema.$ref) {
    const { $ref, ...rest } = schema;
    return { ...resolve(state.components[$ref.split("/").pop()]), ...rest };
  }
  return schema;
}

function label(name, schema) {
  return schema.title || name.replace(/_/g, " ").replace(/^\w/, (c) => c.toUpperCase());
}

function rangeHint(schema) {
  const parts = [];
  if (schema.minimum !== undefined && schema.maximum !== undefined) parts.push(`${schema.minimum}–${fmt(schema.maximum)}`);
  if (schema.default !== undefined && schema.default !== null) parts.push(`default ${typeof schema.default === "object" ? JSON.stringify(schema.default) : schema.default}`);
  return parts.join(", ");
}

function fmt(n) { return n > 1e15 ? "2^64−1" : String(n); }

async function loadSchema(endpointId) {
  const { ok, data } = await api("GET", `/openapi.json?endpoint_id=${encodeURIComponent(endpointId)}`);
  if (!ok) throw new Error(`Could not read the API schema: ${data && data.detail}`);
  state.components = data.components.schemas;
  const post = data.paths[`/${endpointId}`].post;
  state.schema = resolve(post.requestBody.content["application/json"].schema);
  state.endpointId = endpointId;
  // an edit endpoint takes reference images; a text-to-image one (fal-ai/flux-2, ...) none: no drop zone
  $('[data-field="image_urls"]').hidden = !takesImages();
  renderFields();
}

function takesImages() {
  return "image_urls" in state.schema.properties;
}

function renderFields() {
  const { properties, required = [] } = state.schema;
  const order = state.schema["x-fal-order-properties"] || [];
  const names = [...order, ...Object.keys(properties).filter((n) => !order.includes(n))];
  const container = $("#fields");
  const previous = readValues(true);
  container.replaceChildren();
  for (const name of names) {
    if (name === "image_urls") continue; // the drop zone
    const schema = resolve(properties[name]);
    const field = document.createElement("div");
    field.className = "field";
    field.dataset.field = name;
    const hint = rangeHint(schema);
    field.innerHTML = `<span class="name"></span><div class="control"></div><span class="desc"></span><div class="error" data-error-for="${name}"></div>`;
    field.querySelector(".name").textContent = label(name, schema) + (required.includes(name) ? " *" : "");
    if (hint) field.querySelector(".name").insertAdjacentHTML("beforeend", `<span class="hint"></span>`);
    if (hint) field.querySelector(".hint").textContent = hint;
    field.querySelector(".desc").textContent = schema.description || "";
    field.querySelector(".control").append(control(name, schema));
    container.append(field);
  }
  for (const [name, value] of Object.entries(previous)) setValue(name, value);
  updateSnippet();
}

function input(attrs) {
  const element = document.createElement(attrs.tag || "input");
  for (const [k, v] of Object.entries(attrs)) if (k !== "tag" && v !== undefined) element.setAttribute(k, v);
  return element;
}

function control(name, schema) {
  const id = `f-${name}`;
  if (name === "prompt") {
    const t = input({ tag: "textarea", id, name, placeholder: (schema.examples || [""])[0] });
    return t;
  }
  if (schema.anyOf) return unionControl(name, schema);
  if (schema.type === "array" && resolve(schema.items).properties?.path) return lorasControl(name, schema);
  if (schema.enum) return select(id, name, schema.enum, schema.default);
  if (schema.type === "boolean") {
    const box = input({ type: "checkbox", id, name });
    box.checked = Boolean(schema.default);
    return box;
  }
  if (schema.type === "integer" || schema.type === "number") {
    const step = schema.type === "integer" ? 1 : 0.1;
    const wrap = document.createElement("div");
    wrap.className = "range";
    const number = input({ type: "number", id, name, min: schema.minimum, max: schema.maximum, step, value: schema.default });
    if (schema.minimum !== undefined && schema.maximum !== undefined && schema.maximum <= 1e6) {
      const slider = input({ type: "range", min: schema.minimum, max: schema.maximum, step, value: schema.default, "aria-label": name });
      slider.addEventListener("input", () => { number.value = slider.value; updateSnippet(); });
      number.addEventListener("input", () => { slider.value = number.value; });
      wrap.append(slider);
    }
    wrap.append(number);
    return wrap;
  }
  return input({ type: "text", id, name, value: schema.default ?? "" });
}

function select(id, name, options, selected) {
  const s = input({ tag: "select", id, name });
  for (const option of options) s.append(new Option(option, option, false, option === selected));
  return s;
}

// anyOf: `seed` (integer or null) and `image_size` (a named size, {width, height}, or null on the base endpoint)
function unionControl(name, schema) {
  const variants = schema.anyOf.map(resolve);
  const nullable = variants.some((v) => v.type === "null");
  const named = variants.find((v) => v.enum);
  const object = variants.find((v) => v.type === "object");
  const integer = variants.find((v) => v.type === "integer");
  if (integer && !named) {
    return input({ type: "number", id: `f-${name}`, name, min: integer.minimum, step: 1, placeholder: nullable ? "random" : "" });
  }
  const wrap = document.createElement("div");
  const options = [...(nullable ? ["auto"] : []), ...(named ? named.enum : []), ...(object ? ["custom"] : [])];
  const choice = select(`f-${name}`, name, options, schema.default ?? "auto");
  wrap.append(choice);
  if (object) {
    const pair = document.createElement("div");
    pair.className = "pair";
    for (const [side, s] of Object.entries(object.properties)) {
      pair.append(input({ type: "number", name: `${name}.${side}`, min: s.minimum, max: s.maximum, step: 16, value: s.default, placeholder: side, "aria-label": side, title: `${side}: ${rangeHint(s)}` }));
    }
    pair.hidden = choice.value !== "custom";
    choice.addEventListener("change", () => { pair.hidden = choice.value !== "custom"; });
    wrap.append(pair);
  }
  return wrap;
}

// `loras` (the LoRA endpoints): one row per LoRA, its path (a URL or a library name) and scale; up to maxItems.
function lorasControl(name, schema) {
  const item = resolve(schema.items);
  const wrap = document.createElement("div");
  wrap.className = "loras";
  wrap.dataset.loras = name;
  const add = input({ tag: "button", type: "button", class: "add-lora" });
  add.textContent = "+ LoRA";
  const addRow = (path = "", scale = item.properties.scale.default) => {
    const row = document.createElement("div");
    row.className = "pair lora";
    const pathInput = input({ type: "text", name: `${name}.path`, value: path, placeholder: "https://…/lora.safetensors or a library name", "aria-label": "LoRA path" });
    const scaleInput = input({ type: "number", name: `${name}.scale`, value: scale, min: item.properties.scale.minimum, max: item.properties.scale.maximum, step: 0.05, "aria-label": "LoRA scale", title: `scale: ${rangeHint(item.properties.scale)}` });
    const remove = input({ tag: "button", type: "button", title: "remove this LoRA" });
    remove.textContent = "×";
    remove.addEventListener("click", () => { row.remove(); add.disabled = false; updateSnippet(); });
    for (const e of [pathInput, scaleInput]) e.addEventListener("input", updateSnippet);
    row.append(pathInput, scaleInput, remove);
    wrap.insertBefore(row, add);
    add.disabled = wrap.querySelectorAll(".lora").length >= (schema.maxItems ?? 3);
  };
  add.addEventListener("click", () => { addRow(); updateSnippet(); });
  wrap.append(add);
  wrap.addRow = addRow;
  return wrap;
}

function lorasValue(field, name) {
  return [...field.querySelectorAll(".lora")]
    .map((row) => ({ path: row.querySelector(`[name="${name}.path"]`).value.trim(), scale: Number(row.querySelector(`[name="${name}.scale"]`).value) }))
    .filter((lora) => lora.path);
}

// The form's values as the endpoint's input (`raw`: as the controls hold them, to carry across endpoints).
function readValues(raw = false) {
  const values = {};
  for (const field of document.querySelectorAll("#fields .field")) {
    const name = field.dataset.field;
    if (field.querySelector("[data-loras]")) {
      const loras = lorasValue(field, name);
      if (raw || loras.length) values[name] = loras;
      continue;
    }
    const element = field.querySelector(`[name="${name}"]`);
    if (!element) continue;
    if (raw) { values[name] = element.type === "checkbox" ? element.checked : element.value; continue; }
    // A field of the previous endpoint's form, being replaced: removing a focused, edited field fires its
    // `change` after the new schema is in place (and the new endpoint may not have it).
    if (!(name in state.schema.properties)) continue;
    const schema = resolve(state.schema.properties[name]);
    if (element.type === "checkbox") values[name] = element.checked;
    else if (element.tagName === "SELECT" && schema.anyOf) {
      if (element.value === "custom") {
        const side = (s) => Number(field.querySelector(`[name="${name}.${s}"]`).value);
        values[name] = { width: side("width"), height: side("height") };
      } else if (element.value !== "auto") values[name] = element.value;
    } else if (element.type === "number") {
      if (element.value === "") continue;
      const integer = schema.type === "integer" || (schema.anyOf || []).some((v) => v.type === "integer");
      values[name] = integer && /^\d+$/.test(element.value) && !Number.isSafeInteger(Number(element.value)) ? BigInt(element.value) : Number(element.value);
    } else values[name] = element.value;
  }
  if (takesImages()) values.image_urls = state.uploads.filter((u) => u.url).map((u) => u.url);
  return values;
}

function setValue(name, value) {
  const loras = document.querySelector(`#fields [data-loras="${name}"]`);
  if (loras) { for (const lora of Array.isArray(value) ? value : []) loras.addRow(lora.path, lora.scale); return; }
  const element = document.querySelector(`#fields [name="${name}"]`);
  if (!element) return;
  if (element.type === "checkbox") element.checked = Boolean(value);
  else if (element.tagName !== "SELECT" || [...element.options].some((o) => o.value === value)) element.value = value;
  element.dispatchEvent(new Event("change"));
}

// ---- reference images -------------------------------------------------------------------------------------

async function addFiles(files) {
  for (const file of [...files].filter((f) => f.type.startsWith("image/"))) {
    if (state.uploads.length >= MAX_IMAGES) { showBanner(`At most ${MAX_IMAGES} reference images: ${file.name} was not added.`); break; }
    const upload = { file, url: null, preview: URL.createObjectURL(file) };
    state.uploads.push(upload);
    renderThumbs();
    try {
      const target = await api("POST", "/storage/upload/initiate", { content_type: file.type, file_name: file.name });
      if (!target.ok) throw new Error(plain(target));
      const put = await fetch(target.data.upload_url, { method: "PUT", body: file, headers: { "Content-Type": file.type } });
      if (!put.ok) throw new Error(`the upload answered ${put.status}: ${await put.text()}`);
      upload.url = target.data.file_url;
    } catch (error) {
      state.uploads.splice(state.uploads.indexOf(upload), 1);
      showBanner(`Could not upload ${file.name}: ${error.message}`);
    }
    renderThumbs();
  }
}

function renderThumbs() {
  const list = $("#thumbs");
  list.replaceChildren();
  for (const upload of state.uploads) {
    const item = document.createElement("li");
    item.className = upload.url ? "uploaded" : "uploading";
    const img = document.createElement("img");
    img.src = upload.preview;
    img.alt = upload.file.name;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "×";
    remove.title = `remove ${upload.file.name}`;
    remove.addEventListener("click", () => { state.uploads.splice(state.uploads.indexOf(upload), 1); renderThumbs(); });
    item.append(img, remove);
    list.append(item);
  }
  updateSnippet();
}

// ---- errors in plain words --------------------------------------------------------------------------------

function clearErrors() {
  for (const e of document.querySelectorAll("[data-error-for]")) e.textContent = "";
  for (const f of document.querySelectorAll(".invalid")) f.classList.remove("invalid");
  $("#banner").hidden = true;
}

function showBanner(message) {
  $("#banner").textContent = message;
  $("#banner").hidden = false;
}

// A fal-shaped error (`detail`: a message, or pydantic's list naming each field) as sentences, each shown next
// to its field when it names one.
function showError(response) {
  const detail = response.data && response.data.detail;
  if (!Array.isArray(detail)) { showBanner(plain(response)); return; }
  const lines = [];
  for (const problem of detail) {
    const [where, field, ...rest] = problem.loc || [];
    const name = where === "body" ? field : problem.loc.join(".");
    const target = document.querySelector(`[data-error-for="${name}"]`);
    const said = `${label(String(name), {})}${rest.length ? ` (${rest.join(".")})` : ""}: ${problem.msg}`;
    if (target) {
      target.textContent = target.textContent ? `${target.textContent} ${problem.msg}` : problem.msg;
      target.closest(".field").classList.add("invalid");
    }
    lines.push(said);
  }
  showBanner(`The server refused the request (${response.status}):\n${lines.join("\n")}`);
}

function plain({ status, data }) {
  const detail = data && data.detail;
  const text = typeof detail === "string" ? detail : JSON.stringify(data);
  const why = { 401: "The server needs an API key: open “API key” below the form.", 413: "Too large for this server.", 429: "The server is busy: try again shortly.", 503: "The server is not ready." }[status];
  return [why, `${status}: ${text}`].filter(Boolean).join("\n");
}

// ---- running a request ------------------------------------------------------------------------------------

async function run(event) {
  event.preventDefault();
  clearErrors();
  if (takesImages() && state.uploads.some((u) => !u.url)) { showBanner("Wait for the uploads to finish."); return; }
  const body = readValues();
  const endpointId = state.endpointId;
  $("#submit").disabled = true;
  try {
    const submitted = await api("POST", `/queue/${endpointId}`, body);
    if (!submitted.ok) { showError(submitted); return; }
    const handle = submitted.data;
    state.running = handle;
    $("#cancel").disabled = false;
    showProgress(`In queue (position ${handle.queue_position})`, 0, 1);
    $("#log").replaceChildren();
    const started = performance.now();
    await follow(handle);
    const result = await api("GET", handle.response_url);
    if (!result.ok) { showError(result); showProgress("Failed", 0, 1); return; }
    showProgress("Completed", 1, 1);
    addResult(endpointId, body, result.data, (performance.now() - started) / 1000);
  } catch (error) {
    showBanner(`The request could not be completed: ${error.message}`);
  } finally {
    state.running = null;
    $("#submit").disabled = false;
    $("#cancel").disabled = true;
  }
}

// Server-sent events over fetch, so the Authorization header goes along.
async function follow(handle) {
  const response = await fetch(`${handle.status_url}/stream?logs=1`, { headers: authHeaders() });
  if (!response.ok) throw new Error(plain({ status: response.status, data: await response.json().catch(() => null) }));
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let seen = 0;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5)).join("\n");
      if (!data) continue;
      const status = JSON.parse(data);
      const logs = status.logs || [];
      for (const entry of logs.slice(seen)) {
        const li = document.createElement("li");
        li.textContent = entry.message;
        $("#log").append(li);
      }
      seen = logs.length;
      const progress = status.progress; // this server's structured progress (fal's status has only the log lines)
      if (status.status === "IN_QUEUE") showProgress(`In queue (position ${status.queue_position})`, 0, 1);
      if (status.status === "IN_PROGRESS" && progress) showProgress(`Running: step ${progress.step} of ${progress.total}`, progress.step, progress.total);
      if (status.status === "IN_PROGRESS" && !progress) showProgress("Running: loading inputs", 0, 1);
      if (status.status === "COMPLETED") return;
    }
  }
}

function showProgress(text, value, max) {
  $("#progress").hidden = false;
  $("#status-text").textContent = text;
  $("#steps").max = max;
  $("#steps").value = value;
}

function addResult(endpointId, body, output, seconds) {
  const card = document.createElement("article");
  card.className = "result";
  const images = document.createElement("div");
  images.className = "images";
  output.images.forEach((image, index) => {
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.src = image.url;
    img.alt = `result ${index + 1}: ${output.prompt}`;
    const caption = document.createElement("figcaption");
    const download = document.createElement("a");
    download.href = image.url;
    download.download = image.file_name || `flux2-${output.seed}-${index + 1}.${(image.content_type || "image/png").split("/")[1]}`;
    download.textContent = "download";
    caption.append(`${image.width}×${image.height} ${image.content_type} · `, download);
    figure.append(img, caption);
    images.append(figure);
  });
  const meta = document.createElement("div");
  meta.className = "meta";
  const timings = Object.entries(output.timings).map(([k, v]) => `${k} ${v.toFixed(2)} s`).join(", ");
  meta.textContent = `${endpointId} · seed ${output.seed} · ${timings} · ${seconds.toFixed(1)} s in the browser`;
  meta.dataset.seed = output.seed;
  card.append(images, meta);
  for (const notice of output.notices || []) {
    const p = document.createElement("p");
    p.className = "notice";
    p.textContent = notice;
    card.append(p);
  }
  $("#gallery").prepend(card);
}

async function cancel() {
  if (!state.running) return;
  const answer = await api("PUT", state.running.cancel_url);
  if (!answer.ok) showBanner(plain(answer));
}

// ---- snippets ---------------------------------------------------------------------------------------------

function snippetFor(kind) {
  const origin = location.origin;
  const host = location.host;
  const body = readValues();
  if (body.image_urls && !body.image_urls.length) body.image_urls = ["https://example.com/your-image.png"];
  const json = toJson(body);
  const pretty = JSON.stringify(JSON.parse(json.replace(/:(\d{16,})/g, ':"$1"')), null, 2);
  const id = state.endpointId;
  if (kind === "curl") {
    return [
      `curl -X POST ${origin}/${id} \\`,
      `  -H 'Content-Type: application/json' \\`,
      `  -H "Authorization: Key $FAL_KEY" \\`,
      `  -d '${json.replace(/'/g, "'\\''")}'`,
    ].join("\n");
  }
  if (kind === "python") {
    // fal_client always speaks https: on an http:// page, say what to run first and give the TLS form
    const tls = location.protocol === "https:";
    const runHost = tls ? host : `${location.hostname}:8443`;
    const setup = tls
      ? ["# fal_client speaks https only and must trust this server's certificate (README, \"fal's Python client\")."]
      : [
          "# fal_client speaks https only, and this page is served over http://: it can't reach this address.",
          "# First serve TLS (README, \"fal's Python client\"), on the server:",
          `#   flux2-server tls ${location.hostname} --out tls`,
          "#   flux2-server serve ... --port 8443 --ssl-certfile tls/server.pem --ssl-keyfile tls/server-key.pem",
          "# then copy tls/ca.pem here and run this:",
        ];
    return [
      ...setup,
      "import os",
      `os.environ["FAL_RUN_HOST"] = "${runHost}"`,
      `os.environ["FAL_QUEUE_RUN_HOST"] = "${runHost}/queue"`,
      `${tls ? "# " : ""}os.environ["SSL_CERT_FILE"] = "tls/ca.pem"  # the CA that signed the server's certificate`,
      "# os.environ[\"FAL_KEY\"] = \"...\"  # one of the server's API keys, if it has any",
      "import fal_client  # reads the hosts above at import",
      "",
      "result = fal_client.subscribe(",
      `    "${id}",`,
      `    arguments=${pretty.replace(/\btrue\b/g, "True").replace(/\bfalse\b/g, "False").replace(/\bnull\b/g, "None").replace(/\n/g, "\n    ")},`,
      "    with_logs=True,",
      "    on_queue_update=lambda update: print(update),",
      ")",
      "print(result[\"images\"][0][\"url\"], result[\"seed\"])",
    ].join("\n");
  }
  return [
    'import { fal } from "@fal-ai/client";',
    "",
    "fal.config({",
    "  // this server implements fal's proxy convention; `when: \"always\"` proxies in Node too (a plain string",
    "  // proxies only in a browser: in Node the client would call fal.run)",
    `  proxyUrl: { url: "${origin}/api/fal/proxy", when: "always" },`,
    "  // credentials: process.env.FAL_KEY, // only if the server has API keys",
    "});",
    `const { data } = await fal.subscribe("${id}", {`,
    `  input: ${pretty.replace(/\n/g, "\n  ")},`,
    "  logs: true,",
    "  onQueueUpdate: (update) => console.log(update.status, update.logs?.at(-1)?.message),",
    "});",
    "console.log(data.images[0].url, data.seed);",
  ].join("\n");
}

function updateSnippet() {
  if (!state.schema) return;
  $("#snippet").textContent = snippetFor(state.snippet);
}

// ---- wiring -----------------------------------------------------------------------------------------------

async function checkServer() {
  const { status, data } = await api("GET", "/ready");
  $("#server-state").textContent = status === 200 ? "model loaded" : `model ${data && data.model}${data && data.error ? `: ${data.error}` : ""}`;
  if (status !== 200 && !(data && data.error)) setTimeout(checkServer, 2000);
}

async function main() {
  const key = $("#api-key");
  key.value = sessionStorage.getItem("flux2-key") || "";
  key.addEventListener("change", () => sessionStorage.setItem("flux2-key", key.value));
  const endpoint = $("#endpoint");
  const wanted = new URLSearchParams(location.search).get("endpoint_id");
  if (wanted && [...endpoint.options].some((o) => o.value === wanted)) endpoint.value = wanted;
  endpoint.addEventListener("change", () => loadSchema(endpoint.value).catch((e) => showBanner(e.message)));
  $("#form").addEventListener("submit", run);
  $("#form").addEventListener("input", updateSnippet);
  $("#form").addEventListener("change", updateSnippet);
  $("#cancel").addEventListener("click", cancel);
  $("#files").addEventListener("change", (e) => { addFiles(e.target.files); e.target.value = ""; });
  const zone = $("#dropzone");
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => { e.preventDefault(); zone.classList.remove("over"); addFiles(e.dataTransfer.files); });
  document.addEventListener("paste", (e) => { if (e.clipboardData.files.length) addFiles(e.clipboardData.files); });
  for (const tab of document.querySelectorAll("[data-snippet]")) {
    tab.addEventListener("click", () => {
      state.snippet = tab.dataset.snippet;
      for (const t of document.querySelectorAll("[data-snippet]")) t.classList.toggle("active", t === tab);
      updateSnippet();
    });
  }
  $("#copy").addEventListener("click", () => navigator.clipboard.writeText($("#snippet").textContent).catch(() => showBanner("The browser refused clipboard access: select the text instead.")));
  checkServer();
  try { await loadSchema(endpoint.value); } catch (error) { showBanner(error.message); }
  document.body.dataset.ready = "true";
}

main();
