"""The product's workflow on a transformers model, in one command: time, record, tune, time again.

    python3 bench/model_example.py --db sqlite:////tmp/example.db --out /tmp/example

1. `time` (a fresh process): a Llama built from a config (random weights, nothing downloaded; bf16 on
   CUDA) with flashtune's attention (`model.set_attn_implementation(register())`), prefill of the
   given batch shapes timed, median of --reps; the "before" numbers, with whatever the database holds.
2. `record`: the same forward passes with FLASHTUNE_RECORD=1: the dispatcher counts the keys the
   model's attention calls resolve to and writes them to the database at exit.
3. `tune --recorded --db URL --budget B`: tunes exactly those keys.
4. `time` again in a fresh process, which loads the new winners: the "after" numbers.

Each step is a subprocess, so each loads the database as an app would at import. Prints a
before/after table last and writes <out>/model_example.json. `--database` must be one this run
may write (a fresh file is best: the "before" then runs the defaults).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import Runs, arguments, out_dir, print_table, provenance, synced_s, write_json

SHAPES = ((1, 1024), (4, 512), (1, 4096))


def _model(layers: int, hidden: int, heads: int, kv_heads: int, seed: int) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from flashtune.kernel.integrations.transformers import register

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=32000,
                         max_position_embeddings=8192)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    model.set_attn_implementation(register())
    return model


def _step(args: argparse.Namespace) -> int:
    """`time` or `record`, inside its own process."""
    import torch

    torch.set_grad_enabled(False)
    model = _model(args.layers, args.hidden, args.heads, args.kv_heads, args.seed)
    result = {}
    for batch, n in SHAPES:
        ids = torch.randint(0, 32000, (batch, n), device="cuda")
        for _ in range(args.warmup):
            model(ids, use_cache=False, logits_to_keep=1)
        times = [synced_s(lambda: model(ids, use_cache=False, logits_to_keep=1))
                 for _ in range(args.reps if args.step == "time" else 1)]
        result[f"B={batch} N={n}"] = statistics.median(times) * 1e3
    print(json.dumps(result))
    return 0


def _run(cmd: list[str], env: dict[str, str]) -> str:
    print("$", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    sys.stderr.write(done.stderr[-4000:])
    if done.returncode != 0:
        sys.stdout.write(done.stdout[-4000:])
        raise SystemExit(f"model_example: step failed with exit code {done.returncode}: {' '.join(cmd)}")
    return done.stdout


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__, out="optional", out_help="directory for model_example.json (the driver only)",
                       seed=True, timing=[Runs(warmup=2, reps=10, what="each prefill shape")])
    parser.add_argument("--db", required=True, help="database URL to record into and tune (e.g. sqlite:////tmp/x.db)")
    parser.add_argument("--budget", default="150s", help="tune --budget (default 150s)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--step", choices=("time", "record"), help=argparse.SUPPRESS)  # the subprocesses
    args = parser.parse_args(argv)
    if args.step:
        return _step(args)
    if not args.out:
        parser.error("--out is required")
    out = out_dir(args.out)
    env = {**os.environ, "FLASHTUNE_DB": args.db}
    env.pop("FLASHTUNE_RECORD", None)
    me = [sys.executable, str(Path(__file__).resolve()), "--db", args.db, "--layers", str(args.layers),
          "--hidden", str(args.hidden), "--heads", str(args.heads), "--kv-heads", str(args.kv_heads),
          "--reps", str(args.reps), "--warmup", str(args.warmup), "--seed", str(args.seed)]
    started = time.perf_counter()
    before = json.loads(_run([*me, "--step", "time"], env).strip().splitlines()[-1])
    _run([*me, "--step", "record"], {**env, "FLASHTUNE_RECORD": "1"})
    shown = _run([shutil.which("flashtune") or "flashtune", "show", "--recorded", "--db", args.db], env)
    print(shown, flush=True)
    tuned = _run([shutil.which("tune") or "tune", "--recorded", "--db", args.db, "--budget", args.budget], env)
    print(tuned[-3000:], flush=True)
    after = json.loads(_run([*me, "--step", "time"], env).strip().splitlines()[-1])
    result = {**provenance(), "db": args.db,
              "model": {"layers": args.layers, "hidden": args.hidden, "heads": args.heads, "kv_heads": args.kv_heads,
                        "dtype": "bf16"},
              "before_ms": before, "after_ms": after, "seconds": time.perf_counter() - started}
    write_json(out / "model_example.json", result)
    print(f"\nLlama {args.layers} layers, hidden {args.hidden}, {args.heads}/{args.kv_heads} heads, bf16; prefill "
          f"(use_cache=False), median of {args.reps}; {result['seconds']:.0f} s in all; wrote "
          f"{out / 'model_example.json'}")
    print_table(["prefill", "before tuning (ms)", "after (ms)", "speed-up"],
                [[shape, ms, after[shape], f"×{ms / after[shape]:.3f}"] for shape, ms in before.items()],
                markdown=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
