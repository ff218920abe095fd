"use strict";
// The deltakit module picker page. Python does all the thinking (patterns, matching, planning); this file draws
// the folded tree, keeps the set of ticked module names and asks Python for the exact preview after each change.
(function () {
  const token = new URLSearchParams(location.search).get("token") || "";
  const $ = (id) => document.getElementById(id);
  let names = [];            // full module names; nodes refer to them by index
  const selected = new Set(); // indices of ticked modules
  let rendered = [];          // {node, li, box} of the nodes on the page (children are drawn when opened)
  let state = null;
  let seq = 0;
  let timer = null;
  let finished = false;

  async function api(path, body) {
    const response = await fetch(path, {
      method: "POST",
      headers: {"Content-Type": "application/json", "X-Deltakit-Token": token},
      body: JSON.stringify(body || {}),
      cache: "no-store",
      credentials: "omit",
    });
    let data;
    try { data = await response.json(); } catch (e) { data = {error: "HTTP " + response.status}; }
    if (!response.ok) throw new Error(data.error || ("HTTP " + response.status));
    return data;
  }

  const fmt = (n) => Number(n).toLocaleString("en-US");

  function make(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function kidsOf(entry) {
    return entry.mode === "members" ? entry.node.m : (entry.node.c || []);
  }

  function renderNode(node, path, isRoot) {
    const li = make("li", "node");
    li.dataset.path = path;
    if (node.m) li.classList.add("folded");
    const row = make("span", "row");
    const hasKids = Boolean(node.c || node.m);
    const toggle = make("span", hasKids ? "toggle" : "toggle leaf", hasKids ? "\u25b8" : "\u00b7");
    row.appendChild(toggle);
    const entry = {node, li, box: null, ul: null, open: false, mode: "template", path, toggle};
    if (!isRoot && node.n.length) {
      const box = make("input", "pick");
      box.type = "checkbox";
      box.title = node.n.length > 1 ? "select all " + node.n.length + " modules" : names[node.n[0]];
      box.addEventListener("change", () => setNames(node.n, box.checked));
      row.appendChild(box);
      entry.box = box;
    }
    row.appendChild(make("span", "label", node.l));
    row.appendChild(make("span", "type", "(" + node.t + ")"));
    if (node.n.length > 1) row.appendChild(make("span", "count", "\u00d7" + node.n.length));
    if (node.s) row.appendChild(make("span", "shape", node.s));
    for (const role of node.r || []) row.appendChild(make("span", "role", role));
    row.appendChild(make("span", "params", fmt(node.p) + " params"));
    if (node.m) {
      const unfold = make("button", "unfold", "unfold \u00d7" + node.m.length);
      unfold.type = "button";
      unfold.addEventListener("click", () => {
        entry.mode = entry.mode === "members" ? "template" : "members";
        unfold.textContent = entry.mode === "members" ? "fold" : "unfold \u00d7" + node.m.length;
        li.classList.toggle("unfolded", entry.mode === "members");
        if (entry.ul) { entry.ul.remove(); entry.ul = null; }
        setOpen(entry, true);
      });
      row.appendChild(unfold);
    }
    if (hasKids) toggle.addEventListener("click", () => setOpen(entry, !entry.open));
    li.appendChild(row);
    rendered.push(entry);
    updateEntry(entry);
    return {li, entry};
  }

  function setOpen(entry, open) {
    entry.open = open;
    entry.toggle.textContent = open ? "\u25be" : "\u25b8";
    entry.li.classList.toggle("open", open);
    if (open && !entry.ul) {
      entry.ul = make("ul");
      // members of a folded node sit where the folded node sits: their path continues from its parent
      const base = entry.mode === "members" ? entry.path.slice(0, entry.path.lastIndexOf("/")) : entry.path;
      for (const kid of kidsOf(entry)) entry.ul.appendChild(renderNode(kid, base + "/" + kid.l, false).li);
      entry.li.appendChild(entry.ul);
      rendered = rendered.filter((e) => e.li.isConnected);
    }
    if (entry.ul) entry.ul.hidden = !open;
  }

  function updateEntry(entry) {
    const ids = entry.node.n;
    let hits = 0;
    for (const i of ids) if (selected.has(i)) hits++;
    if (entry.box) {
      entry.box.checked = hits > 0 && hits === ids.length;
      entry.box.indeterminate = hits > 0 && hits < ids.length;
    }
    entry.li.classList.toggle("site", hits > 0 && hits === ids.length);
  }

  function refresh() {
    for (const entry of rendered) updateEntry(entry);
    for (const button of document.querySelectorAll("#roles button")) {
      const ids = state.roles[button.dataset.role];
      button.classList.toggle("on", ids.every((i) => selected.has(i)));
    }
  }

  function setNames(ids, on) {
    if (finished) return;
    for (const i of ids) { if (on) selected.add(i); else selected.delete(i); }
    refresh();
    schedulePreview();
  }

  function request() {
    const body = {selection: [...selected].sort((a, b) => a - b).map((i) => names[i])};
    if (state.editable) {
      body.delta_type = $("method").value;
      body.options = JSON.parse($("options").value || "{}");
    }
    return body;
  }

  function schedulePreview() {
    $("preview").dataset.pending = "1";
    clearTimeout(timer);
    timer = setTimeout(runPreview, 120);
  }

  function showError(message) {
    $("error").textContent = message;
    $("error").hidden = false;
    $("submit").disabled = true;
  }

  async function runPreview() {
    const mine = ++seq;
    $("busy").hidden = false;
    $("preview").dataset.pending = "1";
    let body;
    try { body = request(); } catch (e) {
      showError("options must be a JSON object, e.g. {\"lora_r\": 16}: " + e.message);
      $("busy").hidden = true;
      $("preview").dataset.pending = "0";
      return;
    }
    try {
      const data = await api("/api/preview", body);
      if (mine !== seq) return;
      showPreview(data);
    } catch (e) {
      if (mine !== seq) return;
      showError(e.message);
    } finally {
      if (mine === seq) {
        $("busy").hidden = true;
        $("preview").dataset.pending = "0";
        $("preview").dataset.seq = String(mine);
      }
    }
  }

  function showPreview(data) {
    $("error").hidden = true;
    $("sites-count").textContent = fmt(data.sites.length);
    const shared = data.shared_parameters ? " (" + fmt(data.shared_parameters) + " shared)" : "";
    $("params-count").textContent = fmt(data.parameters) + shared;
    $("share").textContent = data.share.toFixed(4) + "%";
    $("patterns").textContent = JSON.stringify(data.patterns, null, 2);
    $("note").hidden = !data.note;
    $("note").textContent = data.note || "";
    const list = $("site-list");
    list.replaceChildren(...data.sites.slice(0, 500).map((s) => make("li", "", s)));
    if (data.sites.length > 500) list.appendChild(make("li", "", "... " + (data.sites.length - 500) + " more"));
    $("submit").disabled = finished || data.sites.length === 0;
  }

  function finish(message) {
    finished = true;
    $("done").textContent = message;
    $("done").hidden = false;
    for (const e of document.querySelectorAll("button, input, select")) e.disabled = true;
  }

  async function submit() {
    try {
      const data = await api("/api/submit", request());
      finish("Submitted " + data.patterns.length + " patterns (" + data.sites.length +
             " sites) to Python. You can close this page.");
      showPreview(data);
    } catch (e) { showError(e.message); }
  }

  async function cancel() {
    try { await api("/api/cancel", {}); finish("Cancelled: nothing was changed. You can close this page."); }
    catch (e) { showError(e.message); }
  }

  function roleButtons() {
    const box = $("roles");
    const roles = Object.keys(state.roles);
    if (roles.length) box.appendChild(make("span", "", "roles:"));
    for (const role of roles) {
      const b = make("button", "", role + " \u00d7" + state.roles[role].length);
      b.type = "button";
      b.dataset.role = role;
      b.addEventListener("click", () => {
        const ids = state.roles[role];
        setNames(ids, !ids.every((i) => selected.has(i)));
      });
      box.appendChild(b);
    }
  }

  async function init() {
    try {
      state = await api("/api/tree", {});
    } catch (e) {
      $("tree").textContent = "Cannot load the tree: " + e.message;
      return;
    }
    names = state.tree.names;
    $("model-name").textContent = state.tree.model;
    $("backbone-count").textContent = fmt(state.backbone_parameters);
    const method = $("method");
    for (const m of state.methods) method.appendChild(make("option", "", m));
    method.value = state.delta_type;
    method.disabled = !state.editable;
    $("options").value = JSON.stringify(state.options);
    $("options").readOnly = !state.editable;
    method.addEventListener("change", schedulePreview);
    $("options").addEventListener("input", schedulePreview);
    $("submit").addEventListener("click", submit);
    $("cancel").addEventListener("click", cancel);
    $("clear").addEventListener("click", () => setNames([...selected], false));
    roleButtons();
    for (const i of state.initial) selected.add(i);
    const ul = make("ul");
    const root = renderNode(state.tree.root, state.tree.root.l, true);
    ul.appendChild(root.li);
    $("tree").replaceChildren(ul);
    setOpen(root.entry, true);
    // open the first levels (the folded layer's template included) so the structure shows at once
    for (let depth = 0; depth < 3; depth++) {
      for (const entry of rendered.slice()) {
        if (!entry.open && entry.node.c && entry.path.split("/").length <= depth + 2) setOpen(entry, true);
      }
    }
    refresh();
    document.body.dataset.loaded = "1";
    await runPreview();
  }

  init();
})();
