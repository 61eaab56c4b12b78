// Socket.IO 4 peer for Herald's benchmarks: the equivalent of a targeted publish.
//
// A client connects with ?device_id=D and joins the room D; POST /publish with
// {"to":{"device":D}|{"topic":T},"data":{...}} emits
// "msg" {type:"msg", seq, data} to that room (202 {"recipients": n}); POST /publish/batch
// with {"messages":[<publish body>, …]} does the same for each (202 {"results":[…]}), like
// Herald's POST /v1/messages/batch; a client event
// "subscribe" T joins room T and is answered with "subscribed"; "ack" events are
// counted, nothing more (Socket.IO keeps no inbox, so there is nothing to advance).
// Seqs are per room, kept in memory, so the load generator can check order and loss.
//
// PORT=8092 node server.js
"use strict";
const http = require("http");
const { Server } = require("socket.io");

const port = Number(process.env.PORT || 8092);
const seqs = new Map();
let acks = 0;

// Emits one publish body; returns its recipients, or null when it names no room.
function deliver(msg) {
  const room = msg && msg.to && (msg.to.device || msg.to.topic);
  if (!room) return null;
  const recipients = io.sockets.adapter.rooms.get(room)?.size || 0;
  if (recipients > 0) {
    const seq = (seqs.get(room) || 0) + 1;
    seqs.set(room, seq);
    io.to(room).emit("msg", { type: "msg", seq, data: msg.data || {} });
  }
  return recipients;
}

function answer(res, status, body) {
  res.writeHead(status, { "content-type": "application/json" });
  res.end(JSON.stringify(body));
}

const server = http.createServer((req, res) => {
  const batch = req.url === "/publish/batch";
  if (req.method !== "POST" || (req.url !== "/publish" && !batch)) {
    res.writeHead(404).end();
    return;
  }
  const chunks = [];
  req.on("data", (c) => chunks.push(c));
  req.on("end", () => {
    let msg;
    try {
      msg = JSON.parse(Buffer.concat(chunks).toString());
    } catch (e) {
      answer(res, 400, { error: "body is not JSON" });
      return;
    }
    if (batch) {
      if (!Array.isArray(msg.messages)) {
        answer(res, 422, { error: "messages must be an array" });
        return;
      }
      const results = msg.messages.map((m) => {
        const recipients = deliver(m);
        return recipients === null ? { error: { code: "invalid_field", message: "to.device or to.topic is required" } } : { recipients };
      });
      answer(res, 202, { results });
      return;
    }
    const recipients = deliver(msg);
    if (recipients === null) answer(res, 422, { error: "to.device or to.topic is required" });
    else answer(res, 202, { recipients });
  });
});

// Same heartbeat as Herald (25 s); WebSocket only, no per-message compression.
const io = new Server(server, {
  transports: ["websocket"],
  pingInterval: 25000,
  pingTimeout: 20000,
  perMessageDeflate: false,
});

io.on("connection", (socket) => {
  const device = socket.handshake.query.device_id;
  if (typeof device === "string" && device) socket.join(device);
  socket.on("subscribe", (frame) => {
    const topic = frame && frame.topic;
    if (typeof topic !== "string") return;
    socket.join(topic);
    socket.emit("subscribed", { type: "subscribed", topic });
  });
  socket.on("ack", () => {
    acks += 1;
  });
});

server.listen(port, "127.0.0.1", () => {
  console.log(`socketio listening on http://127.0.0.1:${port}`);
});
process.on("SIGTERM", () => {
  console.error(`socketio: ${acks} acks received`);
  process.exit(0);
});
