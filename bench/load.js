// The load generator of bench/run.py: one mode per figure, driven by a JSON argument.
//
//   node bench/load.js '{"mode":"saturate","url":"ws://127.0.0.1:8080/", ...}'
//
// It prints JSON lines; the last is {"event":"result", ...} (or {"event":"error"}).
// The measured window is bounded by two snapshots taken in the same event-loop
// turn as the counters they pair with: each snapshot reads utime+stime of the
// proxy's and the backend's processes from /proc/PID/stat, this process's own
// CPU and the kernel's per-CPU counters (/proc/stat, for steal). So "CPU per
// unit of work" divides two numbers taken at the same instant.
//
// Modes (all bounded in count and time; `timeout_s` stops everything):
//   saturate   `conns` WebSockets each keep `inflight` echoes of `size` bytes going
//   rate       `rate` messages/s of `size` bytes spread over `conns`, round-trip times
//   handshake  `count` open+close cycles, `concurrency` at a time, after `warmup_count`
//   idle       open `steps[i]` WebSockets and hold them; waits for a stdin line per step
//   big        one `size`-byte message echoed; waits for "go" on stdin first
//   http       `rate` GETs/s over a keep-alive agent of `conns` sockets
//   http-saturate  `conns` keep-alive connections, each sending its next GET as soon
//              as the last answer is in (the saturated rate)
//   storm      `count` WebSockets opened at once, then closed (a reconnect storm)
"use strict";

const fs = require("fs");
const http = require("http");
const readline = require("readline");
const { performance } = require("perf_hooks");
const WebSocket = require("ws");

const cfg = JSON.parse(process.argv[2]);
const MiB = 1024 * 1024;
const watch = cfg.watch || {};

function say(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

function fail(message) {
  say({ event: "error", error: String(message) });
  process.exit(3);
}

setTimeout(() => fail(`timed out after ${cfg.timeout_s}s`), (cfg.timeout_s || 60) * 1000);

// -- measurement ----------------------------------------------------------------

function ticks(pids) {
  let total = 0;
  for (const pid of pids || []) {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, "latin1");
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    total += Number(fields[11]) + Number(fields[12]); // utime, stime
  }
  return total;
}

function kernelCpuLines() {
  return fs
    .readFileSync("/proc/stat", "latin1")
    .split("\n")
    .filter((line) => line.startsWith("cpu"));
}

function snapshot() {
  const usage = process.cpuUsage();
  return {
    t_ms: performance.now(),
    proxy_ticks: ticks(watch.proxy),
    backend_ticks: ticks(watch.backend),
    load_us: usage.user + usage.system,
    proc_stat: kernelCpuLines(),
  };
}

function percentiles(samples) {
  if (samples.length === 0) return null;
  const sorted = Float64Array.from(samples).sort();
  const at = (q) => sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
  return { n: sorted.length, p50: at(0.5), p90: at(0.9), p99: at(0.99), max: sorted[sorted.length - 1] };
}

function payload(size) {
  const buf = Buffer.allocUnsafe(size);
  let x = 2463534242;
  for (let i = 0; i < size; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    buf[i] = x & 0xff;
  }
  return buf;
}

const lines = readline.createInterface({ input: process.stdin });
const waiting = [];
const queued = [];
lines.on("line", (line) => {
  const resolve = waiting.shift();
  if (resolve) resolve(line.trim());
  else queued.push(line.trim());
});
function nextLine() {
  if (queued.length) return Promise.resolve(queued.shift());
  return new Promise((resolve) => waiting.push(resolve));
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// -- WebSocket helpers ----------------------------------------------------------

const WS_OPTIONS = { perMessageDeflate: false, maxPayload: 64 * MiB, handshakeTimeout: 30000 };

function openOne(url) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, WS_OPTIONS);
    ws.binaryType = "nodebuffer";
    ws.once("open", () => resolve(ws));
    ws.once("unexpected-response", (req, res) => reject(new Error(`HTTP ${res.statusCode}`)));
    ws.once("error", reject);
  });
}

async function openMany(url, count, concurrency, into) {
  let next = 0;
  let failed = 0;
  let lastError = null;
  async function worker() {
    while (next < count) {
      next++;
      try {
        into.push(await openOne(url));
      } catch (e) {
        failed++;
        lastError = String(e.message || e);
      }
    }
  }
  await Promise.all(Array.from({ length: Math.min(concurrency, count) }, worker));
  return { failed, lastError };
}

function closeAll(sockets, timeoutMs) {
  return new Promise((resolve) => {
    let left = sockets.length;
    if (left === 0) return resolve(0);
    const timer = setTimeout(() => {
      for (const ws of sockets) if (ws.readyState !== WebSocket.CLOSED) ws.terminate();
      resolve(left);
    }, timeoutMs);
    for (const ws of sockets) {
      const done = () => {
        if (--left === 0) {
          clearTimeout(timer);
          resolve(0);
        }
      };
      if (ws.readyState === WebSocket.CLOSED) done();
      else {
        ws.once("close", done);
        ws.close(1000);
      }
    }
  });
}

