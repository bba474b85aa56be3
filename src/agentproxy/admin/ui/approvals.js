// The approvals page: plain JS, no build step, no inline code (strict CSP).
// The approver's bearer token lives in sessionStorage only and travels in the Authorization
// header of this page's API calls: never in a cookie or a query string.
"use strict";

const KEY = "agentproxy.approverToken";
const REFRESH_MS = 2000;
let timer = null;

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
    history.replaceState(null, "", location.pathname + (rest ? "#" + rest : ""));
  }
  return params.get("approval");
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

function when(epoch) { return new Date(epoch * 1000).toLocaleString(); }

function render(approvals, highlight) {
  const table = document.getElementById("approvals");
  const body = table.querySelector("tbody");
  // A refresh must never disturb what the approver is typing: keep each reason, and the
  // focus and caret, across the re-render.
  const typed = {};
  for (const input of body.querySelectorAll("input[data-id]")) { typed[input.dataset.id] = input.value; }
  const active = document.activeElement;
  const focusedId = active && active.dataset ? active.dataset.id : null;
  const caret = focusedId ? [active.selectionStart, active.selectionEnd] : null;
  body.replaceChildren();
  for (const a of approvals) {
    const row = document.createElement("tr");
    row.dataset.id = a.id;
    if (a.id === highlight) { row.className = "highlight"; }
    cell(row, when(a.created));
    cell(row, code(a.agent + (a.chain.length ? " (via " + a.chain.join(" → ") + ")" : "")));
    cell(row, a.user || "—");
    cell(row, code(a.action));
    const args = document.createElement("pre");
    args.textContent = JSON.stringify(a.summary, null, 1);
    cell(row, args);
    cell(row, a.reason + " (rule " + a.rule + ")");
    cell(row, when(a.expires));
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
      // Approving releases the call: say exactly which, and ask.
      const what = a.agent + (a.user ? " for " + a.user : "") + ": " + a.action + "\n" +
        JSON.stringify(a.summary, null, 1);
      if (window.confirm("Approve " + a.id + "?\n\n" + what)) {
        decide(a.id, "approve", reason.value);
      }
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

async function decide(id, verb, reason) {
  try {
    await api("POST", "/v1/approvals/" + encodeURIComponent(id) + "/" + verb, { reason });
    setStatus((verb === "approve" ? "Approved " : "Denied ") + id, false);
  } catch (e) {
    setStatus("Could not " + verb + " " + id + ": " + e.message, true);
  }
  refresh();
}

let highlighted = null;

async function refresh() {
  if (!token()) {
    setStatus("Paste an approver token to see what waits for you.", false);
    render([], null);
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
    render(approvals, highlighted);
    if (!document.getElementById("status").classList.contains("error")) {
      setStatus("Updated " + new Date().toLocaleTimeString(), false);
    }
  } catch (e) {
    setStatus("Could not load approvals: " + e.message, true);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  highlighted = fromFragment();
  const field = document.getElementById("token");
  field.value = token();
  document.getElementById("auth").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY, field.value.trim());
    setStatus("", false);
    refresh();
  });
  document.getElementById("forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    field.value = "";
    refresh();
  });
  refresh();
  timer = setInterval(refresh, REFRESH_MS);
});
