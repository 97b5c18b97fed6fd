// Worldvisor's web console: the world table (actions, live edits), live plots from
// GET /v1/history, and a VM's serial console over a WebSocket. Same-origin requests only;
// every request other than GET says Content-Type: application/json.
"use strict";
const $ = (s) => document.querySelector(s);
let selected = null; // world shown in the plots
let plots = null;
window.wvPlot = null; // the CPU chart
window.wvPlots = null; // every chart: cpu, vcpu, exits, disks, nets

async function api(method, path, body) {
  const r = await fetch(path, {
    method,
    headers: { "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: "same-origin",
  });
  const text = await r.text();
  const v = text ? JSON.parse(text) : null;
  if (!r.ok) throw new Error((v && v.error) || r.status);
  return v;
}

function cell(tr, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  tr.appendChild(td);
  return td;
}

function input(tr, cls, value) {
  const td = document.createElement("td");
  const i = document.createElement("input");
  i.className = cls;
  i.value = value;
  td.appendChild(i);
  tr.appendChild(td);
  return i;
}

function button(td, cls, label, f) {
  const b = document.createElement("button");
  b.className = cls;
  b.textContent = label;
  b.onclick = async () => {
    try {
      $("#error").textContent = "";
      await f();
      await refresh();
    } catch (e) {
      $("#error").textContent = `${label}: ${e.message}`;
    }
  };
  td.appendChild(b);
}

const editing = () => document.activeElement && document.activeElement.tagName === "INPUT";

async function refresh() {
  if (editing()) return; // live edits are not overwritten while typed
  const [vms, stats] = await Promise.all([api("GET", "/v1/vms"), api("GET", "/v1/stats")]);
  const byId = new Map(stats.map((s) => [s.id, s]));
  const rows = stats.filter((s) => s.id < 2).map((s) => ({ system: true, id: s.id, name: s.name, state: s.state, spec: s, s }));
  for (const w of vms) rows.push({ system: false, id: w.id, name: w.spec.name, state: w.state, spec: w.spec, s: byId.get(w.id) });
  const tbody = $("#worlds tbody");
  tbody.replaceChildren();
  for (const w of rows) {
    const tr = document.createElement("tr");
    tr.dataset.name = w.name;
    cell(tr, w.id);
    cell(tr, w.name, "name");
    cell(tr, w.state, `state state-${w.state}`);
    const act = document.createElement("td");
    if (w.system) {
      cell(tr, w.spec.shares);
      cell(tr, w.spec.reservation);
      cell(tr, w.spec.limit ?? "none");
    } else {
      const sh = input(tr, "shares", w.spec.shares);
      const re = input(tr, "reservation", w.spec.reservation);
      const li = input(tr, "limit", w.spec.limit ?? "none");
      button(act, "set", "set", () => api("PATCH", `/v1/vms/${encodeURIComponent(w.name)}`, {
        shares: Number(sh.value), reservation: Number(re.value),
        limit: li.value === "none" || li.value === "" ? null : Number(li.value),
      }));
      for (const op of ["start", "stop", "pause", "resume"]) {
        button(act, op, op, () => api("POST", `/v1/vms/${encodeURIComponent(w.name)}/${op}`));
      }
      button(act, "delete", "delete", () => api("DELETE", `/v1/vms/${encodeURIComponent(w.name)}`));
      button(act, "console", "console", async () => openConsole(w.name));
    }
    cell(tr, w.s ? w.s.entitlement.toFixed(2) : "-");
    cell(tr, w.s ? (w.s.cpu_ns / 1e9).toFixed(1) + " s" : "-");
    button(act, "plot", "plot", async () => { selected = w.id; $("#plotname").textContent = w.name; plots = null; });
    tr.appendChild(act);
    tbody.appendChild(tr);
  }
}

const COLOURS = ["#07c", "#c70", "#a0a", "#0a0", "#a00", "#555", "#0aa", "#aa0", "#70c", "#c07"];

// A uPlot chart of `names` (after the time axis); a series whose name is in `right` is on a
// second scale, drawn against the right-hand axis labelled `rightLabel`.
function chart(el, title, names, data, right, rightLabel) {
  right = right || new Set();
  const series = [{}].concat(names.map((n, i) => ({
    label: n, stroke: COLOURS[i % COLOURS.length], scale: right.has(n) ? "r" : "y",
    dash: right.has(n) ? [4, 3] : undefined, spanGaps: false,
  })));
  const axes = [{}, { scale: "y", size: 60, values: (u, vs) => vs.map(si) }];
  if (right.size) axes.push({ scale: "r", side: 1, label: rightLabel, size: 60, grid: { show: false }, values: (u, vs) => vs.map(si) });
  return new uPlot({ title, width: 420, height: 240, series, axes, scales: { x: { time: true } } }, data, el);
}

// A number in at most 4 characters and an SI prefix (12.3k, 4.5M): axis labels of bytes/s.
function si(v) {
  if (v === null || v === undefined) return "";
  const a = Math.abs(v);
  for (const [d, p] of [[1e12, "T"], [1e9, "G"], [1e6, "M"], [1e3, "k"]]) {
    if (a >= d) return +(v / d).toFixed(1) + p;
  }
  return +v.toFixed(2) + "";
}

// `q` aligned to the last `n` points (a series that began later is shorter: nulls before).
const tail = (q, n) => Array(Math.max(0, n - q.length)).fill(null).concat(q.slice(-n));

// The disks' or the nets' plot data: bytes/s in and out per device (left axis), and
// operations/s (right axis, dashed).
function ioData(w, kind) {
  const devs = w.devices.filter((d) => d.kind === kind);
  const [i, o] = kind === "disk" ? ["read", "write"] : ["rx", "tx"];
  const unit = kind === "disk" ? "ops" : "frames";
  const names = [], cols = [], right = new Set();
  for (const d of devs) {
    names.push(`${d.name} ${i} B/s`, `${d.name} ${o} B/s`);
    cols.push(d.in_bytes, d.out_bytes);
  }
  for (const d of devs) {
    for (const [n, q] of [[`${d.name} ${i} ${unit}/s`, d.in_ops], [`${d.name} ${o} ${unit}/s`, d.out_ops]]) {
      names.push(n); cols.push(q); right.add(n);
    }
  }
  return { names, right, data: [w.t].concat(cols.map((q) => tail(q, w.t.length))) };
}

async function plot() {
  if (selected === null) return;
  const h = await api("GET", "/v1/history");
  const w = h.worlds.find((x) => x.id === selected);
  if (!w) return;
  const n = w.t.length;
  const cpu = [w.t, w.cpu, w.ready, w.throttled];
  const threads = Object.keys(w.threads);
  const vcpu = [w.t].concat(threads.map((t) => tail(w.threads[t], n)));
  const causes = Object.keys(w.exit_causes || {});
  const exits = [w.t, tail(w.exits, n)].concat(causes.map((c) => tail(w.exit_causes[c], n)));
  const disks = ioData(w, "disk"), nets = ioData(w, "net");
  // The charts are made again when the set of series changes (a cause or device appears).
  const shape = JSON.stringify([threads, causes, disks.names, nets.names]);
  if (!plots || plots.shape !== shape) {
    for (const id of ["#plot-cpu", "#plot-vcpu", "#plot-exits", "#plot-disks", "#plot-nets"]) $(id).replaceChildren();
    plots = {
      cpu: chart($("#plot-cpu"), "CPUs: used, ready, throttled", ["cpu", "ready", "throttled"], cpu),
      vcpu: chart($("#plot-vcpu"), "CPUs per thread (vCPU)", threads, vcpu),
      exits: chart($("#plot-exits"), "VM exits per second, all and by cause (KVM's counters)", ["all"].concat(causes), exits),
      disks: chart($("#plot-disks"), "Disks: bytes/s (left), operations/s (right, dashed)", disks.names, disks.data, disks.right, "ops/s"),
      nets: chart($("#plot-nets"), "Nets: bytes/s (left), frames/s (right, dashed)", nets.names, nets.data, nets.right, "frames/s"),
      shape,
    };
    window.wvPlot = plots.cpu;
    window.wvPlots = plots;
  } else {
    plots.cpu.setData(cpu);
    plots.vcpu.setData(vcpu);
    plots.exits.setData(exits);
    plots.disks.setData(disks.data);
    plots.nets.setData(nets.data);
  }
}

let term = null, ws = null;
function openConsole(name) {
  if (ws) ws.close();
  if (!term) {
    term = new Terminal({ cols: 100, rows: 20, convertEol: true });
    term.open($("#term"));
    term.onData((d) => { if (ws && ws.readyState === 1) ws.send(new TextEncoder().encode(d)); });
  }
  term.reset();
  $("#consolename").textContent = name;
  ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/vms/${encodeURIComponent(name)}/console`);
  ws.binaryType = "arraybuffer";
  ws.onmessage = (e) => term.write(new Uint8Array(e.data));
  ws.onclose = () => term.write("\r\n[console closed]\r\n");
  window.wvConsole = { name, ws, text: () => { const b = term.buffer.active; let s = ""; for (let i = 0; i < b.length; i++) s += b.getLine(i).translateToString(true) + "\n"; return s; } };
  term.focus();
}

async function tick() {
  try {
    await refresh();
    await plot();
  } catch (e) {
    $("#error").textContent = e.message;
  }
}
api("GET", "/v1/host").then((h) => { $("#host").textContent = `${h.version}, ${h.host_cpus} CPUs`; });
tick();
setInterval(tick, 1000);
