// tinysft web page: two answers side by side from the OpenAI-compatible API (streamed), blind votes,
// the before/after report. Plain JS, no dependencies; every text from the server is set with
// textContent, never parsed as HTML.
"use strict";

const $ = (sel) => document.querySelector(sel);
const el = (tag, cls, text) => {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
};

const state = {
  config: null,
  history: { reference: [], candidate: [] }, // each side keeps its own conversation
  shown: { A: "reference", B: "candidate" }, // which side each column shows
  turn: null, // the latest exchange: {history, answers, voted}
  busy: false,
  timings: [], // per send: ms from sending to the first token of each column (read by tests)
};
window.tinysft = state;

// ---- compare ----------------------------------------------------------------------------------------
function blind() { return $("#blind").checked; }

function newConversation() {
  if (blind() && state.history.reference.length) {
    const [a, b] = ["A", "B"].map((c) => state.config.sides[state.shown[c]].label);
    $("#reveal").textContent = `Last conversation: A was ${a}, B was ${b}.`;
    $("#reveal").hidden = false;
  } else {
    $("#reveal").hidden = true;
  }
  state.history = { reference: [], candidate: [] };
  state.turn = null;
  const flip = blind() && Math.random() < 0.5;
  state.shown = flip ? { A: "candidate", B: "reference" } : { A: "reference", B: "candidate" };
  for (const col of ["A", "B"]) {
    const column = $(`#col-${col}`);
    column.querySelector(".turns").replaceChildren();
    column.querySelector(".side-label").textContent = blind() ? col : state.config.sides[state.shown[col]].label;
    column.classList.toggle("side-reference", !blind() && state.shown[col] === "reference");
    column.classList.toggle("side-candidate", !blind() && state.shown[col] === "candidate");
  }
  $("#vote").hidden = true;
  $("#vote-status").textContent = "";
}

function settings() {
  const temperature = Number($("#temperature").value);
  const maxTokens = Number($("#max-tokens").value);
  if (!(temperature >= 0 && temperature <= 2)) throw new Error("temperature must be between 0 and 2");
  if (!Number.isInteger(maxTokens) || maxTokens < 1 || maxTokens > state.config.max_tokens) {
    throw new Error(`max tokens must be a whole number from 1 to ${state.config.max_tokens}`);
  }
  return { temperature, max_tokens: maxTokens };
}

async function errorText(resp) {
  try {
    const body = await resp.json();
    return (body.error && body.error.message) || `HTTP ${resp.status}`;
  } catch (_e) {
    return `HTTP ${resp.status}`;
  }
}

// Streams one side's answer into `box`; resolves to the answer text (throws with the server's message).
async function streamAnswer(side, messages, opts, box, sentAt, timing, col) {
  const resp = await fetch(`${side.url}/chat/completions`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ model: side.model, messages, stream: true, ...opts }),
  });
  if (!resp.ok) throw new Error(await errorText(resp));
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", text = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) { // one server-sent event per blank-line-ended block
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const chunk = JSON.parse(line.slice(6));
        if (chunk.error) throw new Error(chunk.error.message);
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta.content;
        if (delta) {
          if (timing[col] === undefined) {
            timing[col] = performance.now() - sentAt;
            box.dataset.firstTokenMs = timing[col].toFixed(0);
          }
          text += delta;
          box.textContent = text;
          box.dataset.deltas = String(Number(box.dataset.deltas || 0) + 1);
        }
      }
    }
  }
  box.classList.remove("streaming");
  box.dataset.doneMs = (performance.now() - sentAt).toFixed(0);
  box.dataset.done = "1";
  return text;
}

async function send(prompt) {
  let opts;
  try {
    opts = settings();
  } catch (e) {
    $("#vote-status").textContent = e.message;
    return;
  }
  state.busy = true;
  $("#send").disabled = true;
  $("#blind").disabled = true;
  $("#vote").hidden = true;
  $("#vote-status").textContent = "";
  $("#reveal").hidden = true;
  const turn = { history: {}, answers: {}, voted: false, settings: opts };
  const timing = {};
  state.timings.push(timing);
  const sentAt = performance.now();
  const jobs = ["A", "B"].map((col) => {
    const key = state.shown[col];
    state.history[key].push({ role: "user", content: prompt });
    turn.history[key] = state.history[key].map((m) => ({ ...m }));
    const turns = $(`#col-${col} .turns`);
    turns.append(el("div", "msg user", prompt));
    const box = el("div", "msg assistant streaming");
    box.dataset.side = col;
    turns.append(box);
    return streamAnswer(state.config.sides[key], turn.history[key], opts, box, sentAt, timing, col)
      .then((text) => { turn.answers[key] = text; state.history[key].push({ role: "assistant", content: text }); })
      .catch((e) => {
        state.history[key].pop(); // unanswered: the next prompt continues from the last answered turn
        box.classList.remove("streaming");
        box.classList.add("error");
        box.textContent = e.message;
      });
  });
  await Promise.all(jobs);
  state.turn = turn;
  state.busy = false;
  $("#send").disabled = false;
  $("#blind").disabled = false;
  const answered = "reference" in turn.answers && "candidate" in turn.answers;
  $("#vote").hidden = !(blind() && answered);
}

