// The search page: one query (an upload or a stored image) -> /search and /predict -> a grid of neighbours.
"use strict";
const $ = (id) => document.getElementById(id);
let metric = "cosine";
let hasHeads = false;

async function api(path, options) {
  const response = await fetch(path, options);
  const body = await response.json().catch(() => ({ error: response.statusText }));
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

function status(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function params(search) {
  const k = Math.max(1, Math.min(100, parseInt($("k").value, 10) || 12));
  const qe = search ? Math.max(0, Math.min(100, parseInt($("qe").value, 10) || 0)) : 0;  // /search only
  const label = $("label").value;
  return { k, ...(label ? { label } : {}), ...(qe ? { qe } : {}) };  // a field is given or left out, never null
}

async function start() {
  try {
    const info = await api("/info");
    metric = info.index.metric;
    hasHeads = info.heads.length > 0;
    const recall = info.index.recall_at_10 == null ? "" : `, recall@10 ${info.index.recall_at_10.toFixed(3)}`;
    $("info").textContent = `${info.store.images} images · ${info.backbone} · ${info.index.type}${recall}` +
      (hasHeads ? ` · heads: ${info.heads.map((h) => h.name).join(", ")}` : "");
    for (const label of Object.keys(info.store.labels).sort()) {
      const option = document.createElement("option");
      option.value = option.textContent = label;
      $("label").append(option);
    }
    document.dispatchEvent(new CustomEvent("info", { detail: info }));  // audit.js shows its tab
  } catch (e) {
    $("info").textContent = `cannot reach the service: ${e.message}`;
  }
}

function showQuery(src, caption) {
  $("query").hidden = false;
  $("query-img").src = src;
  $("query-caption").textContent = caption;
  $("predictions").replaceChildren();
}

function showPredictions(result) {
  const items = result.predictions.map((p) => {
    const li = document.createElement("li");
    const top = p.top.map((t) => `${t.label} ${(100 * t.probability).toFixed(0)}%`).join(", ");
    li.innerHTML = "<strong></strong> <span class='muted'></span>";
    li.firstChild.textContent = `${p.head}: ${p.label}`;
    li.lastChild.textContent = `(${top})`;
    return li;
  });
  $("predictions").replaceChildren(...items);
}

function showResults(result) {
  const scoreName = metric === "cosine" ? "similarity" : "distance";
  const items = result.neighbours.map((n) => {
    const li = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.id = n.id;
    button.title = n.path;
    button.setAttribute("aria-label", `${n.label || "unlabelled"}, ${scoreName} ${n[scoreName].toFixed(3)}: ` +
      `show the neighbours of ${n.path}`);
    const img = document.createElement("img");
    img.src = n.thumbnail;
    img.alt = "";
    img.loading = "lazy";
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.innerHTML = "<span class='label'></span><span class='score'></span>";
    meta.firstChild.textContent = n.label || "—";
    meta.lastChild.textContent = n[scoreName].toFixed(3);
    button.append(img, meta);
    button.addEventListener("click", () => searchStored(n));
    li.append(button);
    return li;
  });
  $("results").replaceChildren(...items);
  status(`${result.neighbours.length} neighbours in ${result.took_ms} ms`);
}

async function run(searchBody, predictBody) {
  status("searching…");
  try {
    const [found, predicted] = await Promise.all([
      api("/search", searchBody()),
      hasHeads ? api("/predict", predictBody()) : Promise.resolve(null),
    ]);
    showResults(found);
    if (predicted) showPredictions(predicted);
  } catch (e) {
    status(e.message, true);
  }
}

function searchFile(file) {
  if (!file) return;
  showQuery(URL.createObjectURL(file), file.name || "pasted image");
  const form = (search) => {
    const data = new FormData();
    const { k, label, qe } = params(search);
    data.append("image", file, file.name || "pasted.png");
    data.append("k", k);
    if (label) data.append("label", label);
    if (qe) data.append("qe", qe);
    return { method: "POST", body: data };
  };
  run(() => form(true), () => form(false));
}

function searchStored(n) {
  showQuery(`/images/${n.id}?size=512`, `${n.path}${n.label ? ` (${n.label})` : ""}`);
  const json = (search) => ({ method: "POST", headers: { "content-type": "application/json" },
    body: JSON.stringify({ id: n.id, ...params(search) }) });
  run(() => json(true), () => json(false));
  $("query").scrollIntoView({ block: "start" });
}

$("file").addEventListener("change", (e) => searchFile(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  searchFile([...e.dataTransfer.files].find((f) => f.type.startsWith("image/")) || e.dataTransfer.files[0]);
});
document.addEventListener("paste", (e) => {
  const item = [...e.clipboardData.items].find((i) => i.type.startsWith("image/"));
  if (item) searchFile(item.getAsFile());
});
document.querySelector("label[for=file]").tabIndex = 0;
document.querySelector("label[for=file]").addEventListener("keydown", (e) => {
  if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("file").click(); }
});
start();
