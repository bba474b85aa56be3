// The approvals console: plain JS, no build step, no inline code (strict CSP).
// The approver's bearer token lives in sessionStorage only and travels in the Authorization
// header of this page's API calls: never in a cookie or a query string.
// Every value shown comes from the API and is set as text, never as HTML.
"use strict";

const KEY = "agentproxy.approverToken";
const REFRESH_MS = 2000;
const HISTORY_PAGES = 5;  // of 1,000 each, per state
const ZONE = Intl.DateTimeFormat().resolvedOptions().timeZone || "local time";

let view = "pending";
let opened = null;       // the approval in the detail view (as last fetched)
let showRaw = false;
let highlighted = null;
let decidedList = [];

function token() { return sessionStorage.getItem(KEY) || ""; }

function setStatus(text, isError) {
  const status = document.getElementById("status");
  status.textContent = text;
  status.className = isError ? "error" : "";
}

function fromFragment() {
  // "#token=…" fills the field once, then leaves the address bar (and history) clean.
  const params = new URLSearchParams(location.hash.slice(1));
  const fromUrl = params.get("token");
  if (fromUrl) {
    sessionStorage.setItem(KEY, fromUrl);
    params.delete("token");
    const rest = params.toString();
    history_replace(rest);
  }
  return params.get("approval");
}

function history_replace(fragment) {
  window.history.replaceState(null, "", location.pathname + (fragment ? "#" + fragment : ""));
}

async function api(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: Object.assign({ "Authorization": "Bearer " + token() },
                           body ? { "Content-Type": "application/json" } : {}),
    body: body ? JSON.stringify(body) : undefined,
    credentials: "omit",
    cache: "no-store",
  });
  const text = await response.text();
  let data = null;
  try { data = JSON.parse(text); } catch (e) { data = { detail: text }; }
  if (!response.ok) {
    throw new Error((data && (data.detail || data.error)) || ("HTTP " + response.status));
  }
  return data;
}

function cell(row, content) {
  const td = document.createElement("td");
  if (content instanceof Node) { td.appendChild(content); } else { td.textContent = content; }
  row.appendChild(td);
  return td;
}

function code(text) {
  const c = document.createElement("code");
  c.textContent = text;
  return c;
}

function utc(epoch) { return new Date(epoch * 1000).toISOString().replace(".000Z", "Z"); }

// A time in the approver's own zone, named, with the UTC instant beside it on hover.
function when(epoch) {
  if (epoch === null || epoch === undefined) { return "—"; }
  return new Date(epoch * 1000).toLocaleString(undefined, { timeZoneName: "short" });
}

function timeCell(row, epoch) {
  const td = cell(row, when(epoch));
  if (epoch) { td.title = utc(epoch); }
  return td;
}

function who(a) {
  return a.agent + (a.chain.length ? " (via " + a.chain.join(" → ") + ")" : "");
}

// N of M: how many have approved, and who.
function quorumText(a) {
  if (!a.quorum || a.quorum <= 1) { return ""; }
  const votes = a.votes || [];
  return " · " + votes.length + " of " + a.quorum + " approvals" +
    (votes.length ? " (" + votes.map((v) => v.by).join(", ") + ")" : "");
}

function detailLink(a) {
  const link = document.createElement("a");
  link.href = "#approval=" + encodeURIComponent(a.id);
  link.textContent = a.action;
  link.className = "open";
  link.addEventListener("click", (event) => { event.preventDefault(); open(a.id); });
  return link;
}

function confirmText(a, args) {
  // Approving releases the call: say exactly which, with its arguments, and ask.
  return "Approve " + a.id + "?\n\n" + who(a) + (a.user ? " for " + a.user : "") + ": " +
    a.action + "\n" + JSON.stringify(args, null, 1);
}

