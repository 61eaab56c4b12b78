#!/usr/bin/env python3
"""Generates docs/backend.md, "Calling Herald from your backend", from the OpenAPI
document the gateway serves (`herald openapi` prints it; `GET /openapi.json` serves it).

Every operation a backend calls (those secured by `api_key`) gets a Python (requests),
a Node (18+, built-in fetch) and a Go (standard library) snippet built from the spec:
method, path, path parameters and the request body example. A path parameter that a
link of an earlier operation's answer provides (the publish answer's `message_id` for
`GET /v1/messages/{id}`) is taken from that answer, so each language's blocks, run in
order after its setup block, form one program; scripts/test.d/openapi.sh runs the Python
and Node ones against a live gateway.

    herald openapi > /tmp/spec.json
    python3 scripts/gen-backend-docs.py /tmp/spec.json > docs/backend.md     # regenerate
    python3 scripts/gen-backend-docs.py /tmp/spec.json --check docs/backend.md
    python3 scripts/gen-backend-docs.py /tmp/spec.json --program python      # runnable
"""

import argparse
import json
import re
import sys

LANGS = [("python", "Python (requests)"), ("js", "Node 18+ (fetch)"), ("go", "Go (net/http)")]

SETUP = {
    "python": '''import os

import requests

HERALD_URL = os.environ.get("HERALD_URL", "http://127.0.0.1:8080")
API_KEY = os.environ["HERALD_API_KEY"]


def herald(method, path, body=None):
    """One call; raises with Herald's error code and message on 4xx/5xx."""
    r = requests.request(
        method,
        HERALD_URL + path,
        json=body,
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=10,
    )
    if r.status_code >= 400:
        try:
            error = r.json()["error"]
            detail = f"{error['code']}: {error['message']}"
        except ValueError:
            detail = r.text
        raise RuntimeError(f"{method} {path}: {r.status_code} {detail}")
    return r.json() if r.content else None
''',
    "js": '''const HERALD_URL = process.env.HERALD_URL ?? "http://127.0.0.1:8080";
const API_KEY = process.env.HERALD_API_KEY;

// One call; throws with Herald's error code and message on 4xx/5xx.
async function herald(method, path, body) {
  const headers = { Authorization: `Bearer ${API_KEY}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(HERALD_URL + path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    signal: AbortSignal.timeout(10_000),
  });
  const text = await res.text();
  if (!res.ok) {
    let detail = text;
    try {
      const { error } = JSON.parse(text);
      detail = `${error.code}: ${error.message}`;
    } catch {}
    throw new Error(`${method} ${path}: ${res.status} ${detail}`);
  }
  return text ? JSON.parse(text) : null;
}
''',
    "go": '''package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"time"
)

var (
	heraldURL = envOr("HERALD_URL", "http://127.0.0.1:8080")
	apiKey    = os.Getenv("HERALD_API_KEY")
	client    = &http.Client{Timeout: 10 * time.Second}
)

func envOr(name, fallback string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return fallback
}

// herald makes one call; a 4xx/5xx is an error carrying Herald's code and message.
func herald(method, path string, body any) (map[string]any, error) {
	var payload io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return nil, err
		}
		payload = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, heraldURL+path, payload)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+apiKey)
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	res, err := client.Do(req)
	if err != nil {
		return nil, err
	}
	defer res.Body.Close()
	text, err := io.ReadAll(res.Body)
	if err != nil {
		return nil, err
	}
	if res.StatusCode >= 400 {
		var e struct {
			Error struct{ Code, Message string } `json:"error"`
		}
		if json.Unmarshal(text, &e) == nil && e.Error.Code != "" {
			return nil, fmt.Errorf("%s %s: %d %s: %s", method, path, res.StatusCode, e.Error.Code, e.Error.Message)
		}
		return nil, fmt.Errorf("%s %s: %d %s", method, path, res.StatusCode, text)
	}
	if len(text) == 0 {
		return nil, nil
	}
	var out map[string]any
	return out, json.Unmarshal(text, &out)
}
''',
}

# Go snippets are function bodies; the program wraps them in main().
GO_MAIN_OPEN = "\nfunc main() {\n"
GO_MAIN_CLOSE = "}\n"


def backend_operations(spec):
    """(path, method, op) of the operations secured by an API key, in the spec's path
    order, DELETEs last (so a page run in order does not delete what later blocks use)."""
    ops = []
    for path, item in spec["paths"].items():
        for method, op in item.items():
            if any("api_key" in req for req in op.get("security", [])):
                ops.append((path, method, op))
    # A DELETE of a sub-resource (a topic) before the DELETE of its parent (the device).
    return sorted(ops, key=lambda o: (o[1] == "delete", -o[0].count("/") if o[1] == "delete" else 0))