// -- modes ------------------------------------------------------------------------

async function saturate() {
  const sockets = [];
  const opened = await openMany(cfg.url, cfg.conns, 16, sockets);
  if (opened.failed) fail(`${opened.failed} of ${cfg.conns} WebSockets failed: ${opened.lastError}`);
  const data = payload(cfg.size);
  let phase = "warmup";
  let counted = 0;
  let errors = 0;
  for (const ws of sockets) {
    ws.on("message", (msg) => {
      if (msg.length !== cfg.size) errors++;
      if (phase === "measure") counted++;
      if (phase !== "stop") ws.send(data);
    });
    ws.on("close", () => {
      if (phase !== "stop") errors++;
    });
    for (let i = 0; i < (cfg.inflight || 1); i++) ws.send(data);
  }
  await sleep(cfg.warmup_s * 1000);
  const start = snapshot();
  phase = "measure";
  say({ event: "measuring" });
  await sleep(cfg.measure_s * 1000);
  const end = snapshot();
  const done = counted;
  phase = "stop";
  const unclosed = await closeAll(sockets, 10000);
  return { start, end, done, errors, unclosed };
}

async function rate() {
  const sockets = [];
  const opened = await openMany(cfg.url, cfg.conns, 16, sockets);
  if (opened.failed) fail(`${opened.failed} of ${cfg.conns} WebSockets failed: ${opened.lastError}`);
  const data = payload(cfg.size);
  const sentAt = sockets.map(() => []);
  const samples = [];
  let phase = "warmup";
  let counted = 0;
  let errors = 0;
  sockets.forEach((ws, i) => {
    ws.on("message", (msg) => {
      const rtt = performance.now() - sentAt[i].shift();
      if (msg.length !== cfg.size) errors++;
      if (phase === "measure") {
        counted++;
        samples.push(rtt);
      }
    });
    ws.on("close", () => {
      if (phase !== "stop") errors++;
    });
  });
  const t0 = performance.now();
  let sent = 0;
  const timer = setInterval(() => {
    if (phase === "stop") return;
    const now = performance.now();
    const due = Math.floor(((now - t0) / 1000) * cfg.rate) - sent;
    for (let k = 0; k < due; k++) {
      const i = sent % sockets.length;
      sentAt[i].push(performance.now());
      sockets[i].send(data);
      sent++;
    }
  }, 1);
  await sleep(cfg.warmup_s * 1000);
  const start = snapshot();
  phase = "measure";
  say({ event: "measuring" });
  await sleep(cfg.measure_s * 1000);
  const end = snapshot();
  const done = counted;
  phase = "stop";
  clearInterval(timer);
  await sleep(100); // let the last echoes land before closing
  const unclosed = await closeAll(sockets, 10000);
  return { start, end, done, errors, unclosed, latency_ms: percentiles(samples) };
}

function handshake() {
  const target = cfg.warmup_count + cfg.count;
  const samples = [];
  let started = 0;
  let completed = 0;
  let errors = 0;
  let lastError = null;
  let start = null;
  return new Promise((resolve) => {
    function one() {
      if (started >= target) return;
      started++;
      const t = performance.now();
      let opened = false;
      const ws = new WebSocket(cfg.url, WS_OPTIONS);
      ws.on("open", () => {
        opened = true;
        ws.close(1000);
      });
      ws.on("error", (e) => {
        lastError = String(e.message || e);
      });
      ws.on("close", () => {
        if (!opened) errors++;
        completed++;
        if (completed > cfg.warmup_count) samples.push(performance.now() - t);
        if (completed === cfg.warmup_count) {
          start = snapshot();
          say({ event: "measuring" });
        }
        if (completed === target) {
          resolve({
            start,
            end: snapshot(),
            done: cfg.count,
            errors,
            last_error: lastError,
            latency_ms: percentiles(samples),
          });
        } else one();
      });
    }
    if (cfg.warmup_count === 0) {
      start = snapshot();
      say({ event: "measuring" });
    }
    for (let i = 0; i < cfg.concurrency; i++) one();
  });
}

async function idle() {
  const sockets = [];
  let closedEarly = 0;
  let failed = 0;
  let lastError = null;
  for (const step of cfg.steps) {
    const before = sockets.length;
    const opened = await openMany(cfg.url, step - before, cfg.concurrency, sockets);
    failed += opened.failed;
    lastError = opened.lastError || lastError;
    for (const ws of sockets.slice(before)) ws.on("close", () => closedEarly++);
    await sleep(cfg.settle_s * 1000);
    const open = sockets.filter((ws) => ws.readyState === WebSocket.OPEN).length;
    say({ event: "step", target: step, open, failed, closed_early: closedEarly, last_error: lastError });
    if ((await nextLine()) !== "next") break;
  }
  const open = sockets.filter((ws) => ws.readyState === WebSocket.OPEN).length;
  const unclosed = await closeAll(sockets, 20000);
  return { open_before_close: open, failed, closed_early: closedEarly, unclosed };
}

