#!/usr/bin/env python3
"""Measures an OpenAI-compatible server the way a user feels it: time to the
first streamed token, and total generated tokens per second with N clients at
once. Standard library only, so it runs on a bare GPU machine too.

usage: dev/bench-serve.py --url http://127.0.0.1:8080 --model NAME
           [--label ours] [--prompt-words 100] [--max-tokens 128]
           [--concurrency 1,4,8] [--requests-per-client 2] [--first-only]

Prints one JSON object:
  first_ttft_s     the very first request's time to first token (streamed)
  ttft_s           median time to first token of 3 more streamed requests
  concurrency      for each N: requests, generated tokens, wall seconds,
                   tokens/s summed over clients, median request latency
Nothing here asserts a speed.
"""

import argparse
import json
import statistics
import sys
import threading
import time
import urllib.request


def prompt_text(words):
    # Plain words, the same for every server; only the length matters.
    vocab = ["river", "stone", "light", "quiet", "window", "paper", "garden", "music"]
    return " ".join(vocab[(7 * i) % len(vocab)] for i in range(words))


def post(url, body, stream):
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    return urllib.request.urlopen(req, timeout=600)


def streamed_ttft(base, model, prompt, max_tokens):
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    started = time.perf_counter()
    first = None
    with post(base + "/v1/completions", body, True) as resp:
        for raw in resp:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            choices = chunk.get("choices") or []
            if first is None and choices and choices[0].get("text"):
                first = time.perf_counter() - started
    return first if first is not None else time.perf_counter() - started


def one_request(base, model, prompt, max_tokens):
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    started = time.perf_counter()
    with post(base + "/v1/completions", body, False) as resp:
        answer = json.loads(resp.read())
    seconds = time.perf_counter() - started
    usage = answer.get("usage") or {}
    return usage.get("completion_tokens", 0), seconds


def concurrent(base, model, prompt, max_tokens, clients, per_client):
    results, errors = [], []
    lock = threading.Lock()

    def client():
        for _ in range(per_client):
            try:
                r = one_request(base, model, prompt, max_tokens)
                with lock:
                    results.append(r)
            except Exception as e:  # a failed request is reported, not hidden
                with lock:
                    errors.append(str(e))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    tokens = sum(r[0] for r in results)
    return {
        "clients": clients,
        "requests": len(results),
        "errors": errors[:3],
        "generated_tokens": tokens,
        "wall_seconds": round(wall, 3),
        "tokens_per_second": round(tokens / wall, 1) if wall > 0 else 0.0,
        "median_latency_s": round(statistics.median(r[1] for r in results), 3) if results else None,
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--label", default="server")
    p.add_argument("--prompt-words", type=int, default=100)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--concurrency", default="1,4,8")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--first-only", action="store_true", help="only the first request's TTFT")
    args = p.parse_args()
    base = args.url.rstrip("/")
    prompt = prompt_text(args.prompt_words)
    report = {"label": args.label, "prompt_words": args.prompt_words, "max_tokens": args.max_tokens}
    report["first_ttft_s"] = round(streamed_ttft(base, args.model, prompt, 8), 4)
    if not args.first_only:
        ttfts = [streamed_ttft(base, args.model, prompt, 8) for _ in range(3)]
        report["ttft_s"] = round(statistics.median(ttfts), 4)
        report["concurrency"] = [
            concurrent(base, args.model, prompt, args.max_tokens, int(n), args.requests_per_client)
            for n in args.concurrency.split(",")
        ]
    json.dump(report, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