function renderPending(approvals) {
  const table = document.getElementById("approvals");
  const body = table.querySelector("tbody");
  // A refresh must never disturb what the approver is typing: keep each reason, and the
  // focus and caret, across the re-render.
  const typed = {};
  for (const input of body.querySelectorAll("input[data-id]")) { typed[input.dataset.id] = input.value; }
  const active = document.activeElement;
  const focusedId = active && active.dataset && active.closest("#approvals") ? active.dataset.id : null;
  const caret = focusedId ? [active.selectionStart, active.selectionEnd] : null;
  body.replaceChildren();
  for (const a of approvals) {
    const row = document.createElement("tr");
    row.dataset.id = a.id;
    if (a.id === highlighted) { row.className = "highlight"; }
    timeCell(row, a.created);
    cell(row, code(who(a)));
    cell(row, a.user || "—");
    cell(row, detailLink(a));
    const args = document.createElement("pre");
    args.textContent = JSON.stringify(a.summary, null, 1);
    cell(row, args);
    cell(row, a.reason + " (rule " + a.rule + ")" + quorumText(a));
    timeCell(row, a.expires);
    const decision = cell(row, "");
    decision.className = "decision";
    const reason = document.createElement("input");
    reason.placeholder = "reason";
    reason.dataset.id = a.id;
    reason.value = typed[a.id] || "";
    reason.setAttribute("aria-label", "reason for " + a.id);
    const approve = document.createElement("button");
    approve.className = "approve";
    approve.textContent = "Approve";
    approve.addEventListener("click", () => {
      if (window.confirm(confirmText(a, a.summary))) { decide(a.id, "approve", reason.value); }
    });
    const deny = document.createElement("button");
    deny.className = "deny";
    deny.textContent = "Deny";
    deny.addEventListener("click", () => {
      if (!reason.value.trim()) {
        setStatus("A denial needs a reason: the agent and the audit trail are told it.", true);
        reason.focus();
        return;
      }
      decide(a.id, "deny", reason.value);
    });
    decision.append(reason, " ", approve, " ", deny);
    body.appendChild(row);
    if (a.id === focusedId) {
      reason.focus();
      if (caret) { reason.setSelectionRange(caret[0], caret[1]); }
    }
  }
  table.hidden = approvals.length === 0;
  document.getElementById("empty").hidden = approvals.length !== 0;
}

function filterValue(id) { return document.getElementById(id).value.trim(); }

function sinceEpoch(id) {
  const text = filterValue(id);
  return text ? new Date(text).getTime() / 1000 : null;
}

function renderHistory() {
  const agent = filterValue("f-agent"), user = filterValue("f-user"), rule = filterValue("f-rule");
  const state = filterValue("f-state"), since = sinceEpoch("f-since"), until = sinceEpoch("f-until");
  const shown = decidedList.filter((a) =>
    (!agent || who(a).includes(agent)) &&
    (!user || (a.user || "").includes(user)) &&
    (!rule || a.rule.includes(rule)) &&
    (!state || a.state === state) &&
    (since === null || (a.decided_at || a.expires) >= since) &&
    (until === null || (a.decided_at || a.expires) <= until));
  const body = document.querySelector("#decided tbody");
  body.replaceChildren();
  for (const a of shown) {
    const row = document.createElement("tr");
    row.dataset.id = a.id;
    timeCell(row, a.decided_at || a.expires);
    cell(row, a.state).className = "state " + a.state;
    cell(row, code(who(a)));
    cell(row, a.user || "—");
    cell(row, detailLink(a));
    cell(row, a.rule);
    cell(row, a.decided_by || "—");
    cell(row, a.decided_reason || "");
    body.appendChild(row);
  }
  document.getElementById("history-empty").hidden = shown.length !== 0;
}

async function loadHistory() {
  let all = [];
  for (const state of ["approved", "denied", "expired"]) {
    let path = "/v1/approvals?state=" + state + "&limit=1000";
    for (let pages = 0; pages < HISTORY_PAGES; pages++) {
      const data = await api("GET", path);
      all = all.concat(data.approvals);
      if (!data.next_cursor) { break; }
      path = "/v1/approvals?state=" + state + "&limit=1000&cursor=" + encodeURIComponent(data.next_cursor);
    }
  }
  all.sort((x, y) => (y.decided_at || y.expires) - (x.decided_at || x.expires));
  decidedList = all;
  renderHistory();
}

