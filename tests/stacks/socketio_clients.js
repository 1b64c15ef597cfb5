// socket.io-client 4 with its defaults (polling first, then the upgrade), many at once.
// usage: node socketio_clients.js URL COUNT HOLD_MS [polling]
// Each client connects (with its own X-Forwarded-For, as if behind a trusted balancer),
// waits for the upgrade unless told to stay on polling, holds on HOLD_MS, then sends one
// chat message and checks the binary ack. Prints one JSON summary line.
const { io } = require("socket.io-client");

const [url, count, hold, only] = [process.argv[2], Number(process.argv[3]), Number(process.argv[4]), process.argv[5]];
const results = [];

function one(i) {
  return new Promise((resolve) => {
    const result = { client: i, transports: [], disconnects: [], errors: [] };
    const socket = io(url, {
      reconnection: false,
      timeout: 10000,
      transports: only === "polling" ? ["polling"] : ["polling", "websocket"],
      extraHeaders: { "X-Forwarded-For": `198.51.100.${i + 1}` },
    });
    let finished = false;
    const done = () => { finished = true; socket.close(); resolve(result); };
    socket.on("connect_error", (e) => { result.errors.push(`connect_error: ${e.message}`); done(); });
    socket.on("disconnect", (reason) => finished || result.disconnects.push(reason));
    socket.io.on("open", () => {
      // the transport the session opened with, and each it upgraded to
      result.transports.push(socket.io.engine.transport.name);
      socket.io.engine.on("upgrade", (transport) => result.transports.push(transport.name));
    });
    socket.on("connect", () => {
      const chat = () => setTimeout(() => {
        socket.timeout(10000).emit("chat", { from: i, text: "hello" }, (err, ack) => {
          if (err) { result.errors.push(`ack: ${err.message}`); return done(); }
          result.instance = ack.instance;
          result.ack_ok = ack.echo.from === i && Buffer.isBuffer(ack.bytes) && ack.bytes.equals(Buffer.from([0, 1, 2, 254, 255]));
          result.transport = socket.io.engine.transport.name;
          done();
        });
      }, hold);
      if (only === "polling") return chat();
      if (socket.io.engine.transport.name === "websocket") return chat();
      socket.io.engine.once("upgrade", chat);
    });
  });
}

Promise.all([...Array(count).keys()].map(one)).then((all) => {
  console.log(JSON.stringify(all));
  process.exit(0);
});
