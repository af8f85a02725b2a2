"""The reference side of Tandem's engine tests and benchmarks: mlx-lm.

Every command loads a model directory with mlx-lm, does one thing, and prints
one JSON object on stdout, so the Rust tests and dev/bench-engine.sh can put
mlx-lm's answer next to the engine's:

  logits   --model DIR --ids 1,2,3            last-position logits of model(ids)
  greedy   --model DIR --ids 1,2,3 --max-tokens N
                                             greedy ids, mlx-lm's generate_step
  encode   --model DIR --text T [--chat] [--system S] [--date D]
                                             prompt ids as mlx-lm makes them
  batch    --requests FILE                    many of the above in one process:
                                             FILE is a JSON list of objects with
                                             "op" (logits, greedy or encode) and
                                             the options as keys; prints a list.
                                             Two more ops exist only here:
                                             "tokenize" (tokenizer DIR, texts: the
                                             `tokenizers` library's ids and decoded
                                             text per string) and "template"
                                             (tokenizer DIR, conversations:
                                             transformers' apply_chat_template)
  bench    --model DIR --ids 1,2,3 --max-tokens N
                                             prefill/decode speed, TTFT, memory;
                                             under `mlx.launch` the model is
                                             sharded over the group (mlx-lm's
                                             own tensor parallelism)
  serve    [--dtype D|auto] -- ARGS            mlx_lm.server with ARGS, its model cast
                                             first (auto: float32 on the CPU, as our
                                             engine's auto does; as loaded elsewhere);
                                             it serves until stopped, printing no JSON
                                             (dev/bench-serve.sh)
"""

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path


def _ids(text):
    return [int(t) for t in text.split(",") if t.strip()]


def _read_bytes():
    """Bytes this process has read through system calls (Linux)."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _peak_rss():
    """Peak resident set size in bytes (Linux reports KiB)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


_LOADED = {}


def _load(path, dtype=None):
    """mlx-lm's load, or its tensor-parallel sharded_load under mlx.launch;
    with `dtype` the model's float parameters are cast (model.set_dtype).
    Loads are remembered, so a batch loads each model once."""
    if (path, dtype) not in _LOADED:
        _LOADED[(path, dtype)] = _load_fresh(path, dtype)
    return _LOADED[(path, dtype)]


def _load_fresh(path, dtype):
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.utils import sharded_load

    group = mx.distributed.init()
    if group.size() > 1:
        model, tokenizer = sharded_load(path)
    else:
        model, tokenizer = load(path)
    if dtype:
        model.set_dtype(getattr(mx, dtype))
        mx.eval(model.parameters())
    return model, tokenizer, group


def _cpu_seconds():
    """CPU time (user + system, all threads) of this process."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cmd_logits(args):
    import mlx.core as mx

    model, _, _ = _load(args.model, args.dtype)
    logits = model(mx.array([_ids(args.ids)]))[0, -1].astype(mx.float32)
    mx.eval(logits)
    return {"logits": logits.tolist()}


def cmd_greedy(args):
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    model, tokenizer, _ = _load(args.model, args.dtype)
    eos = set(tokenizer.eos_token_ids)
    out = []
    for token, _ in generate_step(mx.array(_ids(args.ids)), model, max_tokens=args.max_tokens):
        if token in eos and not args.ignore_eos:
            break
        out.append(int(token))
    return {"generated_ids": out}


def cmd_encode(args):
    _, tokenizer, _ = _load(args.model)
    if args.chat:
        messages = []
        if args.system is not None:
            messages.append({"role": "system", "content": args.system})
        messages.append({"role": "user", "content": args.text})
        extra = {"date_string": args.date} if args.date else {}
        text = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False, **extra
        )
        ids = tokenizer.encode(text, add_special_tokens=False)
        return {"text": text, "ids": list(ids)}
    bos = tokenizer.bos_token
    add = bos is None or not args.text.startswith(bos)
    ids = tokenizer.encode(args.text, add_special_tokens=add)
    return {"ids": list(ids), "decoded": tokenizer.decode(ids, skip_special_tokens=True)}


def cmd_tokenize(args):
    """The `tokenizers` library on tokenizer.json alone: ids without special
    tokens added, and the text those ids decode to (special tokens skipped)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(args.tokenizer, "tokenizer.json"))
    out = []
    for text in args.texts:
        ids = tok.encode(text, add_special_tokens=False).ids
        out.append({"ids": ids, "decoded": tok.decode(ids, skip_special_tokens=True)})
    return {"results": out}


