#!/usr/bin/env python3
"""Measures an OpenAI-compatible server the way its users feel it: N clients
at once, each streaming R requests one after the other, every request timed
chunk by chunk. Standard library only, so it runs on a bare GPU machine too.
dev/bench-serve.sh drives it (our `tandem-agent serve` beside `mlx_lm.server`);
dev/gpu.sh's serve stage calls the first form directly.

usage:
  dev/bench-serve.py [run] --url http://127.0.0.1:8080 --model NAME
           [--label ours] [--endpoint completions|chat] [--prompt-words 100]
           [--max-tokens 128] [--concurrency 1,4,8] [--requests-per-client 2]
           [--warmup-clients 1] [--pid PID] [--seed 0] [--first-only]
           [--details] [--set KEY=VALUE]... [--out FILE]
  dev/bench-serve.py report --json PATH [--meta FILE] RUN.json...
  dev/bench-serve.py tree PID     PID and its descendants, one a line (from
                                  /proc: a bare machine may have no `ps`)

`run` prints (or writes to --out) one JSON object:
  first_ttft_s   the very first request's time to first token (a warm-up,
                 not counted below; then, with --warmup-clients N > 1, one
                 untimed round of N clients at once)
  ttft_s         median TTFT at the first concurrency level
  idle_rss_bytes the server's resident memory before the first request
  concurrency    one entry per level N: requests, errors, generated tokens,
                 wall seconds, tokens/s (all completion tokens / wall),
                 p50/p99 of TTFT, of the inter-token latency (every gap
                 between successive streamed content chunks) and of TPOT
                 (per request: (end - first token) / (tokens - 1)), and the
                 peak RSS of the server's whole process tree (--pid; sampled
                 every 100 ms from /proc), and its GPU memory where
                 nvidia-smi is present (sampled every second); with
                 --details, every request's record too (start, TTFT, gaps,
                 end, tokens)

Every request has a prompt of its own (words drawn from a seeded generator,
keyed by level, client and request), so no server's prefix cache reuses an
earlier one; the same --seed gives every server the same prompts. Tokens are
counted from `usage` (stream_options.include_usage); a server that sends no
usage is counted in content chunks, and the report says so.

`report` joins the run files of dev/bench-serve.sh into one JSON file and
prints a Markdown table, each server beside the others at each concurrency.
Nothing here asserts a speed.
"""

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

# ---- prompts ----------------------------------------------------------------

WORDS = (
    "river stone light quiet window paper garden music winter orange valley "
    "letter silver morning bridge forest candle harbor meadow thunder pocket "
    "lantern copper island marble shadow feather ribbon castle violin saddle "
    "planet cotton mirror tunnel basket desert engine fabric glacier helmet "
    "jacket kettle ladder magnet needle oyster pepper quartz rocket spider "
    "tomato umbrella walnut yellow zebra anchor button cherry dolphin"
).split()


def prompt_text(words, key, seed=0):
    """`words` words, a different sequence for every key (and seed)."""
    rng = random.Random(f"{seed}/{key}")
    return " ".join(rng.choice(WORDS) for _ in range(words))


# ---- one streamed request -----------------------------------------------------