function field(list, label, value, asCode) {
  const dt = document.createElement("dt");
  dt.textContent = label;
  const dd = document.createElement("dd");
  if (value instanceof Node) { dd.appendChild(value); } else if (asCode) { dd.appendChild(code(value)); } else { dd.textContent = value; }
  list.append(dt, dd);
  return dd;
}

function splitAction(action) {
  // "http:POST /v1/transfers" → method and path; "mcp:tools/call/x" → the tool.
  const match = /^http:(\S+) (.*)$/.exec(action);
  return match ? { method: match[1], path: match[2] } : null;
}

function renderDetail() {
  const a = opened;
  const section = document.getElementById("detail");
  if (!a) { section.hidden = true; return; }
  section.hidden = false;
  document.getElementById("d-id").textContent = a.id;
  const state = document.getElementById("d-state");
  state.textContent = a.state;
  state.className = "state " + a.state;
  const list = document.getElementById("d-fields");
  list.replaceChildren();
  field(list, "Agent", a.agent, true);
  field(list, "Delegation chain", a.chain.length ? a.chain.join(" → ") + " → " + a.agent : "none (the agent acts itself)");
  field(list, "For user", a.user || "—");
  field(list, "Task", a.task || "—", Boolean(a.task));
  field(list, "Upstream", a.upstream || "—", Boolean(a.upstream));
  const http = splitAction(a.action);
  if (http) {
    field(list, "Method", http.method, true);
    const query = new URLSearchParams();
    for (const [name, value] of Object.entries(a.query || {})) {
      for (const one of Array.isArray(value) ? value : [value]) { query.append(name, one); }
    }
    const qs = query.toString();
    field(list, "Path and query", http.path + (qs ? "?" + qs : ""), true);
  } else {
    field(list, "Action", a.action, true);
  }
  field(list, "Rule", a.rule + (a.reason ? ": " + a.reason : ""));
  field(list, "Approvers", a.approvers.join(", ") + (a.quorum > 1 ? " (" + a.quorum + " must approve)" : ""));
  if (a.quorum > 1) {
    const votes = a.votes || [];
    field(list, "Approved so far", votes.length ? votes.map((v) => v.by + " at " + when(v.at) +
      (v.reason ? ": " + v.reason : "")).join("; ") : "nobody yet");
  }
  field(list, "Requested", when(a.created) + " (" + utc(a.created) + ")");
  field(list, "Expires", when(a.expires) + " (" + utc(a.expires) + ")");
  if (a.decided_by) {
    field(list, "Decided", a.state + " by " + a.decided_by + (a.decided_reason ? ": " + a.decided_reason : "") +
      (a.decided_at ? " at " + when(a.decided_at) : ""));
  }
  const args = document.getElementById("d-arguments");
  if (a.arguments === null && a.arguments_bytes) {
    args.textContent = "The arguments are " + a.arguments_bytes + " bytes: too large to show here. " +
      "Their SHA-256 is " + a.arguments_sha256 + "; approving releases exactly those.";
  } else {
    args.textContent = showRaw ? JSON.stringify(a.arguments) : JSON.stringify(a.arguments, null, 2);
  }
  document.getElementById("d-raw").setAttribute("aria-pressed", String(showRaw));
  document.getElementById("d-decision").hidden = a.state !== "pending";
}

async function open(id) {
  try {
    opened = await api("GET", "/v1/approvals/" + encodeURIComponent(id));
    showRaw = false;
    document.getElementById("d-reason").value = "";
    renderDetail();
    history_replace("approval=" + encodeURIComponent(id));
    document.getElementById("detail").scrollIntoView({ block: "nearest" });
  } catch (e) {
    setStatus("Could not open " + id + ": " + e.message, true);
  }
}

