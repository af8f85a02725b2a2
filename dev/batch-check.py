#!/usr/bin/env python3
"""Checks that a server's greedy answers do not depend on batching: each
question is asked alone, then all of them at once (and again with staggered
arrivals), and the answers are compared text for text. Standard library
only, so it runs on a bare GPU machine too.

usage: dev/batch-check.py --url http://127.0.0.1:8080 --model NAME
           [--label tandem] [--max-tokens 24] [--batch 8] [--tolerance 0.25]

Prints one JSON object: for each batch, how many answers equal the solo
ones, and the first differing pair if any. Where answers differ it also says
how close the model was to a tie there: answers are compared token by token
(with `logprobs`), and for the first differing token it reports the gap
between the solo run's two most likely tokens and the largest difference of
the chosen tokens' log-probabilities before it.

`--tolerance T` (in nats) is for servers whose batched kernels round
differently from single-sequence ones (bf16 on a GPU): an answer that parts
from the solo one still passes when, up to the parting token, every chosen
token's log-probability is within T of the solo run's, and at the parting
token the solo run's two most likely tokens are within T of each other (a
near-tie that rounding decides). 0 demands identical answers. Exits 1 when
an answer fails that.
"""

import argparse
import json
import sys
import threading
import time
import urllib.request

QUESTIONS = [
    "What is the capital of France?",
    "Name three colours.",
    "Write one sentence about the sea, the wind and the old lighthouse keeper who lived by the shore for forty years.",
    "What is 2 + 2?",
    "Explain in a few words why the sky looks blue during the day and red or orange at sunset, as simply as you can.",
    "Say hello.",
    "List the days of the week.",
    "What do bees make?",
    "Give me a word that rhymes with cat.",
    "What colour is grass?",
    "Count from one to five.",
    "Which is larger, an elephant or a mouse?",
    "Tell me a fact about the moon.",
    "What is the opposite of hot?",
    "Name a fruit that is yellow.",
    "How many legs does a spider have?",
]


def ask(base, model, question, max_tokens):
    body = {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 2,
    }
    req = urllib.request.Request(
        f"{base}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=600) as r:
        answer = json.load(r)
    choice = answer["choices"][0]
    tokens = [
        (t["token"], t["logprob"], [a["logprob"] for a in t["top_logprobs"]])
        for t in (choice.get("logprobs") or {}).get("content") or []
    ]
    return {"text": choice["message"]["content"], "tokens": tokens}


def divergence(batched, solo):
    """Where two answers part, and how near a tie the solo run was there."""
    a, b = batched["tokens"], solo["tokens"]
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x[0] != y[0]), min(len(a), len(b)))
    drift = max((abs(x[1] - y[1]) for x, y in zip(a[:n], b[:n])), default=0.0)
    out = {"first_different_token": n, "max_logprob_difference_before": round(drift, 5)}
    if n < len(b) and len(b[n][2]) >= 2:
        out["solo_top2_gap_there"] = round(b[n][2][0] - b[n][2][1], 5)
    return out


def at_once(base, model, questions, max_tokens, stagger):
    answers = [None] * len(questions)

    def run(i):
        time.sleep(i * stagger)
        answers[i] = ask(base, model, questions[i], max_tokens)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--label", default="server")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tolerance", type=float, default=0.0)
    a = p.parse_args()
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(a.batch)]
    solo = [ask(a.url, a.model, q, a.max_tokens) for q in questions]
    report = {
        "label": a.label,
        "max_tokens": a.max_tokens,
        "tolerance_nats": a.tolerance,
        "solo": [s["text"] for s in solo],
        "batches": [],
    }
    ok = True
    for size, stagger in [(min(4, a.batch), 0.0), (a.batch, 0.0), (a.batch, 0.05)]:
        got = at_once(a.url, a.model, questions[:size], a.max_tokens, stagger)
        same = sum(1 for g, s in zip(got, solo) if g["text"] == s["text"])
        entry = {"size": size, "stagger_s": stagger, "equal": same, "differences": []}
        for i, g in enumerate(got):
            if g["text"] != solo[i]["text"]:
                d = divergence(g, solo[i])
                d["within_tolerance"] = (
                    a.tolerance > 0
                    and d["max_logprob_difference_before"] <= a.tolerance
                    and d.get("solo_top2_gap_there", float("inf")) <= a.tolerance
                )
                ok = ok and d["within_tolerance"]
                entry["differences"].append({"index": i, **d})
        entry["max_logprob_difference_before_parting"] = max(
            (d["max_logprob_difference_before"] for d in entry["differences"]), default=0.0
        )
        report["batches"].append(entry)
    report["all_equal"] = all(b["equal"] == b["size"] for b in report["batches"])
    report["pass"] = ok
    print(json.dumps(report))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
