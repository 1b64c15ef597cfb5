// A socket.io 4 chat server as chat front-ends use it, for the tests behind the gateway.
// usage: node socketio_server.js PORT NAME PING_INTERVAL_MS
const { Server } = require("socket.io");

const [port, name, pingInterval] = [Number(process.argv[2]), process.argv[3], Number(process.argv[4] || 25000)];
const io = new Server(port, { pingInterval, pingTimeout: 20000, maxHttpBufferSize: 1e6 });

io.on("connection", (socket) => {
  socket.on("chat", (message, ack) => {
    socket.broadcast.emit("chat", message);
    // a binary ack: the attachment travels as a frame of its own
    ack({ instance: name, echo: message, bytes: Buffer.from([0, 1, 2, 254, 255]) });
  });
});
io.httpServer.on("listening", () => console.log(JSON.stringify({ listening: port, name })));
