// The upstream of bench/run.py: a WebSocket echo and a 64-byte HTTP answer on one port
// (64 KiB for a path ending in /64k: the per-byte figure of bench/http_instructions.py --large).
//
// Written in Node with `ws` (and its native `bufferutil` when installed) so the
// backend costs far less CPU than any proxy in front of it; run.py measures
// its CPU anyway and reports it beside each figure.
//
//   node bench/backend.js            prints {"event":"listening","port":N}
//
// Commands on stdin, one per line, each answered by one JSON line on stdout:
//   count    {"event":"count","websockets":N}   open WebSocket connections
//   quit     closes everything and exits
"use strict";

const http = require("http");
const readline = require("readline");
const { WebSocketServer } = require("ws");

const BODY = Buffer.alloc(64, "b");
const LARGE = Buffer.alloc(64 * 1024, "b");
const MiB = 1024 * 1024;

const server = http.createServer((req, res) => {
  req.resume();
  req.on("end", () => {
    const body = req.url.endsWith("/64k") ? LARGE : BODY;
    res.writeHead(200, { "Content-Type": "text/plain", "Content-Length": body.length });
    res.end(body);
  });
});
// Proxies keep upstream connections alive; never be the side that drops them mid-run.
server.keepAliveTimeout = 600000;
server.headersTimeout = 610000;
server.requestTimeout = 0;

const wss = new WebSocketServer({ server, maxPayload: 64 * MiB, perMessageDeflate: false });
wss.on("connection", (ws) => {
  ws.on("message", (data, isBinary) => ws.send(data, { binary: isBinary }));
  ws.on("error", () => {});
});

function say(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

// A listen queue as deep as the proxies' (Node's default is 511): in a reconnect
// storm (figure 7) the proxies' upstream connects must not overflow the backend's.
server.listen({ port: Number(process.argv[2] || 0), host: "127.0.0.1", backlog: 4096 }, () => {
  say({ event: "listening", port: server.address().port, pid: process.pid });
});

const input = readline.createInterface({ input: process.stdin });
input.on("line", (line) => {
  const command = line.trim();
  if (command === "count") {
    say({ event: "count", websockets: wss.clients.size });
  } else if (command === "quit") {
    for (const ws of wss.clients) ws.terminate();
    server.close();
    process.exit(0);
  }
});
input.on("close", () => process.exit(0));
