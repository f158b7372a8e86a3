// gpuctl status page. Plain JavaScript, no build step, no third-party code.
// The key is sent once to POST /ui/session; afterwards an HttpOnly cookie (which this script
// cannot read) carries the session, and the CSRF token lives only in this page's memory.
// Live data comes from GET /ui/events (server-sent events): a full snapshot now and after each
// change. Snapshots hold instants, so countdowns tick here, once a second.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  let csrf = null;
  let me = null;
  let source = null;
  let state = null;
  let offset = 0; // server clock minus ours, seconds
  let retryTimer = null;

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") node.className = value;
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  async function api(method, path, body) {
    const headers = { Accept: "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (csrf && method !== "GET") headers["X-CSRF-Token"] = csrf;
    const response = await fetch(path, {
      method, headers, credentials: "same-origin",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    let data = null;
    try { data = await response.json(); } catch (e) { data = null; }
    return { ok: response.ok, status: response.status, data };
  }

  function errorText(data, fallback) {
    if (data && typeof data.error === "string") return data.error;
    if (data && data.error && data.error.message) return data.error.message;
    return fallback;
  }

  // -- time ------------------------------------------------------------------------------

  const serverNow = () => Date.now() / 1000 + offset;

  function duration(seconds) {
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return `${s} s`;
    if (s < 3600) {
      const m = Math.floor(s / 60);
      const r = s % 60;
      return r ? `${m} min ${r} s` : `${m} min`;
    }
    const h = Math.floor(s / 3600);
    return `${h} h ${Math.floor((s % 3600) / 60)} min`;
  }

  function clock(at) {
    return new Date(at * 1000).toLocaleTimeString([], { hour12: false });
  }

  // A span whose text is recomputed every second from an instant.
  function ticking(kind, at, extra) {
    const span = el("span", { "data-tick": kind, "data-at": at, "data-extra": extra });
    span.textContent = tickText(span);
    return span;
  }

  function tickText(span) {
    const at = Number(span.dataset.at);
    const kind = span.dataset.tick;
    if (kind === "left") return `${duration(at - serverNow())} left`;
    if (kind === "since") return duration(serverNow() - at);
    if (kind === "wake") {
      const estimate = Number(span.dataset.extra);
      const elapsed = duration(serverNow() - at);
      return Number.isFinite(estimate) && span.dataset.extra !== ""
        ? `${elapsed} of about ${duration(estimate)}` : elapsed;
    }
    return "";
  }

  function tick() {
    for (const span of document.querySelectorAll("[data-tick]")) span.textContent = tickText(span);
  }

  // -- rendering -------------------------------------------------------------------------

  const STAGES = {
    resuming: "the cloud is resuming it",
    running: "running, Ollama starting",
    ollama_ready: "Ollama ready",
  };

  function shownState(gpu) {
    if (gpu.state === "starting") return gpu.action && gpu.action.kind === "resume" ? "waking" : "starting";
    if (gpu.state === "idle") return "ready";
    if (gpu.state === "active" || gpu.state === "busy") return "serving";
    return gpu.state; // paused, pausing, unavailable
  }

  function badgeText(gpu, shown) {
    if (shown === "serving") return gpu.serving.includes(me.name) ? "serving you" : "serving";
    return shown;
  }

  function gpuCard(gpu) {
    const shown = shownState(gpu);
    const leasedToMe = gpu.leases.some((l) => l.user === me.name);
    const detail = [];
    if (gpu.action && gpu.action.kind === "resume" && shown === "waking") {
      detail.push(`waking: ${STAGES[gpu.action.stage] || "asking the cloud"} · `,
        ticking("wake", gpu.action.started_at, gpu.action.estimate_seconds ?? ""));
    } else if (gpu.action && gpu.action.kind === "pause" && shown === "pausing") {
      detail.push("pausing: ", ticking("since", gpu.action.started_at));
    } else if (gpu.state === "paused" && gpu.estimated_resume_seconds) {
      detail.push(`wakes in about ${duration(gpu.estimated_resume_seconds)}`);
    }
    if (gpu.last_error && gpu.state === "unavailable") detail.push(gpu.last_error);
    const rows = [
      ["models", gpu.models.length ? gpu.models.map((m) =>
        gpu.loaded.includes(m) ? `${m} (loaded)` : m).join(", ") : "unknown until first seen awake"],
      ["slots", `${gpu.slots_in_use} of ${gpu.slots} in use`],
    ];
    if (gpu.serving.length) {
      rows.push(["serving", gpu.serving.map((u) => (u === me.name ? "you" : u)).join(", ")]);
    }
    const leases = gpu.leases.map((l) => el("span", { class: l.user === me.name ? "you" : null },
      `${l.user === me.name ? "you" : l.user} · `, ticking("left", l.expires_at)));
    const leaseCell = leases.length ? leases.flatMap((x, i) => (i ? [", ", x] : [x])) : ["none"];
    const card = el("article", {
      class: "gpu", "data-gpu": gpu.name, "data-state": shown,
      "data-serving-you": gpu.serving.includes(me.name) ? "true" : null,
      "data-leased": gpu.leases.length ? "true" : null,
      "data-leased-to-you": leasedToMe ? "true" : null,
      "aria-label": `${gpu.name}: ${badgeText(gpu, shown)}`,
    },
    el("h3", {}, gpu.name, el("span", { class: "badge" }, badgeText(gpu, shown))),
    el("p", { class: "detail" }, detail.length ? detail : (gpu.flavor || "")),
    el("dl", {}, rows.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]),
      el("dt", {}, "leases"), el("dd", { class: "leases" }, leaseCell)));
    if (me.admin) {
      const busy = !!gpu.action;
      card.append(el("div", { class: "actions" },
        el("button", { type: "button", "data-action": "resume", "data-target": gpu.name,
          disabled: busy || !gpu.can_resume || gpu.state !== "paused",
          onclick: () => act("resume", gpu.name) }, `Resume ${gpu.name}`),
        el("button", { type: "button", class: "secondary", "data-action": "pause",
          "data-target": gpu.name,
          disabled: busy || !gpu.can_pause || gpu.state === "paused",
          onclick: () => act("pause", gpu.name) }, `Pause ${gpu.name}`)));
    }
    return card;
  }

  function table(headers, rows, empty) {
    if (!rows.length) return el("p", { class: "empty" }, empty);
    return el("table", {},
      el("thead", {}, el("tr", {}, headers.map(([h, cls]) => el("th", { scope: "col", class: cls }, h)))),
      el("tbody", {}, rows));
  }

  function render() {
    const fleet = state.fleet;
    // Keep keyboard focus on the same button across a re-render.
    const focused = document.activeElement;
    const focusKey = focused && focused.dataset && focused.dataset.action
      ? [focused.dataset.action, focused.dataset.target] : null;
    $("gpus").replaceChildren(...fleet.gpus.map(gpuCard));
    if (focusKey) {
      const again = document.querySelector(
        `button[data-action="${focusKey[0]}"][data-target="${CSS.escape(focusKey[1])}"]`);
      if (again && !again.disabled) again.focus();
    }
    $("queue").replaceChildren(table(
      [["model"], ["waiting", "num"], ["longest wait", "num"], ["about", "num"], ["you"]],
      fleet.queue.map((q) => el("tr", { "data-model": q.model },
        el("td", {}, q.model), el("td", { class: "num" }, q.waiting),
        el("td", { class: "num" }, ticking("since", q.since)),
        el("td", { class: "num" }, duration(q.estimate_seconds)),
        el("td", {}, q.users.includes(me.name)
          ? `number ${q.users.indexOf(me.name) + 1} in line` : (me.admin ? q.users.join(", ") : "-")))),
      "Nobody is waiting."));
    const timeline = state.timeline;
    $("timeline-panel").hidden = !timeline;
    if (timeline) {
      $("timeline").replaceChildren(...timeline.slice(0, 50).map((e) => el("li", {},
        el("time", {}, clock(e.at)), `${e.gpu}: ${e.previous ? `${e.previous} → ` : ""}${e.state}`)));
    }
  }

  function apply(next) {
    state = next;
    offset = next.fleet.at - Date.now() / 1000;
    render();
    if (lastUsage) renderUsage(lastUsage); // GPU names for the requests table
    usageSoon();
  }

  // -- usage, from the ledger (GET /ui/usage): on sign-in, a second after a change, each minute

  let usageTimer = null;
  let usagePending = null;

  function usageSoon() {
    if (!usagePending) usagePending = setTimeout(() => { usagePending = null; loadUsage(); }, 1000);
  }

  async function loadUsage() {
    try {
      const r = await api("GET", "/ui/usage");
      if (r.ok && me) renderUsage(r.data);
    } catch (e) { /* the gateway is away; the stream says so */ }
  }

  function fleetLine(report) {
    const saved = report.always_on_hours > 0 ? `, ${Math.round(report.savings * 100)}% saved` : "";
    const hours = (h) => h.toFixed(h < 10 ? 3 : 1);
    return `The fleet billed ${hours(report.billed_hours)} GPU-hours of ` +
      `${hours(report.always_on_hours)} always-on${saved}.`;
  }

  function usageTable(report) {
    return table(
      [["user"], ["requests", "num"], ["tokens in", "num"], ["tokens out", "num"],
        ["GPU-hours", "num"], ["credits", "num"]],
      report.rows.map((u) => el("tr", { "data-user": u.user, class: u.user === me.name ? "you" : null },
        el("td", {}, u.user), el("td", { class: "num" }, u.requests),
        el("td", { class: "num" }, u.tokens_in), el("td", { class: "num" }, u.tokens_out),
        el("td", { class: "num" }, u.gpu_hours.toFixed(3)), el("td", { class: "num" }, u.credits.toFixed(2)))),
      "No requests yet.");
  }

  let lastUsage = null;

  function renderUsage(u) {
    lastUsage = u;
    $("usage-title").textContent = me.admin ? "Usage today, by user" : "Your usage today";
    $("usage-fleet").textContent = fleetLine(u.today);
    $("usage").replaceChildren(usageTable(u.today));
    $("month-title").textContent = me.admin ? "This month, by user" : "Your usage this month";
    $("month-fleet").textContent = fleetLine(u.month);
    $("usage-month").replaceChildren(usageTable(u.month));
    const names = {};
    if (state) for (const g of state.fleet.gpus) names[g.id] = g.name;
    $("requests-title").textContent = me.admin ? "Requests today" : "Your requests today";
    $("requests").replaceChildren(table(
      [["time"], ["user"], ["model"], ["GPU"], ["waited", "num"], ["served", "num"], ["tokens", "num"], ["outcome"]],
      u.requests.map((q) => el("tr", {},
        el("td", {}, clock(q.at)), el("td", {}, q.user === me.name ? "you" : q.user), el("td", {}, q.model),
        el("td", {}, names[q.gpu] || q.gpu || "-"),
        el("td", { class: "num" }, `${duration(q.queued_s)}${q.cold ? " (woke a GPU)" : ""}`),
        el("td", { class: "num" }, duration(q.service_s)), el("td", { class: "num" }, q.tokens_out),
        el("td", {}, q.outcome))),
      "No requests today."));
    $("chart-panel").hidden = !u.days;
    if (u.days) chart(u.days);
  }

  const PALETTE = ["#0b5cad", "#b35c00", "#1b7f3b", "#7b3fa0", "#a4161a", "#00707a", "#6b5b00", "#c2185b"];
  const SVG = "http://www.w3.org/2000/svg";

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
    for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return node;
  }

  function chart(days) {
    const users = [...new Set(days.flatMap((d) => Object.keys(d.users)))].sort();
    const color = (user) => PALETTE[users.indexOf(user) % PALETTE.length];
    const W = 700, H = 240, left = 36, bottom = 22, top = 10;
    const top_ = Math.max(0.01, ...days.map((d) => Math.max(d.always_on_hours, d.billed_hours)));
    const y = (h) => top + (H - top - bottom) * (1 - h / top_);
    const slot = (W - left) / days.length;
    const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img",
      "aria-label": `GPU-hours per day for the last ${days.length} days, by user, against the always-on line` });
    for (const frac of [0, 0.5, 1]) {
      root.append(svg("text", { x: 2, y: y(top_ * frac) + 4 }, (top_ * frac).toFixed(1)));
    }
    days.forEach((d, i) => {
      const x = left + i * slot + slot * 0.15;
      let base = 0;
      for (const user of users) {
        const h = d.users[user] || 0;
        if (h <= 0) continue;
        root.append(svg("rect", { x, y: y(base + h), width: slot * 0.7, height: y(base) - y(base + h),
          fill: color(user), "data-user": user, "data-day": d.day },
          svg("title", {}, `${d.day} ${user}: ${h.toFixed(2)} GPU-h`)));
        base += h;
      }
      const rest = d.billed_hours - base;
      if (rest > 0.0005) {
        root.append(svg("rect", { x, y: y(base + rest), width: slot * 0.7, height: y(base) - y(base + rest),
          fill: "#9aa3ae" }, svg("title", {}, `${d.day} unattributed: ${rest.toFixed(2)} GPU-h`)));
      }
      if (i % 2 === days.length % 2 || days.length <= 7) {
        root.append(svg("text", { x: x, y: H - 6 }, d.day.slice(5)));
      }
    });
    const points = days.map((d, i) => `${left + (i + 0.5) * slot},${y(d.always_on_hours)}`).join(" ");
    root.append(svg("polyline", { points, class: "always-on" },
      svg("title", {}, "always on: what the fleet would have billed never pausing")));
    $("chart").replaceChildren(root);
    $("chart-legend").replaceChildren(...users.map((u) => el("li", {},
      el("span", { class: "swatch", style: null, "data-color": color(u) }), u)),
      el("li", {}, el("span", { class: "swatch", "data-color": "#9aa3ae" }), "unattributed"),
      el("li", {}, "- - always on"));
    for (const swatch of $("chart-legend").querySelectorAll(".swatch")) {
      swatch.style.background = swatch.dataset.color; // CSSOM, allowed by the page's CSP
    }
  }

  // -- the live stream -----------------------------------------------------------------------

  function setLive(live) {
    const conn = $("conn");
    conn.hidden = false;
    conn.className = live ? "conn live" : "conn";
    conn.textContent = live ? "live" : "reconnecting…";
    conn.dataset.live = live ? "true" : "false";
  }

  function connect() {
    if (source) source.close();
    clearTimeout(retryTimer);
    source = new EventSource("/ui/events");
    source.addEventListener("state", (event) => { setLive(true); apply(JSON.parse(event.data)); });
    source.addEventListener("signed-out", () => {
      source.close();
      signedOut("Your session ended (signed out or key revoked). Sign in again.");
    });
    source.onerror = () => {
      setLive(false);
      // CLOSED: the server refused the stream (a limit, a lost session): ask what happened.
      if (source.readyState === EventSource.CLOSED) retryTimer = setTimeout(recheck, 2000);
    };
  }

  async function recheck() {
    try {
      const r = await api("GET", "/ui/session");
      if (r.ok && r.data && r.data.signed_in) { signedIn(r.data); return; }
      if (r.ok) { signedOut("Your session ended. Sign in again."); return; }
    } catch (e) { /* the gateway is away: try again */ }
    retryTimer = setTimeout(recheck, 2000);
  }

  // -- signing in and out ---------------------------------------------------------------------

  function signedIn(who) {
    me = { name: who.name, admin: who.admin };
    csrf = who.csrf;
    $("me").textContent = `${who.name}${who.admin ? " (admin)" : ""}`;
    $("who").hidden = false;
    $("signin-panel").hidden = true;
    $("fleet-panel").hidden = false;
    connect();
    loadUsage();
    clearInterval(usageTimer);
    usageTimer = setInterval(loadUsage, 60000);
  }

  function signedOut(message) {
    if (source) { source.close(); source = null; }
    clearInterval(usageTimer);
    me = null; csrf = null; state = null; lastUsage = null;
    $("who").hidden = true;
    $("conn").hidden = true;
    $("fleet-panel").hidden = true;
    $("signin-panel").hidden = false;
    $("signin-error").textContent = message || "";
    $("key").focus();
  }

  async function act(action, gpu) {
    $("action-msg").textContent = `${action === "resume" ? "Resuming" : "Pausing"} ${gpu}…`;
    const r = await api("POST", `/ui/gpu/${encodeURIComponent(gpu)}/${action}`);
    $("action-msg").textContent = r.ok ? r.data.message : errorText(r.data, `failed (HTTP ${r.status})`);
  }

  $("signin").addEventListener("submit", async (event) => {
    event.preventDefault();
    const input = $("key");
    const r = await api("POST", "/ui/session", { key: input.value });
    input.value = "";
    if (r.ok) { $("signin-error").textContent = ""; signedIn(r.data); }
    else $("signin-error").textContent = errorText(r.data, `sign-in failed (HTTP ${r.status})`);
  });

  $("signout").addEventListener("click", async () => {
    await api("DELETE", "/ui/session");
    signedOut("Signed out.");
  });

  setInterval(() => { if (state) tick(); }, 1000);
  recheck();
})();