def request_body(endpoint, model, prompt, max_tokens):
    body = {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


def chunk_text(chunk):
    """The content a streamed chunk carries ('' for role, finish and usage chunks)."""
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    c = choices[0]
    if "text" in c:
        return c.get("text") or ""
    return (c.get("delta") or {}).get("content") or ""


def streamed(base, endpoint, model, prompt, max_tokens):
    """One streamed request. Times are seconds from when it was sent."""
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    req = urllib.request.Request(
        base + path,
        data=json.dumps(request_body(endpoint, model, prompt, max_tokens)).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    started = time.perf_counter()
    arrivals, usage, error = [], None, None
    try:
        with urllib.request.urlopen(req, timeout=600) as resp:
            for raw in resp:
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    error = json.dumps(chunk["error"])[:300]
                    break
                if chunk_text(chunk):
                    arrivals.append(time.perf_counter() - started)
                if chunk.get("usage"):
                    usage = chunk["usage"]
    except urllib.error.HTTPError as e:
        error = f"HTTP {e.code}: {e.read()[:300].decode('utf-8', 'replace')}"
    except Exception as e:  # a failed request is reported, not hidden
        error = f"{type(e).__name__}: {e}"
    end = time.perf_counter() - started
    if error is None and not arrivals:
        error = "no content streamed"
    return {
        "ttft_s": arrivals[0] if arrivals else None,
        "gaps_s": [b - a for a, b in zip(arrivals, arrivals[1:])],
        "end_s": end,
        "chunks": len(arrivals),
        "completion_tokens": (usage or {}).get("completion_tokens"),
        "prompt_tokens": (usage or {}).get("prompt_tokens"),
        "error": error,
    }


def tokens_of(record):
    n = record["completion_tokens"]
    return n if n is not None else record["chunks"]


# ---- the server's memory -----------------------------------------------------


def process_tree(root):
    """root and all its descendants, from /proc."""
    children = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def rss_bytes(pids):
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * page
        except OSError:
            pass
    return total


def gpu_bytes(pids):
    """GPU memory nvidia-smi reports for these processes (None without nvidia-smi)."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    wanted, total = set(pids), 0
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and int(parts[0]) in wanted:
            total += int(float(parts[1])) * 2**20
    return total


class MemorySampler:
    """Peak RSS (every 100 ms) and GPU memory (every second) of a process tree,
    between start() and stop()."""

    def __init__(self, pid):
        self.pid = pid
        self.peak_rss = None
        self.peak_gpu = None
        self._stop = threading.Event()
        self._threads = []

    def _rss_loop(self):
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss or 0, rss_bytes(process_tree(self.pid)))
            self._stop.wait(0.1)

    def _gpu_loop(self):
        while not self._stop.is_set():
            used = gpu_bytes(process_tree(self.pid))
            if used is None:
                return
            self.peak_gpu = max(self.peak_gpu or 0, used)
            self._stop.wait(1.0)

    def start(self):
        if self.pid:
            self._threads = [threading.Thread(target=f, daemon=True) for f in (self._rss_loop, self._gpu_loop)]
            for t in self._threads:
                t.start()
        return self

    def stop(self):
        self._stop.set()
        for t in self._threads:
            t.join()
        return self


# ---- a concurrency level -------------------------------------------------------


def percentile(values, q):
    """Linear interpolation between closest ranks (numpy's default)."""
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    k = (len(values) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def rounded(x, digits=4):
    return None if x is None else round(x, digits)


def level(args, clients, per_client, key):
    """`clients` threads, each sending `per_client` streamed requests in turn."""
    records, lock = [], threading.Lock()
    level_start = time.perf_counter()

    def client(c):
        for r in range(per_client):
            prompt = prompt_text(args.prompt_words, f"{key}/{c}/{r}", args.seed)
            sent = time.perf_counter() - level_start
            rec = streamed(args.base, args.endpoint, args.model, prompt, args.max_tokens)
            rec.update(client=c, request=r, start_s=sent, end_s=sent + rec["end_s"])
            with lock:
                records.append(rec)

    sampler = MemorySampler(args.pid).start()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - level_start
    sampler.stop()
    return records, wall, sampler


def summary(clients, records, wall, sampler, details):
    ok = [r for r in records if r["error"] is None]
    tokens = sum(tokens_of(r) for r in ok)
    gaps = [g for r in ok for g in r["gaps_s"]]
    ttfts = [r["ttft_s"] for r in ok]
    tpots = [(r["end_s"] - r["start_s"] - r["ttft_s"]) / (tokens_of(r) - 1) for r in ok if tokens_of(r) > 1]
    latencies = [r["end_s"] - r["start_s"] for r in ok]
    out = {
        "clients": clients,
        "requests": len(ok),
        "errors": len(records) - len(ok),
        "error_examples": sorted({r["error"] for r in records if r["error"]})[:3],
        "generated_tokens": tokens,
        "tokens_counted_from": "usage" if all(r["completion_tokens"] is not None for r in ok) else "chunks",
        "mean_completion_tokens": rounded(tokens / len(ok), 1) if ok else None,
        "mean_prompt_tokens": rounded(statistics.mean(r["prompt_tokens"] for r in ok), 1)
        if ok and all(r["prompt_tokens"] is not None for r in ok) else None,
        "wall_seconds": round(wall, 3),
        "tokens_per_second": round(tokens / wall, 2) if wall > 0 else 0.0,
        "ttft_p50_s": rounded(percentile(ttfts, 50)),
        "ttft_p99_s": rounded(percentile(ttfts, 99)),
        "itl_p50_s": rounded(percentile(gaps, 50), 5),
        "itl_p99_s": rounded(percentile(gaps, 99), 5),
        "tpot_p50_s": rounded(percentile(tpots, 50), 5),
        "median_latency_s": rounded(statistics.median(latencies), 3) if latencies else None,
        "peak_rss_bytes": sampler.peak_rss,
        "peak_gpu_memory_bytes": sampler.peak_gpu,
    }
    if details:
        out["records"] = [
            {
                "client": r["client"],
                "request": r["request"],
                "start_s": rounded(r["start_s"], 6),
                "ttft_s": rounded(r["ttft_s"], 6),
                "gaps_s": [round(g, 6) for g in r["gaps_s"]],
                "end_s": rounded(r["end_s"], 6),
                "completion_tokens": r["completion_tokens"],
                "prompt_tokens": r["prompt_tokens"],
                "chunks": r["chunks"],
                "error": r["error"],
            }
            for r in sorted(records, key=lambda r: (r["client"], r["request"]))
        ]
    return out


def cmd_run(args):
    args.base = args.url.rstrip("/")
    report = {
        "label": args.label,
        "url": args.base,
        "model": args.model,
        "endpoint": args.endpoint,
        "prompt_words": args.prompt_words,
        "max_tokens": args.max_tokens,
        "requests_per_client": args.requests_per_client,
        "seed": args.seed,
        "idle_rss_bytes": rss_bytes(process_tree(args.pid)) if args.pid else None,
    }
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            report[key] = json.loads(value)
        except ValueError:
            report[key] = value
    first = streamed(args.base, args.endpoint, args.model,
                     prompt_text(args.prompt_words, "first", args.seed), args.max_tokens)
    if first["error"]:
        sys.exit(f"bench-serve: the first request to {args.base} failed: {first['error']}")
    report["first_ttft_s"] = rounded(first["ttft_s"])
    if not args.first_only:
        if args.warmup_clients > 1:
            level(args, args.warmup_clients, 1, "warmup")
        levels = [int(n) for n in args.concurrency.split(",")]
        report["concurrency"] = [
            summary(n, *level(args, n, args.requests_per_client, f"level-{n}"), args.details) for n in levels
        ]
        report["ttft_s"] = report["concurrency"][0]["ttft_p50_s"]
    text = json.dumps(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        sys.stdout.write(text + "\n")


# ---- report ----------------------------------------------------------------------


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def gpu_names():
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines() or None


def machine():
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = None
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "memory_gib": rounded(mem, 1),
        "gpus": gpu_names(),
        "load_average_at_end": rounded(os.getloadavg()[0], 2),
        "host": platform.node(),
    }


def mb(n):
    return "–" if n is None else f"{n / 1e6:.0f}"


def ms(s):
    return "–" if s is None else f"{s * 1000:.1f}"


def cmd_report(args):
    meta = {}
    if args.meta:
        with open(args.meta) as f:
            meta = json.load(f)
    runs = []
    for path in args.runs:
        with open(path) as f:
            runs.append(json.load(f))
    result = {
        "benchmark": "serve",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {**machine(), **meta.pop("machine", {})},
        **meta,
        "servers": runs,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")

    m = result["machine"]
    print(f"\n## Serving benchmark: {meta.get('model', {}).get('name', '?')}")
    gpus = "; ".join(m["gpus"]) if m.get("gpus") else "no GPU"
    print(f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB RAM, {gpus}; "
          f"MLX {m.get('mlx', '?')}; load average at the end {m['load_average_at_end']}")
    s = meta.get("settings", {})
    print(f"{s.get('endpoint', '?')} endpoint, streamed, temperature 0; prompts of "
          f"{s.get('prompt_words', '?')} words, a different one per request; max_tokens "
          f"{s.get('max_tokens', '?')}; each client sends {s.get('requests_per_client', '?')} "
          f"request(s) in turn. tok/s = all completion tokens / wall time; ITL = gaps between "
          f"streamed chunks; RSS = peak over the server's process tree.\n")
    for r in runs:
        if r.get("error"):
            print(f"- {r['label']}: FAILED: {r['error']}")
            continue
        extra = []
        if r.get("ready_seconds") is not None:
            extra.append(f"ready after {r['ready_seconds']} s")
        extra.append(f"first request's TTFT {r.get('first_ttft_s')} s")
        extra.append(f"idle RSS {mb(r.get('idle_rss_bytes'))} MB")
        print(f"- {r['label']} ({r.get('notes', '')}): " + ", ".join(extra))
    print()
    gpu = any(lv.get("peak_gpu_memory_bytes") is not None for r in runs for lv in r.get("concurrency", []))
    peer = next((r for r in runs if r.get("kind") == "peer"), None)
    head = ("| clients | server | tok/s | vs peer | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | "
            "ITL p99 ms | TPOT p50 ms | tokens/req | peak RSS MB |")
    rule = "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    if gpu:
        head += " peak GPU MB |"
        rule += "---:|"
    print(head)
    print(rule)
    levels = sorted({lv["clients"] for r in runs for lv in r.get("concurrency", [])})
    for n in levels:
        peer_lv = next((lv for lv in (peer or {}).get("concurrency", []) if lv["clients"] == n), None)
        for r in runs:
            lv = next((x for x in r.get("concurrency", []) if x["clients"] == n), None)
            if lv is None:
                continue
            ratio = "–"
            if peer_lv and peer_lv["tokens_per_second"] and r is not peer:
                ratio = f"{lv['tokens_per_second'] / peer_lv['tokens_per_second']:.2f}×"
            errors = f" ({lv['errors']} failed)" if lv["errors"] else ""
            counted = "" if lv["tokens_counted_from"] == "usage" else " (chunks)"
            row = (f"| {n} | {r['label']}{errors} | {lv['tokens_per_second']:.1f} | {ratio} | "
                   f"{ms(lv['ttft_p50_s'])} | {ms(lv['ttft_p99_s'])} | {ms(lv['itl_p50_s'])} | "
                   f"{ms(lv['itl_p99_s'])} | {ms(lv['tpot_p50_s'])} | "
                   f"{lv['mean_completion_tokens']}{counted} | {mb(lv['peak_rss_bytes'])} |")
            if gpu:
                row += f" {mb(lv.get('peak_gpu_memory_bytes'))} |"
            print(row)
    for r in runs:
        for lv in r.get("concurrency", []):
            for e in lv["error_examples"]:
                print(f"\n{r['label']}, {lv['clients']} clients, a failed request: {e}")
    print(f"\nJSON: {args.json}")


def main():
    argv = sys.argv[1:]
    command = argv.pop(0) if argv and argv[0] in ("run", "report", "tree") else "run"
    if command == "tree":
        print("\n".join(str(pid) for pid in process_tree(int(argv[0]))))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    if command == "report":
        p.add_argument("--json", required=True, help="the combined JSON file to write")
        p.add_argument("--meta", help="a JSON object merged into the report (machine, model, settings)")
        p.add_argument("runs", nargs="+", help="`run --out` files, one per server")
        cmd_report(p.parse_args(argv))
        return
    p.add_argument("--url", required=True)
    p.add_argument("--model", required=True, help="the model name the server answers to")
    p.add_argument("--label", default="server")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--prompt-words", type=int, default=100)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--concurrency", default="1,4,8")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--warmup-clients", type=int, default=1,
                   help="after the first request, one untimed round with this many clients")
    p.add_argument("--pid", type=int, help="the server's process: its tree's memory is sampled")
    p.add_argument("--seed", type=int, default=0, help="which prompts (the same for every server)")
    p.add_argument("--first-only", action="store_true", help="only the first request's TTFT")
    p.add_argument("--details", action="store_true", help="every request's record in the output")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="add this field to the output (VALUE as JSON where it parses)")
    p.add_argument("--out", help="write the JSON here instead of stdout")
    cmd_run(p.parse_args(argv))


if __name__ == "__main__":
    main()