async function vote(pick) {
  const turn = state.turn;
  if (!turn || turn.voted) return;
  turn.voted = true;
  $("#vote").hidden = true;
  const resp = await fetch("/ui/api/votes", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ history: turn.history, answers: turn.answers, shown: state.shown, pick,
                           settings: turn.settings }),
  });
  if (!resp.ok) {
    turn.voted = false;
    $("#vote").hidden = false;
    $("#vote-status").textContent = `The vote was not recorded: ${await errorText(resp)}`;
    return;
  }
  const body = await resp.json();
  showTally(body.tally);
  $("#vote-status").textContent = "Vote recorded. Which side was which is shown when you start a new conversation.";
}

function pct(x) { return `${Math.round(100 * x)}%`; }

function showTally(t) {
  const names = state.config.sides;
  const cand = names.candidate.label, ref = names.reference.label;
  const rest = `${t.ties} tie${t.ties === 1 ? "" : "s"}, ${t.both_bad} both bad`;
  $("#tally").textContent = t.decided
    ? `${cand} wins ${pct(t.win_rate)} of ${t.decided} decided vote${t.decided === 1 ? "" : "s"} against ${ref} ` +
      `(95% CI ${pct(t.ci95[0])}–${pct(t.ci95[1])}); ${rest}`
    : `No decided votes yet (${rest}).`;
  $("#tally").dataset.votes = String(t.votes);
}

// ---- report -------------------------------------------------------------------------------------------
let report = null;
let lossTimer = null;

function fmt(v) {
  if (typeof v !== "number") return v === null || v === undefined ? "—" : String(v);
  return Number.isInteger(v) ? String(v) : v.toFixed(Math.abs(v) < 10 ? 3 : 1);
}

function runIndex() { return Number($("#report-run").value || 0); }

async function loadReport() {
  report = null;
  for (const id of ["#summary", "#flipped", "#rows"]) $(id).replaceChildren();
  const resp = await fetch(`/ui/api/report?run=${runIndex()}`);
  if (!resp.ok) {
    $("#report-note").textContent = await errorText(resp);
  } else {
    report = await resp.json();
    $("#report-note").textContent = `${report.title || "report"} · ${report.created || ""}`;
    const select = $("#category");
    select.replaceChildren(el("option", "", "all"));
    select.firstChild.value = "";
    for (const cat of Object.keys(report.by_category || {})) {
      const o = el("option", "", cat);
      o.value = cat;
      select.append(o);
    }
    renderReport();
  }
  await loadLoss();
}

function renderReport() {
  if (!report) return;
  const cat = $("#category").value;
  const inCat = (r) => !cat || (r.category || "(none)") === cat;
  const figures = cat ? (report.by_category[cat] || {}) : report.metrics;
  const labels = report.metric_labels || {};
  const table = el("table");
  const head = el("tr");
  for (const h of ["", "base", "tuned"]) head.append(el("th", "", h));
  table.append(head);
  const keys = Object.keys(figures.base || {}).filter((k) => !k.startsWith("n_") && (labels[k] || cat));
  for (const k of keys) {
    const tr = el("tr");
    tr.append(el("td", "", labels[k] || k), el("td", "num", fmt(figures.base[k])),
              el("td", "num", fmt((figures.tuned || {})[k])));
    table.append(tr);
  }
  $("#summary").replaceChildren(el("h2", "", cat ? `Category: ${cat}` : "Summary"), table);

  const rows = report.rows || [];
  const flips = (report.flipped || []).filter((f) => inCat(rows[f.row] || {}));
  const list = el("ul");
  for (const f of flips) {
    const li = el("li");
    li.append(el("span", `chip ${f.better ? "better" : "worse"}`, f.kind), document.createTextNode(` ${f.prompt}`));
    list.append(li);
  }
  $("#flipped").replaceChildren(el("h2", "", `Examples that flipped (${flips.length})`), list);

  const cards = rows.filter(inCat).slice(0, 200).map((r) => {
    const card = el("details", "card");
    const summary = el("summary", "", r.prompt);
    if (r.category) summary.append(el("span", "chip", r.category));
    for (const f of r.flips || []) summary.append(el("span", `chip ${f.better ? "better" : "worse"}`, f.kind));
    const pair = el("div", "pair");
    pair.append(el("div", "msg base", r.base_answer || ""), el("div", "msg tuned", r.tuned_answer || ""));
    card.append(summary, pair);
    return card;
  });
  $("#rows").replaceChildren(el("h2", "", `Answers (${rows.filter(inCat).length})`), ...cards);
}