def scope_of(op):
    for req in op.get("security", []):
        if "api_key" in req:
            return ", ".join(req["api_key"]) or "any"
    return "any"


def resolve(spec, node):
    while isinstance(node, dict) and "$ref" in node:
        parts = node["$ref"].lstrip("#/").split("/")
        node = spec
        for p in parts:
            node = node[p]
    return node


def links_to(spec, ops):
    """operationId -> {param: (source operationId, response field)} from response links."""
    found = {}
    for _, _, op in ops:
        for resp in op.get("responses", {}).values():
            for link in resp.get("links", {}).values():
                for param, expr in link.get("parameters", {}).items():
                    m = re.fullmatch(r"\$response\.body#/(\w+)", expr)
                    if m:
                        found.setdefault(link["operationId"], {})[param] = (op["operationId"], m.group(1))
    return found


def success(op):
    code = min(c for c in op["responses"] if c.startswith("2"))
    return code, op["responses"][code]


def js_literal(value, indent=0):
    return json.dumps(value, indent=2).replace("\n", "\n" + " " * indent)


def py_literal(value):
    text = json.dumps(value, indent=4)
    return text.replace("true", "True").replace("false", "False").replace("null", "None")


def go_literal(value, indent=1):
    tab = "\t" * indent
    if isinstance(value, dict):
        if not value:
            return "map[string]any{}"
        items = "".join(f'{tab}\t"{k}": {go_literal(v, indent + 1)},\n' for k, v in value.items())
        return "map[string]any{\n" + items + tab + "}"
    if isinstance(value, list):
        items = "".join(f"{tab}\t{go_literal(v, indent + 1)},\n" for v in value)
        return "[]any{\n" + items + tab + "}"
    return json.dumps(value)


def snippets(spec, path, method, op, link_params, produced):
    """Python, Node and Go code for one operation."""
    name = op["operationId"]
    params = [resolve(spec, p) for p in op.get("parameters", []) if resolve(spec, p)["in"] == "path"]
    py_path, js_path, go_args, go_fmt = path, path, [], path
    for p in params:
        pname = p["name"]
        source = link_params.get(pname)
        if source and source[0] in produced:
            py_val = f"{{{source[0]}['{source[1]}']}}"
            js_val = f"${{{source[0]}.{source[1]}}}"
            go_val = f'{source[0]}["{source[1]}"]'
        else:
            example = p.get("example", p.get("schema", {}).get("example", pname))
            py_val = js_val = str(example)
            go_val = json.dumps(str(example))
        py_path = py_path.replace("{" + pname + "}", py_val)
        js_path = js_path.replace("{" + pname + "}", js_val)
        go_fmt = go_fmt.replace("{" + pname + "}", "%v")
        go_args.append(go_val)
    body = None
    rb = op.get("requestBody")
    if rb:
        body = rb["content"]["application/json"].get("example")
    code, resp = success(op)
    returns = "content" in resp
    verb = method.upper()

    py_prefix = f"{name} = " if returns else ""
    py_path_lit = f'f"{py_path}"' if "{" in py_path else f'"{py_path}"'
    py_args = f'"{verb}", {py_path_lit}' + (f", {py_literal(body)}" if body is not None else "")
    py = f"{py_prefix}herald({py_args})\n"
    if returns:
        py += f"print({name})\n"

    js_path_lit = f"`{js_path}`" if "${" in js_path else f'"{js_path}"'
    js_prefix = f"const {name} = " if returns else ""
    js_args = f'"{verb}", {js_path_lit}' + (f", {js_literal(body)}" if body is not None else "")
    js = f"{js_prefix}await herald({js_args});\n"
    if returns:
        js += f"console.log({name});\n"

    go_path = f'fmt.Sprintf("{go_fmt}", {", ".join(go_args)})' if go_args else f'"{go_fmt}"'
    go_body = go_literal(body, 0) if body is not None else "nil"
    go_lhs = f"{name}, err :=" if returns else "if _, err :="
    if returns:
        go = (
            f'{name}, err := herald("{verb}", {go_path}, {go_body})\n'
            f"if err != nil {{\n\tpanic(err)\n}}\nfmt.Println({name})\n"
        )
    else:
        go = f'{go_lhs} herald("{verb}", {go_path}, {go_body}); err != nil {{\n\tpanic(err)\n}}\n'
    return {"python": py, "js": js, "go": go}, code, resp


def describe_response(spec, code, resp):
    content = resp.get("content", {}).get("application/json")
    if not content:
        return f"`{code}`, no body."
    schema = content["schema"]
    name = schema.get("$ref", "").rsplit("/", 1)[-1]
    props = resolve(spec, schema).get("properties", {})
    fields = ", ".join(f"`{p}`" for p in props)
    return f"`{code}` with a `{name}`: {fields}."


