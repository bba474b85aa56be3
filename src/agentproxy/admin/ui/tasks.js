// The task tree page: who started a task, its agents and subtasks, every action with its
// decision, and approvals, as `agentproxy audit trace` prints them. Plain JS, no inline code
// (strict CSP); the tree is shown as text (textContent), never as HTML. The operator's token
// lives in sessionStorage only and travels in the Authorization header.
"use strict";

const KEY = "agentproxy.operatorToken";

function setStatus(text, isError) {
  const status = document.getElementById("status");
  status.textContent = text;
  status.className = isError ? "error" : "";
}

async function show(event) {
  if (event) { event.preventDefault(); }
  const field = document.getElementById("token");
  if (field.value) { sessionStorage.setItem(KEY, field.value); field.value = ""; }
  const task = document.getElementById("task").value.trim();
  const tree = document.getElementById("tree");
  if (!task) { setStatus("Name a task.", true); return; }
  history.replaceState(null, "", location.pathname + "#task=" + encodeURIComponent(task));
  setStatus("Reading the trail…", false);
  const response = await fetch("/v1/tasks/" + encodeURIComponent(task) + "/tree?format=text", {
    headers: { "Authorization": "Bearer " + (sessionStorage.getItem(KEY) || "") },
    credentials: "omit",
    cache: "no-store",
  });
  const text = await response.text();
  if (!response.ok) {
    let detail = text;
    try { detail = JSON.parse(text).detail || text; } catch (e) { /* plain text */ }
    tree.hidden = true;
    setStatus(detail, true);
    return;
  }
  tree.textContent = text;
  tree.hidden = false;
  setStatus("", false);
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("query").addEventListener("submit", show);
  const params = new URLSearchParams(location.hash.slice(1));
  if (params.get("task")) {
    document.getElementById("task").value = params.get("task");
    if (sessionStorage.getItem(KEY)) { show(null); }
  }
});
