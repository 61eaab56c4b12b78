// GRIP origin behind Pushpin for Herald's benchmarks (no npm dependencies).
//
// Pushpin holds the client WebSockets and turns their events into HTTP requests to this
// origin (WebSocket-over-HTTP). On OPEN the origin subscribes the connection to the
// channel "d-<device_id>" and greets it; a client {"type":"subscribe","topic":T} adds
// channel "t-T"; acks are read and dropped (Pushpin keeps no inbox). POST /publish with
// Herald's body ({"to":{"device"|"topic":…},"data":{…}}) numbers the message per
// channel and hands it to Pushpin's HTTP publish API, then answers 202 {"recipients":n};
// POST /publish/batch with {"messages":[<publish body>, …]} hands all of them to Pushpin in
// one publish request (one item each) and answers 202 {"results":[{"recipients":n}, …]}.
//
// PORT=18094 PUSHPIN_PUBLISH=http://127.0.0.1:18095/publish/ node origin.js
"use strict";
const http = require("http");

const port = Number(process.env.PORT || 18094);
const publishUrl = new URL(process.env.PUSHPIN_PUBLISH || "http://127.0.0.1:5561/publish/");
const members = new Map(); // channel -> Set of connection ids
const channelsOf = new Map(); // connection id -> Set of channels
const seqs = new Map();
const agent = new http.Agent({ keepAlive: true, maxSockets: 64 });

function join(cid, channel) {
  if (!members.has(channel)) members.set(channel, new Set());
  members.get(channel).add(cid);
  if (!channelsOf.has(cid)) channelsOf.set(cid, new Set());
  channelsOf.get(cid).add(channel);
}

function leave(cid) {
  for (const ch of channelsOf.get(cid) || []) members.get(ch)?.delete(cid);
  channelsOf.delete(cid);
}

// WebSocket-over-HTTP events: "TYPE[ hexlen]\r\n[content\r\n]".
function parseEvents(buf) {
  const events = [];
  let i = 0;
  while (i < buf.length) {
    const eol = buf.indexOf("\r\n", i);
    if (eol < 0) break;
    const [type, len] = buf.toString("utf8", i, eol).split(" ");
    i = eol + 2;
    let content = "";
    if (len !== undefined) {
      const n = parseInt(len, 16);
      content = buf.toString("utf8", i, i + n);
      i += n + 2;
    }
    events.push({ type, content });
  }
  return events;
}

function text(content) {
  return `TEXT ${Buffer.byteLength(content).toString(16)}\r\n${content}\r\n`;
}

function control(obj) {
  return text("c:" + JSON.stringify(obj));
}

function onWebSocketEvents(req, res, body) {
  const cid = req.headers["connection-id"];
  const device = new URL(req.url, "http://origin").searchParams.get("device_id");
  let out = "";
  for (const ev of parseEvents(body)) {
    if (ev.type === "OPEN") {
      out += "OPEN\r\n";
      join(cid, "d-" + device);
      out += control({ type: "subscribe", channel: "d-" + device });
      out += text(JSON.stringify({ type: "welcome", last_seq: 0 }));
    } else if (ev.type === "TEXT") {
      let frame;
      try {
        frame = JSON.parse(ev.content);
      } catch (e) {
        continue;
      }
      if (frame.type === "subscribe" && typeof frame.topic === "string") {
        join(cid, "t-" + frame.topic);
        out += control({ type: "subscribe", channel: "t-" + frame.topic });
        out += text(JSON.stringify({ type: "subscribed", topic: frame.topic }));
      }
    } else if (ev.type === "CLOSE" || ev.type === "DISCONNECT") {
      leave(cid);
      if (ev.type === "CLOSE") out += "CLOSE\r\n";
    }
  }
  res.writeHead(200, {
    "Content-Type": "application/websocket-events",
    "Sec-WebSocket-Extensions": 'grip; message-prefix=""',
  });
  res.end(out);
}

function onPublish(res, body, batch) {
  let msg;
  try {
    msg = JSON.parse(body.toString());
  } catch (e) {
    res.writeHead(400).end('{"error":"body is not JSON"}');
    return;
  }
  const messages = batch ? msg.messages : [msg];
  if (!Array.isArray(messages)) {
    res.writeHead(422).end('{"error":"messages must be an array"}');
    return;
  }
  const items = [];
  const results = [];
  for (const m of messages) {
    const channel = m?.to?.device ? "d-" + m.to.device : m?.to?.topic ? "t-" + m.to.topic : null;
    if (!channel) {
      res.writeHead(422).end('{"error":"to.device or to.topic is required"}');
      return;
    }
    results.push({ recipients: members.get(channel)?.size || 0 });
    const seq = (seqs.get(channel) || 0) + 1;
    seqs.set(channel, seq);
    const content = JSON.stringify({ type: "msg", seq, data: m.data || {} });
    items.push({ channel, formats: { "ws-message": { content } } });
  }
  const item = JSON.stringify({ items });
  const up = http.request(
    publishUrl,
    { method: "POST", agent, headers: { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(item) } },
    (pr) => {
      pr.resume();
      pr.on("end", () => {
        const ok = pr.statusCode === 200;
        res.writeHead(ok ? 202 : 502, { "Content-Type": "application/json" });
        res.end(ok ? JSON.stringify(batch ? { results } : results[0]) : `{"error":"pushpin answered ${pr.statusCode}"}`);
      });
    },
  );
  up.on("error", (e) => {
    res.writeHead(502).end(JSON.stringify({ error: "pushpin publish failed: " + e.message }));
  });
  up.end(item);
}

http
  .createServer({ keepAlive: true }, (req, res) => {
    const chunks = [];
    req.on("data", (c) => chunks.push(c));
    req.on("end", () => {
      const body = Buffer.concat(chunks);
      if (req.method === "POST" && req.url === "/publish") onPublish(res, body, false);
      else if (req.method === "POST" && req.url === "/publish/batch") onPublish(res, body, true);
      else if (req.headers["content-type"] === "application/websocket-events") onWebSocketEvents(req, res, body);
      else res.writeHead(404).end();
    });
  })
  .listen(port, "127.0.0.1", () => console.log(`pushpin origin listening on http://127.0.0.1:${port}`));
