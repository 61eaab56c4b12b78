#!/usr/bin/env python3
"""The samples' stand-in for your backend: mints Herald device tokens for the apps.

A real app asks its own backend for a device JWT after the user signed in; that
backend either signs the JWT itself (with the secret `herald serve` prints on first
start) or calls the gateway's `POST /v1/tokens` with its API key. This script is the
second kind, in 60 lines of standard-library Python, so the sample apps never hold an
API key:

    HERALD_API_KEY=hk_... python3 sample-backend/token-server.py \
        --gateway http://127.0.0.1:8080 --listen 0.0.0.0:8090

    POST /device-token  {"user": "alice", "device_id": "<the app's device id>"}
        ->  {"token": "<jwt>", "expires_at": "..."}

The token is bound to that one device (`device_id` becomes its `did` claim): the gateway
refuses device tokens without one by default (docs/security.md). It is NOT production
code: it trusts whatever user name the app sends (the sample's sign-in is a stub). Your
backend must take the user from its own authenticated session, and decide which topics
the token allows (`"topics": [...]`; none here).
"""
import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gateway", default="http://127.0.0.1:8080", help="Herald gateway base URL")
    ap.add_argument("--listen", default="127.0.0.1:8090", help="host:port to serve on (port 0: any)")
    ap.add_argument("--ttl-seconds", type=int, default=3600, help="lifetime of the minted tokens")
    args = ap.parse_args()
    api_key = os.environ.get("HERALD_API_KEY")
    if not api_key:
        sys.exit("set HERALD_API_KEY to a gateway API key (printed by `herald serve` on first start, "
                 "or `herald keys create --name sample-backend`)")
    gateway = args.gateway.rstrip("/")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            if self.path != "/device-token":
                return self.answer(404, {"error": "only POST /device-token exists"})
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                user, device_id = body["user"], body["device_id"]
                if not all(isinstance(v, str) and v.strip() for v in (user, device_id)):
                    raise ValueError
            except (ValueError, KeyError, TypeError):
                return self.answer(400, {"error": 'body must be {"user": "<non-empty user id>", "device_id": "<non-empty device id>"}'})
            req = urllib.request.Request(
                gateway + "/v1/tokens", method="POST",
                data=json.dumps({"user": user.strip(), "device_id": device_id.strip(),
                                 "ttl_seconds": args.ttl_seconds}).encode(),
                headers={"Authorization": "Bearer " + api_key, "Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    return self.answer(200, json.loads(resp.read()))
            except urllib.error.HTTPError as e:
                return self.answer(502, {"error": f"gateway answered {e.code}: {e.read().decode(errors='replace')}"})
            except OSError as e:
                return self.answer(502, {"error": f"gateway unreachable at {gateway}: {e}"})

        def answer(self, status, obj):
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, fmt, *a):
            sys.stderr.write("token-server: " + (fmt % a) + "\n")

    host, port = args.listen.rsplit(":", 1)
    server = ThreadingHTTPServer((host, int(port)), Handler)
    print(f"token-server listening on http://{host}:{server.server_address[1]} (gateway {gateway})", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