// A reconnect storm: `count` WebSockets opened at once (every connect in the same
// turn, as clients do after a deploy), then closed; the time until all are open
// and each handshake's time from its connect.
async function storm() {
  const sockets = [];
  const times = [];
  let failed = 0;
  let lastError = null;
  const began = performance.now();
  await Promise.all(
    Array.from({ length: cfg.count }, async () => {
      const start = performance.now();
      try {
        sockets.push(await openOne(cfg.url));
        times.push(performance.now() - start);
      } catch (e) {
        failed++;
        lastError = String(e.message || e);
      }
    })
  );
  const allMs = performance.now() - began;
  const unclosed = await closeAll(sockets, 30000);
  return { open: sockets.length, failed, last_error: lastError, all_ms: allMs, latency_ms: percentiles(times), unclosed };
}

async function big() {
  const ws = await openOne(cfg.url);
  const small = payload(64 * 1024);
  const data = payload(cfg.size);
  const echoed = () => new Promise((resolve) => ws.once("message", resolve));
  ws.send(small);
  const warm = await echoed();
  if (!warm.equals(small)) fail("the warm-up message came back altered");
  say({ event: "ready" });
  if ((await nextLine()) !== "go") return { aborted: true };
  const t = performance.now();
  ws.send(data);
  const back = await echoed();
  const rtt = performance.now() - t;
  const intact = back.equals(data);
  const unclosed = await closeAll([ws], 10000);
  return { rtt_ms: rtt, intact, size: data.length, unclosed };
}

// Both HTTP modes: GETs over one keep-alive agent of `conns` sockets, each answer
// checked (200, 64 bytes); `drive(get, state)` decides when each GET is sent and
// returns what stops it.
async function httpLoad(drive) {
  const url = new URL(cfg.url);
  const agent = new http.Agent({ keepAlive: true, maxSockets: cfg.conns });
  const samples = [];
  const state = { phase: "warmup", outstanding: 0 };
  let counted = 0;
  let errors = 0;
  let lastError = null;
  function get(then) {
    const t = performance.now();
    state.outstanding++;
    const req = http.get({ agent, host: url.hostname, port: url.port, path: url.pathname }, (res) => {
      let n = 0;
      res.on("data", (chunk) => (n += chunk.length));
      res.on("end", () => {
        state.outstanding--;
        if (res.statusCode !== 200 || n !== 64) {
          errors++;
          lastError = `status ${res.statusCode}, ${n} bytes`;
        }
        if (state.phase === "measure") {
          counted++;
          samples.push(performance.now() - t);
        }
        if (then) then();
      });
    });
    req.on("error", (e) => {
      state.outstanding--;
      errors++;
      lastError = String(e.message || e);
      if (then) setTimeout(then, 10);
    });
  }
  const stop = drive(get, state);
  await sleep(cfg.warmup_s * 1000);
  const start = snapshot();
  state.phase = "measure";
  say({ event: "measuring" });
  await sleep(cfg.measure_s * 1000);
  const end = snapshot();
  const done = counted;
  state.phase = "stop";
  if (stop) stop();
  for (let i = 0; i < 100 && state.outstanding > 0; i++) await sleep(20);
  agent.destroy();
  return { start, end, done, errors, last_error: lastError, latency_ms: percentiles(samples) };
}

function httpRate() {
  return httpLoad((get, state) => {
    const t0 = performance.now();
    let sent = 0;
    const timer = setInterval(() => {
      if (state.phase === "stop") return;
      const due = Math.floor(((performance.now() - t0) / 1000) * cfg.rate) - sent;
      for (let k = 0; k < due; k++, sent++) get(null);
    }, 1);
    return () => clearInterval(timer);
  });
}

function httpSaturate() {
  return httpLoad((get, state) => {
    const next = () => {
      if (state.phase !== "stop") get(next);
    };
    for (let i = 0; i < cfg.conns; i++) next();
    return null;
  });
}

const MODES = { saturate, rate, handshake, idle, big, http: httpRate, "http-saturate": httpSaturate, storm };

(async () => {
  const mode = MODES[cfg.mode];
  if (!mode) fail(`unknown mode ${cfg.mode}`);
  const result = await mode();
  say({ event: "result", mode: cfg.mode, ...result });
  process.exit(0);
})().catch((e) => fail(e && e.stack ? e.stack : e));