def errors_of(spec, op):
    out = []
    for code, resp in sorted(op["responses"].items()):
        if code.startswith("2"):
            continue
        resp = resolve(spec, resp)
        content = resp.get("content", {}).get("application/json")
        if content:
            pinned = content["schema"]["allOf"][1]["properties"]["error"]["properties"]["code"]["enum"][0]
            out.append(f"{code} `{pinned}`")
        else:
            out.append(code)
    return ", ".join(out)


def render(spec):
    ops = backend_operations(spec)
    links = links_to(spec, ops)
    version = spec["openapi"]
    lines = [
        "# Calling Herald from your backend",
        "",
        "<!-- Generated by scripts/gen-backend-docs.py from the OpenAPI document (`herald openapi`).",
        "     Do not edit: change the spec (gateway/src/api/openapi.rs) and regenerate with",
        "     `target/debug/herald openapi > /tmp/spec.json && python3 scripts/gen-backend-docs.py /tmp/spec.json > docs/backend.md`.",
        "     scripts/test.d/openapi.sh checks it is current and runs the Python and Node blocks. -->",
        "",
        f"Herald's HTTP API is described by an OpenAPI {version} document: `GET /openapi.json` on",
        "a running gateway (no credentials), or `herald openapi` without one. Feed it to any",
        "OpenAPI client generator, or copy the snippets below: they use nothing beyond each",
        "language's usual HTTP client. docs/protocol.md is the prose reference.",
        "",
        "Every backend call carries an API key, `Authorization: Bearer hk_…` (`herald keys create",
        "--name backend --scope publish,read`); each operation below names the scope it needs.",
        "Errors are `{\"error\": {\"code\": …, \"message\": …}}` with the status and code listed for",
        "each operation. A publish answered 408 `timeout` (`limits.request_timeout_ms` passed)",
        "may still have been stored: retry it with the same `idempotency_key`.",
        "",
        "Run each language's blocks in order after its setup block and they form one program",
        "(the publish answer's `message_id` feeds the status call). They expect `HERALD_API_KEY`",
        "(and `HERALD_URL`, default `http://127.0.0.1:8080`), user `alice` with device `phone-1`",
        "registered (the last blocks delete it). Device-side routes (`/v1/me/…`, `/v1/connect…`) are the SDK's job and are",
        "not listed here.",
        "",
        "## Setup",
        "",
    ]
    for lang, title in LANGS:
        lines += [f"{title}:", "", f"```{lang}", SETUP[lang].rstrip("\n"), "```", ""]
    produced = set()
    for path, method, op in ops:
        code_blocks, code, resp = snippets(spec, path, method, op, links.get(op["operationId"], {}), produced)
        if "content" in resp:
            produced.add(op["operationId"])
        summary = op.get("summary", "").rstrip(".")
        lines += [
            f"## `{method.upper()} {path}`: {summary}",
            "",
        ]
        if op.get("description"):
            lines += [op["description"].strip(), ""]
        lines += [
            f"Scope `{scope_of(op)}`. Answer: {describe_response(spec, code, resp)}",
            f"Errors: {errors_of(spec, op)}.",
            "",
        ]
        for lang, _ in LANGS:
            lines += [f"```{lang}", code_blocks[lang].rstrip("\n"), "```", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def program(page, lang):
    """The page's blocks of one language, in order, as one program."""
    blocks = re.findall(rf"^```{lang}\n(.*?)^```$", page, flags=re.S | re.M)
    if lang != "go":
        return "\n".join(blocks)
    setup, body = blocks[0], blocks[1:]
    indented = "".join("\n".join("\t" + l if l else l for l in b.splitlines()) + "\n" for b in body)
    return setup + GO_MAIN_OPEN + indented + GO_MAIN_CLOSE


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("spec", help="the OpenAPI JSON (`herald openapi` output); - for stdin")
    ap.add_argument("--check", metavar="PAGE", help="fail if PAGE differs from what would be generated")
    ap.add_argument("--program", choices=[l for l, _ in LANGS], help="print one language's blocks as one program")
    args = ap.parse_args()
    spec = json.load(sys.stdin if args.spec == "-" else open(args.spec, encoding="utf-8"))
    page = render(spec)
    if args.check:
        current = open(args.check, encoding="utf-8").read()
        if current != page:
            import difflib

            sys.stdout.writelines(difflib.unified_diff(
                current.splitlines(True), page.splitlines(True), args.check, "generated"))
            print(f"\n{args.check} is not what scripts/gen-backend-docs.py generates; regenerate it "
                  "(see the comment at its top)", file=sys.stderr)
            sys.exit(1)
        return
    if args.program:
        sys.stdout.write(program(page, args.program))
        return
    sys.stdout.write(page)


if __name__ == "__main__":
    main()
