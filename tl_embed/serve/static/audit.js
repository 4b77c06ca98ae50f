// The Audit tab (serve --audit): a section of findings at a time, each suspect beside its evidence;
// clicking any image searches its neighbours on the Search tab.  Uses app.js's $, api and searchStored.
"use strict";
const PAGE = 50;
let auditSection = null;
let auditShown = 0;

function showView(name) {
  for (const view of ["search", "audit"]) {
    $(`${view}-view`).hidden = view !== name;
    $(`tab-${view}`).setAttribute("aria-pressed", String(view === name));
  }
}

function thumb(image, caption, suspect = false) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = suspect ? "thumb suspect" : "thumb";
  button.title = image.path;
  let picture;
  if (image.id == null) {  // not in the served index: nothing to show or search
    picture = document.createElement("span");
    picture.className = "gone";
    picture.textContent = "not in this index";
    button.setAttribute("aria-disabled", "true");
  } else {
    picture = document.createElement("img");
    picture.src = image.thumbnail;
    picture.alt = "";
    picture.loading = "lazy";
    button.dataset.id = image.id;
    button.addEventListener("click", () => {
      showView("search");
      searchStored({ id: image.id, path: image.path, label: image.label });
    });
  }
  const meta = document.createElement("span");
  meta.className = "meta";
  meta.textContent = caption;
  button.setAttribute("aria-label", `${image.path}, ${caption}`);
  button.append(picture, meta);
  return button;
}

function para(...parts) {  // parts: text, or [className, text]
  const p = document.createElement("p");
  for (const part of parts) {
    if (typeof part === "string") p.append(part);
    else {
      const span = document.createElement("span");
      [span.className, span.textContent] = part;
      p.append(span);
    }
  }
  return p;
}

function facts(f) {
  const div = document.createElement("div");
  div.className = "facts";
  const duplicate = auditSection === "cross-split" || auditSection === "label-conflict";
  const score = auditSection === "outliers" ? f.score.toFixed(1) : f.score.toFixed(3);
  div.append(para(`#${f.rank} · ${duplicate ? "similarity" : "score"} ${score}`));
  if (auditSection === "label-issues") {
    div.append(para(["given", f.label ?? "unlabelled"], " → ", ["suggested", f.suggested]),
      para(`confidence ${f.confidence.toFixed(2)}`));
  } else if (auditSection === "outliers") {
    div.append(para(`distance ${f.distance.toFixed(3)}`));
    if (f.suggested != null) div.append(para("neighbours are mostly ", ["suggested", f.suggested]));
  }
  div.append(para(f.path + (f.split ? ` · ${f.split}` : "")));
  return div;
}

function finding(f) {
  const li = document.createElement("li");
  const label = f.label ?? "unlabelled";
  const strip = document.createElement("div");
  strip.className = "evidence";
  for (const e of f.evidence) {
    const where = e.split ? ` · ${e.split}` : "";
    strip.append(thumb(e, `${e.label ?? "unlabelled"}${where} · ${e.similarity.toFixed(3)}`));
  }
  const evidence = document.createElement("div");
  evidence.className = "compare";
  const heading = f.evidence.length === 1 && auditSection !== "label-issues" && auditSection !== "outliers" ?
    "its near-copy (label · split · similarity)" : "nearest neighbours (label · similarity)";
  evidence.append(para(["muted", heading]), strip);
  li.append(thumb(f, label + (f.split ? ` · ${f.split}` : ""), true), facts(f), evidence);
  return li;
}

async function loadFindings(section, more = false) {
  if (!more) {
    auditSection = section;
    auditShown = 0;
    $("audit-findings").replaceChildren();
    for (const b of $("audit-sections").children) b.setAttribute("aria-pressed", String(b.dataset.key === section));
  }
  $("audit-status").textContent = "loading…";
  try {
    const page = await api(`/audit/${section}?offset=${auditShown}&limit=${PAGE}`);
    if (page.section !== auditSection) return;  // another section was chosen meanwhile
    $("audit-findings").append(...page.findings.map(finding));
    auditShown += page.findings.length;
    $("audit-more").hidden = auditShown >= page.total;
    $("audit-status").textContent = page.total ? `${auditShown} of ${page.total} shown` : "none found";
  } catch (e) {
    $("audit-status").textContent = e.message;
  }
}

async function startAudit() {
  const summary = await api("/audit");
  const shape = summary.shape;
  const accuracy = shape.oof_accuracy == null ? "" : ` · out-of-fold accuracy ${shape.oof_accuracy.toFixed(3)}`;
  const missing = summary.not_served ? ` · ${summary.not_served} flagged images are not in this index` : "";
  $("audit-info").textContent = `${summary.path}: ${shape.rows} images, ${Object.keys(shape.counts).length} ` +
    `classes${accuracy}${missing}`;
  const buttons = summary.sections.map((s) => {
    const b = document.createElement("button");
    b.type = "button";
    b.dataset.key = s.key;
    b.textContent = `${s.title} (${s.count})`;
    b.title = s.what;
    b.addEventListener("click", () => { $("audit-what").textContent = s.what; loadFindings(s.key); });
    return b;
  });
  $("audit-sections").replaceChildren(...buttons);
  const first = summary.sections.find((s) => s.count > 0) || summary.sections[0];
  $("audit-what").textContent = first.what;
  loadFindings(first.key);
}

document.addEventListener("info", (e) => {
  const audit = e.detail.audit;
  if (!audit) return;
  const total = Object.values(audit.findings).reduce((a, b) => a + b, 0);
  $("tab-audit").textContent = `Audit (${total})`;
  $("tabs").hidden = false;
  $("tab-search").addEventListener("click", () => showView("search"));
  $("tab-audit").addEventListener("click", () => showView("audit"));
  $("audit-more").addEventListener("click", () => loadFindings(auditSection, true));
  startAudit().catch((err) => { $("audit-info").textContent = `cannot read the audit: ${err.message}`; });
});