def cmd_template(args):
    """transformers' apply_chat_template (text, not ids) per conversation."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    rendered = [
        tok.apply_chat_template(c, add_generation_prompt=args.add_generation_prompt,
                                tokenize=False)
        for c in args.conversations
    ]
    return {"rendered": rendered}


def cmd_bench(args):
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    read_before = _read_bytes()
    started = time.perf_counter()
    model, _, group = _load(args.model, args.dtype)
    load_seconds = time.perf_counter() - started
    read_after = _read_bytes()

    # The prompt's ids come from the caller, so the Rust engine gets the same.
    prompt = _ids(args.ids)
    # Warm-up on the measured prompt itself, so one-time costs (thread pools,
    # the allocator, and on a GPU the kernels of these shapes) are not measured.
    for _ in generate_step(mx.array(prompt), model, max_tokens=2):
        pass
    mx.reset_peak_memory()

    tokens = []
    cpu_start = _cpu_seconds()
    tic = time.perf_counter()
    first = last = None
    for token, _ in generate_step(mx.array(prompt), model, max_tokens=args.max_tokens):
        now = time.perf_counter()
        cpu_now = _cpu_seconds()
        if first is None:
            first, cpu_first = now, cpu_now
        last, cpu_last = now, cpu_now
        tokens.append(int(token))
    ttft = first - tic
    decode_seconds = last - first
    report = {
        "rank": group.rank(),
        "world_size": group.size(),
        "prompt_tokens": len(prompt),
        "generated_tokens": len(tokens),
        "generated_ids": tokens,
        "load_seconds": load_seconds,
        "time_to_first_token_seconds": ttft,
        "prefill_tokens_per_second": len(prompt) / ttft,
        "decode_seconds": decode_seconds,
        "decode_tokens_per_second": (len(tokens) - 1) / decode_seconds if decode_seconds > 0 else 0.0,
        "prefill_cpu_seconds": cpu_first - cpu_start,
        "decode_cpu_seconds": cpu_last - cpu_first,
        "bytes_read": (read_after - read_before) if read_before is not None else None,
        "peak_rss_bytes": _peak_rss(),
        "mlx_peak_memory_bytes": mx.get_peak_memory(),
    }
    if group.size() > 1:
        # Every rank prints; the caller keeps rank 0's figures and the
        # per-rank bytes and memory.
        report["bytes_read_this_rank"] = report["bytes_read"]
    return report


def cmd_batch(args):
    with open(args.requests) as f:
        requests = json.load(f)
    handlers = {"logits": cmd_logits, "greedy": cmd_greedy, "encode": cmd_encode,
                "tokenize": cmd_tokenize, "template": cmd_template}
    defaults = {"dtype": None, "max_tokens": 16, "ignore_eos": False, "chat": False,
                "system": None, "date": None, "add_generation_prompt": True}
    results = []
    for request in requests:
        options = dict(defaults)
        options.update({k: v for k, v in request.items() if k != "op"})
        if isinstance(options.get("ids"), list):
            options["ids"] = ",".join(str(i) for i in options["ids"])
        results.append(handlers[request["op"]](argparse.Namespace(**options)))
    return results


def cmd_serve(argv):
    """mlx_lm.server, unchanged but for the dtype of the model it loads."""
    p = argparse.ArgumentParser(prog="mlx_lm_peer.py serve")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, ..., auto or as-loaded")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="-- then mlx_lm.server's arguments")
    args = p.parse_args(argv)
    import mlx.core as mx
    import mlx_lm.server as server

    dtype = args.dtype
    if dtype == "auto":
        dtype = "float32" if mx.default_device() == mx.cpu else "as-loaded"
    if dtype != "as-loaded":
        load = server.load  # the name server.py calls; sharded_load is left alone

        def cast_load(*a, **kw):
            model, *rest = load(*a, **kw)
            model.set_dtype(getattr(mx, dtype))
            mx.eval(model.parameters())
            return (model, *rest)

        server.load = cast_load
    print(f"mlx_lm.server with the model's float parameters {dtype}", file=sys.stderr, flush=True)
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    sys.argv = ["mlx_lm.server", *rest]
    server.main()


def main():
    if sys.argv[1:2] == ["serve"]:
        return cmd_serve(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("logits")
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", help="cast the model first, e.g. float32")
    p.add_argument("--ids", required=True)

    p = sub.add_parser("greedy")
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", help="cast the model first, e.g. float32")
    p.add_argument("--ids", required=True)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--ignore-eos", action="store_true")

    p = sub.add_parser("encode")
    p.add_argument("--model", required=True)
    p.add_argument("--text", required=True)
    p.add_argument("--chat", action="store_true")
    p.add_argument("--system")
    p.add_argument("--date")

    p = sub.add_parser("batch")
    p.add_argument("--requests", required=True)

    p = sub.add_parser("bench")
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", help="cast the model first, e.g. float32")
    p.add_argument("--ids", required=True)
    p.add_argument("--max-tokens", type=int, default=64)

    args = parser.parse_args()
    result = {
        "logits": cmd_logits,
        "greedy": cmd_greedy,
        "encode": cmd_encode,
        "bench": cmd_bench,
        "batch": cmd_batch,
    }[args.command](args)
    rank = int(os.environ.get("MLX_RANK", "0"))
    if rank != 0 and args.command != "bench":
        return
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
