#!/usr/bin/env python3
"""A deterministic SQLite load for replited's end-to-end tests.

Transaction i (1, 2, 3, ...) does the same thing on every run, so the database content after
any transaction can be rebuilt independently and compared with what a restore produced.

  load.py run DB --from A --to B [--pause-every N --pause-ms M --marks FILE] [--rate TPS]
                 [--commits FILE]
      commits transactions A..=B with Python's sqlite3 (WAL mode, the default autocheckpoint
      left on). With --pause-every, after every N-th transaction it sleeps M ms and appends
      "i<TAB>unix_ms" to FILE, the time taken in the middle of the pause. --commits writes
      "i<TAB>unix_ms" (to the µs) for every transaction, taken as its COMMIT returned.
  load.py state DB        prints "i<TAB>hash": the last transaction applied and a hash of
                          every table's rows in order (not file bytes).
  load.py expect I        prints "I<TAB>hash" for the content after transaction I, rebuilt in
                          memory from scratch.
  load.py checkpoint DB MODE   runs PRAGMA wal_checkpoint(MODE) and prints the result.
  load.py fill DB MB      adds MB megabytes of incompressible rows (table fill) in one
                          transaction, then runs a TRUNCATE checkpoint.
  load.py dump DB         prints a hash of the whole logical content (schema and every row).
  load.py watch DB --until I [--timeout S] [--log FILE]
                          a reader as an app would have one: ONE connection, opened once, reads
                          (meta.i, the ledger) in a read transaction every ms; fails if the ledger
                          total is ever not 4000 (a half-applied transaction) or i goes backwards;
                          exits once i >= I, printing "i<TAB>hash<TAB>states seen" read through
                          the same connection. --log appends "i<TAB>unix_ms" (to the µs) when i
                          changes.
"""
import hashlib
import sqlite3
import sys
import time

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, val INTEGER NOT NULL, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS ledger (acct INTEGER PRIMARY KEY, balance INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);
"""


def init(conn):
    for stmt in SCHEMA.split(";"):
        if stmt.strip():
            conn.execute(stmt)
    conn.execute("INSERT OR IGNORE INTO meta (k, v) VALUES ('i', 0)")
    for a in range(4):
        conn.execute("INSERT OR IGNORE INTO ledger (acct, balance) VALUES (?, 1000)", (a,))


def body(i):
    # Some transactions carry a few KB so pages split, grow and shrink.
    n = 40 if i % 50 else 3000
    return hashlib.sha256(str(i).encode()).hexdigest() * (n // 64 + 1)


def apply(conn, i):
    conn.execute("INSERT INTO items (id, val, body) VALUES (?, ?, ?)", (i, i * 7, body(i)[: (40 if i % 50 else 3000)]))
    if i % 3 == 0:
        conn.execute("UPDATE items SET val = val + 1 WHERE id = ?", (i // 2,))
    if i % 5 == 0:
        conn.execute("DELETE FROM items WHERE id = ?", (i - 4,))
    # Move value between accounts: the total stays 4000 in every committed state.
    a, b = i % 4, (i * 3 + 1) % 4
    if a != b:
        conn.execute("UPDATE ledger SET balance = balance - ? WHERE acct = ?", (i % 17, a))
        conn.execute("UPDATE ledger SET balance = balance + ? WHERE acct = ?", (i % 17, b))
    if i % 2500 == 0:
        # A schema change now and then (the schema cookie moves).
        conn.execute(f"CREATE TABLE side_{i} (x INTEGER NOT NULL)")
        conn.execute(f"INSERT INTO side_{i} (x) VALUES (?)", (i,))
        if i == 2500:
            conn.execute("CREATE INDEX items_val ON items (val)")
    conn.execute("UPDATE meta SET v = ? WHERE k = 'i'", (i,))


def content_hash(conn):
    h = hashlib.sha256()
    for table in ("items", "ledger", "meta"):
        for row in conn.execute(f"SELECT * FROM {table} ORDER BY 1"):
            h.update(repr(row).encode())
    return h.hexdigest()


def connect(path):
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    return conn


def cmd_run(args):
    db = args[0]
    opts = dict(zip(args[1::2], args[2::2]))
    start, end = int(opts["--from"]), int(opts["--to"])
    every = int(opts.get("--pause-every", 0))
    pause = int(opts.get("--pause-ms", 0)) / 1000.0
    marks = opts.get("--marks")
    rate = float(opts.get("--rate", 0))
    committed = [] if "--commits" in opts else None
    conn = connect(db)
    conn.execute("BEGIN IMMEDIATE")
    init(conn)
    conn.execute("COMMIT")
    t0 = time.monotonic()
    for i in range(start, end + 1):
        conn.execute("BEGIN IMMEDIATE")
        apply(conn, i)
        conn.execute("COMMIT")
        if committed is not None:
            committed.append((i, time.time()))
        if every and i % every == 0:
            time.sleep(pause / 2)
            with open(marks, "a") as f:
                f.write(f"{i}\t{int(time.time() * 1000)}\n")
            time.sleep(pause / 2)
        if rate:
            due = t0 + (i - start + 1) / rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    conn.close()
    if committed is not None:
        with open(opts["--commits"], "w") as f:
            f.writelines(f"{i}\t{t * 1000:.3f}\n" for i, t in committed)


def cmd_state(args):
    conn = sqlite3.connect(f"file:{args[0]}?mode=ro", uri=True)
    i = conn.execute("SELECT v FROM meta WHERE k = 'i'").fetchone()[0]
    total = conn.execute("SELECT sum(balance) FROM ledger").fetchone()[0]
    if total != 4000:
        sys.exit(f"ledger invariant broken: total {total}")
    print(f"{i}\t{content_hash(conn)}")


def cmd_expect(args):
    upto = int(args[0])
    conn = sqlite3.connect(":memory:", isolation_level=None)
    init(conn)
    for i in range(1, upto + 1):
        apply(conn, i)
    print(f"{upto}\t{content_hash(conn)}")


def cmd_checkpoint(args):
    conn = sqlite3.connect(args[0], isolation_level=None, timeout=30)
    print(conn.execute(f"PRAGMA wal_checkpoint({args[1]})").fetchall())
    conn.close()


def cmd_fill(args):
    conn = connect(args[0])
    mb = int(args[1])
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("CREATE TABLE IF NOT EXISTS fill (id INTEGER PRIMARY KEY, b BLOB NOT NULL)")
    for _ in range(mb * 16):
        conn.execute("INSERT INTO fill (b) VALUES (randomblob(65536))")
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def cmd_dump(args):
    conn = sqlite3.connect(f"file:{args[0]}?mode=ro", uri=True)
    h = hashlib.sha256()
    for line in conn.iterdump():
        h.update(line.encode())
        h.update(b"\n")
    print(h.hexdigest())


def cmd_watch(args):
    db = args[0]
    opts = dict(zip(args[1::2], args[2::2]))
    until = int(opts["--until"])
    deadline = time.monotonic() + float(opts.get("--timeout", 600))
    log = open(opts["--log"], "a") if "--log" in opts else None
    conn = sqlite3.connect(db, isolation_level=None, timeout=30)
    last, states = -1, 0
    while True:
        conn.execute("BEGIN")
        i = conn.execute("SELECT v FROM meta WHERE k = 'i'").fetchone()[0]
        total = conn.execute("SELECT sum(balance) FROM ledger").fetchone()[0]
        conn.execute("COMMIT")
        if total != 4000:
            sys.exit(f"half a transaction seen: ledger total {total} at i={i}")
        if i < last:
            sys.exit(f"i went backwards: {last} -> {i}")
        if i != last:
            states += 1
            last = i
            if log:
                log.write(f"{i}\t{time.time() * 1000:.3f}\n")
                log.flush()
        if i >= until:
            break
        if time.monotonic() > deadline:
            sys.exit(f"timed out at i={i}, waiting for {until}")
        time.sleep(0.001)
    conn.execute("BEGIN")
    h = content_hash(conn)
    conn.execute("COMMIT")
    print(f"{last}\t{h}\t{states}")


if __name__ == "__main__":
    {
        "run": cmd_run,
        "state": cmd_state,
        "expect": cmd_expect,
        "checkpoint": cmd_checkpoint,
        "fill": cmd_fill,
        "dump": cmd_dump,
        "watch": cmd_watch,
    }[sys.argv[1]](sys.argv[2:])
