#!/usr/bin/env python3
"""A small client for a running PocketBase (0.40 REST API), for replited's end-to-end tests.

Standard library only. The superuser must exist beforehand:
    pocketbase superuser upsert EMAIL PASSWORD --dir DIR

  pb.py wait-health --url URL [--timeout 30]
      polls GET /api/health until it answers 200 (exit 1 on timeout).
  pb.py setup --url URL --email E --password P
      as superuser, creates the base collection "posts" with a text field "title" and public
      list/view rules (""); if it exists already, makes sure the field and rules are there.
  pb.py create --url URL --email E --password P --title T
      creates a record in "posts" and prints its id.
  pb.py get --url URL --id ID
      fetches the record without auth (public view rule) and prints its title; exit 1 on 404.

Any other HTTP error prints the status and body on stderr and exits 2.
"""
import argparse
import json
import sys
import time
import urllib.error
import urllib.request

COLLECTION = "posts"


class HttpError(Exception):
    def __init__(self, method, path, status, body):
        super().__init__(f"{method} {path}: HTTP {status}: {body}")
        self.status = status


def request(url, method, path, body=None, token=None, timeout=10):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url.rstrip("/") + path, data=data, method=method)
    req.add_header("Accept", "application/json")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", token)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as e:
        raise HttpError(method, path, e.code, e.read().decode(errors="replace")) from None
    return json.loads(raw) if raw else None


def superuser_token(args):
    res = request(
        args.url,
        "POST",
        "/api/collections/_superusers/auth-with-password",
        {"identity": args.email, "password": args.password},
    )
    return res["token"]


def cmd_wait_health(args):
    deadline = time.monotonic() + args.timeout
    last = None
    while True:
        try:
            request(args.url, "GET", "/api/health", timeout=2)
            return 0
        except (HttpError, OSError) as e:  # URLError and connection errors are OSErrors
            last = e
        if time.monotonic() >= deadline:
            print(f"pb.py: {args.url}/api/health not healthy after {args.timeout}s: {last}",
                  file=sys.stderr)
            return 1
        time.sleep(0.1)


def cmd_setup(args):
    token = superuser_token(args)
    try:
        existing = request(args.url, "GET", f"/api/collections/{COLLECTION}", token=token)
    except HttpError as e:
        if e.status != 404:
            raise
        existing = None
    if existing is None:
        request(
            args.url,
            "POST",
            "/api/collections",
            {
                "name": COLLECTION,
                "type": "base",
                "fields": [{"name": "title", "type": "text"}],
                "listRule": "",
                "viewRule": "",
            },
            token=token,
        )
        print(f"pb.py: created collection {COLLECTION}", file=sys.stderr)
        return 0
    fields = existing.get("fields", [])
    patch = {"listRule": "", "viewRule": ""}
    if not any(f.get("name") == "title" for f in fields):
        patch["fields"] = fields + [{"name": "title", "type": "text"}]
    if (existing.get("listRule") != "" or existing.get("viewRule") != ""
            or "fields" in patch):
        request(args.url, "PATCH", f"/api/collections/{COLLECTION}", patch, token=token)
        print(f"pb.py: updated collection {COLLECTION}", file=sys.stderr)
    else:
        print(f"pb.py: collection {COLLECTION} already set up", file=sys.stderr)
    return 0


def cmd_create(args):
    token = superuser_token(args)
    rec = request(args.url, "POST", f"/api/collections/{COLLECTION}/records",
                  {"title": args.title}, token=token)
    print(rec["id"])
    return 0


def cmd_get(args):
    try:
        rec = request(args.url, "GET", f"/api/collections/{COLLECTION}/records/{args.id}")
    except HttpError as e:
        if e.status == 404:
            print(f"pb.py: record {args.id} not found", file=sys.stderr)
            return 1
        raise
    print(rec.get("title", ""))
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    def add(name, fn, auth=False):
        sp = sub.add_parser(name)
        sp.add_argument("--url", required=True, help="e.g. http://127.0.0.1:8090")
        if auth:
            sp.add_argument("--email", required=True)
            sp.add_argument("--password", required=True)
        sp.set_defaults(fn=fn)
        return sp

    add("wait-health", cmd_wait_health).add_argument("--timeout", type=float, default=30)
    add("setup", cmd_setup, auth=True)
    add("create", cmd_create, auth=True).add_argument("--title", required=True)
    add("get", cmd_get).add_argument("--id", required=True)

    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except HttpError as e:
        print(f"pb.py: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"pb.py: cannot reach {args.url}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