async function loadLoss() {
  const resp = await fetch(`/ui/api/metrics?run=${runIndex()}`);
  if (!resp.ok) { $("#loss-note").textContent = await errorText(resp); return; }
  const body = await resp.json();
  drawLoss(body.history);
  $("#loss-note").textContent = body.history.length
    ? `${body.history.length} logged steps${body.finished ? "" : " · still training: the curve updates as metrics.jsonl grows"}`
    : "No metrics.jsonl in this run yet.";
}

function drawLoss(history) {
  const svg = $("#loss");
  svg.replaceChildren();
  const series = [["loss", "train"], ["eval_loss", "eval"]].map(([key, name]) =>
    ({ name, pts: history.filter((h) => typeof h[key] === "number").map((h) => [h.step, h[key]]) }));
  const all = series.flatMap((s) => s.pts);
  if (!all.length) return;
  const W = 600, H = 220, L = 44, R = 10, T = 10, B = 26;
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs) || 1], [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  const sx = (x) => L + (x1 === x0 ? 0.5 : (x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => T + (y1 === y0 ? 0.5 : 1 - (y - y0) / (y1 - y0)) * (H - T - B);
  const ns = "http://www.w3.org/2000/svg";
  const add = (tag, attrs, text) => {
    const e = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    svg.append(e);
  };
  add("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" });
  add("line", { x1: L, y1: T, x2: L, y2: H - B, class: "axis" });
  add("text", { x: L - 4, y: T + 10, "text-anchor": "end", class: "tick" }, fmt(y1));
  add("text", { x: L - 4, y: H - B, "text-anchor": "end", class: "tick" }, fmt(y0));
  add("text", { x: W - R, y: H - 6, "text-anchor": "end", class: "tick" }, `step ${x1}`);
  series.forEach((s, i) => {
    if (!s.pts.length) return;
    add("polyline", { points: s.pts.map(([x, y]) => `${sx(x)},${sy(y)}`).join(" "), class: `curve c${i}` });
    if (s.pts.length < 60) for (const [x, y] of s.pts) add("circle", { cx: sx(x), cy: sy(y), r: 3, class: `dot c${i}` });
    add("text", { x: W - R - 60 * (2 - i), y: T + 12, class: `legend c${i}` }, s.name);
  });
}

// ---- wiring -------------------------------------------------------------------------------------------
function showView(view) {
  for (const v of ["compare", "report"]) {
    $(`#${v}`).hidden = v !== view;
    $(`#tab-${v}`).classList.toggle("active", v === view);
  }
  clearInterval(lossTimer);
  if (view === "report") {
    loadReport();
    lossTimer = setInterval(loadLoss, 3000); // a run still training: its curve grows
  }
}

async function main() {
  const resp = await fetch("/ui/api/config");
  if (!resp.ok) { document.body.textContent = await errorText(resp); return; }
  state.config = await resp.json();
  const c = state.config;
  $("#runs").textContent = `${c.sides.reference.label} vs ${c.sides.candidate.label} · ${c.runs.join(", ")}`;
  $("#max-tokens").max = String(c.max_tokens);
  $("#max-tokens").value = String(c.default_max_tokens);
  c.runs.forEach((r, i) => { const o = el("option", "", r); o.value = String(i); $("#report-run").append(o); });
  $("#report-run-label").hidden = c.runs.length < 2;
  newConversation();
  const t = await fetch("/ui/api/votes");
  if (t.ok) showTally(await t.json());

  $("#ask").addEventListener("submit", (e) => {
    e.preventDefault();
    const prompt = $("#prompt").value.trim();
    if (!prompt || state.busy) return;
    $("#prompt").value = "";
    send(prompt);
  });
  $("#prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("#ask").requestSubmit(); }
  });
  $("#reset").addEventListener("click", () => { if (!state.busy) newConversation(); });
  $("#blind").addEventListener("change", () => { if (!state.busy) newConversation(); });
  for (const b of document.querySelectorAll("#vote button")) b.addEventListener("click", () => vote(b.dataset.pick));
  for (const b of document.querySelectorAll(".tab")) b.addEventListener("click", () => showView(b.dataset.view));
  $("#category").addEventListener("change", renderReport);
  $("#report-run").addEventListener("change", loadReport);
}

main();