async function decide(id, verb, reason) {
  try {
    await api("POST", "/v1/approvals/" + encodeURIComponent(id) + "/" + verb, { reason });
    setStatus((verb === "approve" ? "Approved " : "Denied ") + id, false);
    if (opened && opened.id === id) { opened = await api("GET", "/v1/approvals/" + encodeURIComponent(id)); renderDetail(); }
  } catch (e) {
    setStatus("Could not " + verb + " " + id + ": " + e.message, true);
  }
  refresh();
}

async function whoami() {
  const line = document.getElementById("whoami");
  if (!token()) { line.textContent = ""; return; }
  try {
    const me = await api("GET", "/v1/whoami");
    line.textContent = "Signed in as " + me.agent + (me.user ? " for " + me.user : "") +
      (me.roles.length ? " (roles " + me.roles.join(", ") + ")" : "") +
      (me.operator ? ", operator" : "") + " · " + me.issuer + " · times in " + ZONE;
  } catch (e) {
    line.textContent = "";
  }
}

async function refresh() {
  if (!token()) {
    setStatus("Paste an approver token to see what waits for you.", false);
    renderPending([]);
    return;
  }
  try {
    // The list comes in pages (soonest to expire first): follow them, up to 10,000 rows.
    let approvals = [];
    let path = "/v1/approvals?state=pending&limit=1000";
    for (let pages = 0; pages < 10; pages++) {
      const data = await api("GET", path);
      approvals = approvals.concat(data.approvals);
      if (!data.next_cursor) { break; }
      path = "/v1/approvals?state=pending&limit=1000&cursor=" + encodeURIComponent(data.next_cursor);
    }
    renderPending(approvals);
    if (view === "history") { await loadHistory(); }
    // The detail view is left alone while its approval waits (the approver may be reading or
    // typing); once it is decided elsewhere, it is fetched again to say so.
    if (opened && opened.state === "pending" && !approvals.some((a) => a.id === opened.id)) {
      opened = await api("GET", "/v1/approvals/" + encodeURIComponent(opened.id));
      renderDetail();
    }
    if (!document.getElementById("status").classList.contains("error")) {
      setStatus("Updated " + new Date().toLocaleTimeString(), false);
    }
  } catch (e) {
    setStatus("Could not load approvals: " + e.message, true);
  }
}

function show(which) {
  view = which;
  for (const name of ["pending", "history"]) {
    document.getElementById(name).hidden = name !== which;
    const tab = document.getElementById("tab-" + name);
    tab.classList.toggle("current", name === which);
    tab.setAttribute("aria-pressed", String(name === which));
  }
  refresh();
}

document.addEventListener("DOMContentLoaded", () => {
  highlighted = fromFragment();
  const field = document.getElementById("token");
  field.value = token();
  document.getElementById("auth").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY, field.value.trim());
    setStatus("", false);
    whoami();
    refresh();
  });
  document.getElementById("forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    field.value = "";
    whoami();
    refresh();
  });
  document.getElementById("tab-pending").addEventListener("click", () => show("pending"));
  document.getElementById("tab-history").addEventListener("click", () => show("history"));
  document.getElementById("filters").addEventListener("input", renderHistory);
  document.getElementById("filters").addEventListener("submit", (event) => event.preventDefault());
  document.getElementById("d-close").addEventListener("click", () => {
    opened = null;
    renderDetail();
    history_replace("");
  });
  document.getElementById("d-raw").addEventListener("click", () => { showRaw = !showRaw; renderDetail(); });
  document.getElementById("d-approve").addEventListener("click", () => {
    const a = opened;
    if (a && window.confirm(confirmText(a, a.arguments !== null ? a.arguments : a.summary))) {
      decide(a.id, "approve", document.getElementById("d-reason").value);
    }
  });
  document.getElementById("d-deny").addEventListener("click", () => {
    const reason = document.getElementById("d-reason");
    if (!reason.value.trim()) {
      setStatus("A denial needs a reason: the agent and the audit trail are told it.", true);
      reason.focus();
      return;
    }
    decide(opened.id, "deny", reason.value);
  });
  whoami();
  refresh();
  if (highlighted && token()) { open(highlighted); }
  setInterval(refresh, REFRESH_MS);
});
