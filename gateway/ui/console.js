// vllm-gateway operators' console. Plain JS, no framework, no build step, same origin only.
//
// Data:    GET /gateway/status (polled; re-fetched, throttled, on every event)
// Live:    GET /gateway/events (server-sent events read with fetch(), so the key can go in a
//          header, which EventSource cannot send; JSON {type, model, reason, state, time})
// Actions: POST /gateway/models/{name}/{load?wait=false|unload|sleep|wake|pin|unpin}
// Logs:    GET /gateway/models/{name}/logs?lines=200 -> {model, lines: [...]}
// Keys:    once the gateway has API keys, the admin routes answer 401 without an admin key;
//          the console then asks for one (a form in the page), keeps it in this tab's
//          sessionStorage only (never localStorage, never a URL) and sends it as
//          "Authorization: Bearer <key>" on every call.
//
// Everything from the server reaches the page through textContent or DOM properties, never
// parsed as markup anywhere, and the page's CSP forbids inline script anyway.
"use strict";

(() => {
  const POLL_MS = 3000;          // fallback poll, whatever the event stream does
  const FAST_POLL_MS = 1000;     // while a model is in a transition, or just after an action
  const BURST_MS = 15000;        // how long "just after an action" lasts
  const MIN_REFRESH_GAP_MS = 300; // throttle for event-driven status refreshes
  const EVENTS_RETRY_MAX_MS = 30000;
  const LOG_LINES = 200;
  const TRANSITIONAL = new Set(["starting", "stopping", "loading", "unloading", "sleeping_pending"]);
  // Which actions make sense in which state; a state the console does not know enables all.
  const KNOWN_STATES = new Set(["stopped", "starting", "ready", "stopping", "sleeping", "failed"]);
  const ACTIONS = {
    load: { query: "?wait=false", when: (s) => !["ready", "starting"].includes(s) },
    unload: { when: (s) => !["stopped", "stopping"].includes(s) },
    sleep: { when: (s) => s === "ready" },
    wake: { when: (s) => s === "sleeping" },
    pin: { when: () => true },
    unpin: { when: () => true },
  };
  const ACTION_BUTTONS = ["load", "unload", "sleep", "wake"];
  const KEY_STORAGE = "vllm-gateway.admin-key";

  const $ = (id) => document.getElementById(id);
  const ui = {
    conn: $("conn"), totals: $("totals"), updated: $("updated"),
    notice: $("notice"), noticeText: $("notice-text"), noticeClose: $("notice-close"),
    rows: $("model-rows"),
    logPanel: $("log-panel"), logModel: $("log-model"), logStatus: $("log-status"),
    logLines: $("log-lines"), logFollow: $("log-follow"), logRefresh: $("log-refresh"),
    logClose: $("log-close"),
    auth: $("auth"), authText: $("auth-text"), keyForget: $("key-forget"),
    keyForm: $("key-form"), keyInput: $("key-input"), keyMessage: $("key-message"),
  };

  let status = null;          // the last /gateway/status document
  let statusError = null;     // message of the last failed status fetch, or null
  let skewMs = 0;             // server clock minus ours, when clearly off (Date header)
  let eventsLive = false;
  let events = null;          // the AbortController of the event stream in flight, or null
  let eventsTimer = null;     // the pending reconnect
  let eventsProblem = "";     // why the event stream is down, for the indicator's title
  let eventsRetryMs = 1000;
  let adminKey = readStoredKey();
  let burstUntil = 0;
  let refreshing = null;      // the status fetch in flight
  let refreshAgain = false;
  let refreshTimer = null;
  let lastRefreshAt = 0;
  let logModel = null;
  let logTimer = null;
  let noticeTimer = null;
  const rows = new Map();     // model name -> {tr, cells}
  const busy = new Set();     // models with an action in flight

  // --- small DOM helpers: text only -------------------------------------------------------
  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function setText(node, text) {
    if (node.textContent !== text) node.textContent = text;
  }
  function setTitle(node, text) {
    if (node.title !== text) node.title = text;
  }
  function stateClass(state) {
    return "state state-" + String(state).toLowerCase().replace(/[^a-z0-9_-]/g, "");
  }
  function num(v) {
    return typeof v === "number" && Number.isFinite(v) ? v : null;
  }
  function fmtMiB(v) {
    if (v === null) return "?";
    return v >= 10240 ? (v / 1024).toFixed(1) + " GiB" : Math.round(v) + " MiB";
  }
  function fmtDuration(seconds) {
    const s = Math.max(0, Math.floor(seconds));
    if (s < 60) return s + "s";
    if (s < 3600) return Math.floor(s / 60) + "m " + String(s % 60).padStart(2, "0") + "s";
    if (s < 86400) return Math.floor(s / 3600) + "h " + String(Math.floor(s / 60) % 60).padStart(2, "0") + "m";
    return Math.floor(s / 86400) + "d " + String(Math.floor(s / 3600) % 24).padStart(2, "0") + "h";
  }
  function clock(date) {
    return date.toLocaleTimeString([], { hour12: false });
  }
  // Model names may hold "/" (HF ids) and ":", "@", "+": all legal in a path as they are, and
  // the admin routes take the name raw (the action is the last segment), so only characters
  // outside that set are escaped.
  function modelPath(name, tail) {
    const safe = String(name).replace(/[^A-Za-z0-9._~:@+\/-]/g, (ch) => encodeURIComponent(ch));
    return "/gateway/models/" + safe + "/" + tail;
  }

  // --- the admin key -------------------------------------------------------------------------
  // sessionStorage only: it lasts as long as the tab and is never written anywhere else.
  function readStoredKey() {
    try { return sessionStorage.getItem(KEY_STORAGE) || ""; } catch (e) { return ""; }
  }

  function setKey(key) {
    adminKey = key;
    try {
      if (key) sessionStorage.setItem(KEY_STORAGE, key);
      else sessionStorage.removeItem(KEY_STORAGE);
    } catch (e) { /* storage disabled: the key lasts until the page is left */ }
    ui.auth.hidden = !key;
  }

  function headersFor(key, accept) {
    const h = { Accept: accept, "X-Requested-By": "vllm-gateway-console" };
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  // Show the key form with a message. keep: leave a message already shown (the answer to
  // what the operator last did) in place rather than replace it with "a key is needed".
  function askForKey(message, keep) {
    const wasHidden = ui.keyForm.hidden;
    if (wasHidden || !keep) {
      setText(ui.keyMessage, message);
      ui.keyMessage.classList.toggle("error", Boolean(adminKey) || !keep);
    }
    ui.keyForm.hidden = false;
    if (wasHidden && document.activeElement !== ui.keyInput) ui.keyInput.focus();
    updateConn();
  }

  function keyAccepted() {
    ui.keyForm.hidden = true;
    setText(ui.keyMessage, "");
    setText(ui.authText, "admin key set");
    updateConn();
  }

  // A 401 or 403 answer to a call made with `key`: ask for a (better) key. True when it was
  // about the key. Answers to calls sent with an older key are not about the current one.
  function authRefused(e, key) {
    if (key !== adminKey) return false;
    if (e.status === 401) {
      if (key) {
        setKey("");  // a key the gateway does not know: do not keep sending it
        askForKey("the gateway refused that key (401): " + e.message, false);
      } else {
        askForKey("this gateway needs an admin key (401): " + e.message, true);
      }
      return true;
    }
    if (e.status === 403 && e.code === "admin_forbidden" && key) {
      setText(ui.authText, "key set (not an admin key)");
      askForKey("that key is not an admin key (403): " + e.message
        + ". Enter an admin key (auth.admin_keys) for actions, logs and live updates.", false);
      return true;
    }
    return false;
  }

  function useKey(ev) {
    ev.preventDefault();  // handled here: the form never navigates (CSP form-action 'none')
    const key = ui.keyInput.value.trim();
    if (!key) { askForKey("enter a key", false); return; }
    if (!/^[\x21-\x7e]+$/.test(key)) {
      askForKey("an API key is printable ASCII, without spaces", false);
      return;
    }
    ui.keyInput.value = "";
    setKey(key);
    setText(ui.authText, "admin key set");
    setText(ui.keyMessage, "checking the key…");
    ui.keyMessage.classList.remove("error");
    connectEvents();  // the event stream is an admin route: its answer says if the key is one
    refreshStatus();
  }

  function forgetKey() {
    setKey("");
    askForKey("key forgotten; enter an admin key to use the admin routes", false);
    connectEvents();
    refreshStatus();  // drops what only an admin may see (upstream URLs, error details)
  }

  // --- HTTP ---------------------------------------------------------------------------------
  async function errorFrom(resp) {
    const text = await resp.text().catch(() => "");
    let body = null;
    if (text) {
      try { body = JSON.parse(text); } catch (e) { body = null; }
    }
    const err = body && typeof body === "object" && body.error && typeof body.error === "object" ? body.error : null;
    const message = err && typeof err.message === "string" && err.message
      ? err.message : ("HTTP " + resp.status + (resp.statusText ? " " + resp.statusText : ""));
    const e = new Error(message);
    e.status = resp.status;
    e.code = err && typeof err.code === "string" ? err.code : null;
    return e;
  }

  async function request(method, path) {
    const key = adminKey;
    let resp;
    try {
      resp = await fetch(path, {
        method, cache: "no-store", credentials: "same-origin",
        headers: headersFor(key, "application/json"),
      });
    } catch (e) {
      throw new Error(method + " " + path + ": gateway unreachable (" + e.message + ")");
    }
    if (!resp.ok) {
      const e = await errorFrom(resp);
      authRefused(e, key);
      throw e;
    }
    const text = await resp.text();
    let body = null;
    if (text) {
      try { body = JSON.parse(text); } catch (e) { body = null; }
    }
    return { status: resp.status, body, date: resp.headers.get("date") };
  }

  // --- status: fetch, throttle, render -------------------------------------------------------
  function refreshStatus() {
    if (refreshing) { refreshAgain = true; return refreshing; }
    lastRefreshAt = Date.now();
    refreshing = (async () => {
      try {
        const r = await request("GET", "/gateway/status");
        if (!r.body || typeof r.body !== "object" || typeof r.body.models !== "object") {
          throw new Error("unexpected /gateway/status answer");
        }
        const serverMs = r.date ? Date.parse(r.date) : NaN;
        if (!Number.isNaN(serverMs)) {
          const d = serverMs - Date.now();
          skewMs = Math.abs(d) > 5000 ? d : 0;  // the header has 1 s resolution
        }
        status = r.body;
        statusError = null;
        render();
      } catch (e) {
        statusError = e.message;
        setText(ui.updated, "status failed: " + e.message);
      } finally {
        refreshing = null;
        updateConn();
        if (refreshAgain) { refreshAgain = false; scheduleRefresh(); }
      }
    })();
    return refreshing;
  }

  function scheduleRefresh() {
    if (refreshing) { refreshAgain = true; return; }
    if (refreshTimer !== null) return;
    const wait = Math.max(0, lastRefreshAt + MIN_REFRESH_GAP_MS - Date.now());
    refreshTimer = setTimeout(() => { refreshTimer = null; refreshStatus(); }, wait);
  }

  function anyTransitional() {
    if (!status) return false;
    return Object.values(status.models).some((m) => m && TRANSITIONAL.has(m.state));
  }

  function pollLoop() {
    refreshStatus().finally(() => {
      if (logModel && ui.logFollow.checked) refreshLog();
      const delay = Date.now() < burstUntil || anyTransitional() ? FAST_POLL_MS : POLL_MS;
      setTimeout(pollLoop, delay);
    });
  }

  function render() {
    const models = status.models;
    const names = Object.keys(models);
    const placeholder = ui.rows.querySelector("tr.placeholder");
    if (placeholder) placeholder.remove();
    for (const [name, row] of rows) {
      if (!(name in models)) { row.tr.remove(); rows.delete(name); }
    }
    let prev = null;
    for (const name of names) {
      let row = rows.get(name);
      if (!row) { row = buildRow(name); rows.set(name, row); }
      const want = prev ? prev.nextSibling : ui.rows.firstChild;
      if (row.tr !== want) ui.rows.insertBefore(row.tr, want);
      updateRow(name);
      prev = row.tr;
    }
    if (names.length === 0) {
      const tr = el("tr", "placeholder");
      const td = el("td", "", "no models configured");
      td.colSpan = 8;
      tr.appendChild(td);
      ui.rows.appendChild(tr);
    }
    renderTotals();
    setText(ui.updated, "updated " + clock(new Date()));
  }

  function renderTotals() {
    const t = status.totals || {};
    const parts = [
      "models " + (num(t.models) ?? "?"),
      "running " + (num(t.running) ?? "?"),
      "queued " + (num(t.queue_depth) ?? "?"),
      "in flight " + (num(t.in_flight) ?? "?"),
      "VRAM " + fmtMiB(num(t.vram_reserved_mib)) + " / "
        + (num(t.vram_total_mib) === null ? "no budget" : fmtMiB(num(t.vram_total_mib))),
    ];
    setText(ui.totals, parts.join(" · "));
  }

  function meterCell(td) {
    const text = el("span", "figure");
    const meter = el("meter");
    meter.min = 0;
    td.append(text, meter);
    return { text, meter };
  }

  function setMeter(m, value, max, label) {
    setText(m.text, label);
    if (value === null || max === null || max <= 0) {
      m.meter.hidden = true;
      return;
    }
    m.meter.hidden = false;
    m.meter.max = max;
    m.meter.high = max * 0.8;
    m.meter.low = max * 0.5;
    m.meter.optimum = 0;
    m.meter.value = Math.min(value, max);
  }

  function buildRow(name) {
    const tr = el("tr", "model-row");
    tr.dataset.model = name;
    const td = () => { const c = el("td"); tr.appendChild(c); return c; };

    const nameTd = td();
    nameTd.className = "name";
    const nameBtn = el("button", "model-name link", name);
    nameBtn.type = "button";
    nameBtn.dataset.open = "log";
    nameBtn.title = "show the tail of " + name + "'s server log";
    const backend = el("span", "backend");
    const urls = el("span", "urls");
    urls.title = "upstream server";
    const pinned = el("span", "badge pinned", "pinned");
    nameTd.append(nameBtn, backend, urls, pinned);

    const stateTd = td();
    const state = el("span", "state");
    const stateNote = el("span", "state-note");
    stateTd.append(state, stateNote);

    const queue = meterCell(td());
    const inflight = meterCell(td());
    const vram = meterCell(td());

    const idleTd = td();
    idleTd.className = "idle";
    const idle = el("span", "idle-for");
    const idleLimit = el("span", "idle-limit");
    idleTd.append(idle, idleLimit);

    const errorTd = td();
    errorTd.className = "last-error";
    const errorText = el("span", "error-text");
    errorTd.appendChild(errorText);

    const actionsTd = td();
    actionsTd.className = "actions";
    const buttons = {};
    for (const action of ACTION_BUTTONS) {
      const b = el("button", "action action-" + action, action);
      b.type = "button";
      b.dataset.action = action;
      buttons[action] = b;
      actionsTd.appendChild(b);
    }
    const pin = el("button", "action action-pin", "pin");
    pin.type = "button";
    pin.dataset.action = "pin";
    buttons.pin = pin;
    actionsTd.appendChild(pin);

    return { tr, cells: { nameBtn, backend, urls, pinned, state, stateNote, queue, inflight, vram, idle, idleLimit, errorTd, errorText, buttons } };
  }

  function updateRow(name) {
    const row = rows.get(name);
    const m = status && status.models[name];
    if (!row || !m) return;
    const c = row.cells;
    setText(c.backend, String(m.backend ?? ""));
    const urls = Array.isArray(m.urls) ? m.urls.map(String).join(" ") : "";  // admins only
    setText(c.urls, urls);
    c.urls.hidden = !urls;
    c.pinned.hidden = !m.pinned;
    setText(c.state, String(m.state ?? "unknown"));
    const cls = stateClass(m.state ?? "unknown");
    if (c.state.className !== cls) c.state.className = cls;
    const retry = num(m.retry_in_s);
    setText(c.stateNote, retry === null ? "" : retry > 0 ? "retry in " + fmtDuration(Math.ceil(retry)) : "retry allowed");

    const q = num(m.queue_depth), qmax = num(m.max_queue);
    setMeter(c.queue, q, qmax, (q ?? "?") + " / " + (qmax ?? "?"));
    const f = num(m.in_flight), fmax = num(m.max_concurrent);
    setMeter(c.inflight, f, fmax, (f ?? "?") + " / " + (fmax ?? "?"));
    const v = num(m.vram_mib), vmax = status.totals ? num(status.totals.vram_total_mib) : null;
    setMeter(c.vram, v, vmax, fmtMiB(v) + (vmax === null ? "" : " / " + fmtMiB(vmax)));
    updateIdle(row, m);

    const err = m.last_error === null || m.last_error === undefined ? "" : String(m.last_error);
    setText(c.errorText, err || "—");
    setTitle(c.errorTd, err);
    c.errorTd.classList.toggle("has-error", Boolean(err));

    const known = KNOWN_STATES.has(m.state);
    const noSleep = m.sleep_mode === false;  // only when the status says so
    for (const action of ACTION_BUTTONS) {
      const b = c.buttons[action];
      b.disabled = busy.has(name) || (known && !ACTIONS[action].when(m.state))
        || (noSleep && (action === "sleep" || action === "wake"));
    }
    const pinAction = m.pinned ? "unpin" : "pin";
    c.buttons.pin.dataset.action = pinAction;
    setText(c.buttons.pin, pinAction);
    c.buttons.pin.disabled = busy.has(name);
    row.tr.classList.toggle("busy", busy.has(name));
    row.tr.classList.toggle("selected", name === logModel);
  }

  function updateIdle(row, m) {
    const c = row.cells;
    const last = num(m.last_used);
    if (last === null) {
      setText(c.idle, "never used");
    } else {
      const nowS = (Date.now() + skewMs) / 1000;
      setText(c.idle, fmtDuration(nowS - last));
    }
    const limit = num(m.idle_timeout_s);
    setText(c.idleLimit, limit === null ? "" : limit === 0 ? "no idle stop" : "idle limit " + fmtDuration(limit));
  }

  function tickIdle() {
    if (!status) return;
    for (const [name, row] of rows) {
      const m = status.models[name];
      if (m) updateIdle(row, m);
    }
  }

  // --- live updates -------------------------------------------------------------------------
  function updateConn() {
    let text, cls, title;
    if (!ui.keyForm.hidden && !eventsLive) {
      text = "key needed"; cls = "conn-locked"; title = ui.keyMessage.textContent;
    } else if (statusError !== null) {
      text = "offline"; cls = "conn-offline"; title = "GET /gateway/status failed: " + statusError;
    } else if (eventsLive) {
      text = "live"; cls = "conn-live"; title = "live updates from /gateway/events";
    } else if (events === null && status === null) {
      text = "connecting"; cls = "conn-connecting"; title = "connecting";
    } else {
      text = "reconnecting"; cls = "conn-reconnecting";
      title = "event stream down" + (eventsProblem ? " (" + eventsProblem + ")" : "")
        + "; polling /gateway/status every " + POLL_MS / 1000 + " s meanwhile";
    }
    setText(ui.conn, text);
    setTitle(ui.conn, title);
    const full = "conn " + cls;
    if (ui.conn.className !== full) ui.conn.className = full;
  }

  // (Re)open the event stream, dropping the one in flight. It reconnects by itself, backing
  // off, whenever the stream ends or fails, except when the gateway refused the key: then it
  // waits for one to be entered (useKey calls this again).
  function connectEvents() {
    clearTimeout(eventsTimer);
    eventsTimer = null;
    if (events) events.abort();
    const ctl = new AbortController();
    events = ctl;
    eventsLive = false;
    updateConn();
    readEvents(ctl).then((retry) => {
      if (events !== ctl) return;  // replaced by a newer stream
      eventsLive = false;
      updateConn();
      if (!retry) return;
      eventsTimer = setTimeout(connectEvents, eventsRetryMs);
      eventsRetryMs = Math.min(eventsRetryMs * 2, EVENTS_RETRY_MAX_MS);
    });
  }

  // One stream: GET /gateway/events, its body read as server-sent events. Resolves to
  // whether to reconnect.
  async function readEvents(ctl) {
    const key = adminKey;
    let resp;
    try {
      resp = await fetch("/gateway/events", {
        cache: "no-store", credentials: "same-origin", signal: ctl.signal,
        headers: headersFor(key, "text/event-stream"),
      });
    } catch (e) {
      eventsProblem = "gateway unreachable";
      return true;
    }
    if (!resp.ok) {
      const e = await errorFrom(resp);
      eventsProblem = e.message;
      return !authRefused(e, key);
    }
    if (!resp.body || !(resp.headers.get("content-type") || "").startsWith("text/event-stream")) {
      eventsProblem = "not an event stream";
      return true;
    }
    eventsProblem = "";
    eventsRetryMs = 1000;
    eventsLive = true;
    if (key === adminKey) keyAccepted();  // an admin route answered: the key (if any) is good
    updateConn();
    scheduleRefresh();  // events sent while we were away are lost: catch up
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    const parse = sseParser(onEvent);
    try {
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        parse(decoder.decode(value, { stream: true }));
      }
      eventsProblem = "the gateway ended the stream";
    } catch (e) {
      eventsProblem = "stream broken";
    }
    return true;
  }

  // Server-sent events, as far as the gateway sends them: "data:" lines, ended by an empty
  // line, make one message; ":" lines are comments (keep-alives); other fields are ignored.
  function sseParser(onMessage) {
    let buffer = "";
    let data = [];
    return (chunk) => {
      buffer += chunk;
      const lines = buffer.split(/\r\n|\r|\n/);
      buffer = lines.pop();  // an incomplete line waits for the next chunk
      for (const line of lines) {
        if (line === "") {
          if (data.length) onMessage(data.join("\n"));
          data = [];
        } else if (line.startsWith("data:")) {
          data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
        }
      }
    };
  }

  function onEvent(data) {
    let ev;
    try { ev = JSON.parse(data); } catch (e) { return; }
    if (!ev || typeof ev !== "object") return;
    const name = typeof ev.model === "string" ? ev.model : null;
    if (name && typeof ev.state === "string" && ev.state && status && status.models[name]) {
      status.models[name].state = ev.state;  // show it now; the refresh below fills the rest
      updateRow(name);
    }
    scheduleRefresh();
    if (name && name === logModel && ui.logFollow.checked) scheduleLogRefresh();
  }

  // --- actions ------------------------------------------------------------------------------
  async function runAction(name, action) {
    const spec = ACTIONS[action];
    if (!spec || busy.has(name)) return;
    busy.add(name);
    updateRow(name);
    try {
      const r = await request("POST", modelPath(name, action + (spec.query || "")));
      const detail = r.status === 202 ? "accepted" : "done";
      notify(action + " " + name + ": " + detail, "ok");
    } catch (e) {
      notify(action + " " + name + " failed: " + e.message, "error");
    } finally {
      busy.delete(name);
      burstUntil = Date.now() + BURST_MS;
      updateRow(name);
      refreshStatus();
    }
  }

  function notify(text, kind) {
    setText(ui.noticeText, text);
    ui.notice.className = "notice notice-" + kind;
    ui.notice.dataset.kind = kind;
    ui.notice.hidden = false;
    clearTimeout(noticeTimer);
    if (kind === "ok") noticeTimer = setTimeout(() => { ui.notice.hidden = true; }, 6000);
  }

  // --- log panel ----------------------------------------------------------------------------
  function openLog(name) {
    logModel = name;
    setText(ui.logModel, name);
    ui.logLines.textContent = "";
    ui.logPanel.hidden = false;
    for (const n of rows.keys()) updateRow(n);
    refreshLog(true);
  }

  function closeLog() {
    logModel = null;
    ui.logPanel.hidden = true;
    for (const n of rows.keys()) updateRow(n);
  }

  function scheduleLogRefresh() {
    if (logTimer !== null) return;
    logTimer = setTimeout(() => { logTimer = null; refreshLog(); }, 1000);
  }

  async function refreshLog(scrollToEnd) {
    const name = logModel;
    if (!name) return;
    ui.logStatus.classList.remove("error");
    setText(ui.logStatus, "loading…");
    const pre = ui.logLines;
    const atEnd = scrollToEnd || ui.logFollow.checked || pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    try {
      const r = await request("GET", modelPath(name, "logs?lines=" + LOG_LINES));
      if (name !== logModel) return;
      const lines = r.body && Array.isArray(r.body.lines) ? r.body.lines : [];
      const text = lines.map((l) => String(l).replace(/\r?\n$/, "")).join("\n");
      setText(pre, text);
      setText(ui.logStatus, (lines.length ? lines.length + " lines" : "no output") + " · " + clock(new Date()));
      if (atEnd) pre.scrollTop = pre.scrollHeight;
    } catch (e) {
      if (name !== logModel) return;
      pre.textContent = "";
      ui.logStatus.classList.add("error");
      setText(ui.logStatus, "error: " + e.message);
    }
  }

  // --- wiring -------------------------------------------------------------------------------
  ui.rows.addEventListener("click", (ev) => {
    const target = ev.target instanceof Element ? ev.target.closest("button") : null;
    const tr = target ? target.closest("tr[data-model]") : null;
    if (!target || !tr) return;
    const name = tr.dataset.model;
    if (target.dataset.action) runAction(name, target.dataset.action);
    else if (target.dataset.open === "log") openLog(name);
  });
  ui.noticeClose.addEventListener("click", () => { ui.notice.hidden = true; });
  ui.keyForm.addEventListener("submit", useKey);
  ui.keyForget.addEventListener("click", forgetKey);
  ui.logRefresh.addEventListener("click", () => refreshLog());
  ui.logClose.addEventListener("click", closeLog);
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) scheduleRefresh();
  });

  ui.auth.hidden = !adminKey;
  updateConn();
  connectEvents();
  pollLoop();
  setInterval(tickIdle, 1000);
})();
