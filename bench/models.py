"""Whole transformers models: record, tune, then flashtune's attention against attn_implementation="sdpa".

Four models built from configs (random weights, nothing downloaded; bf16 on CUDA):

- `gqa`: a Llama-style decoder, 16 query heads over 2 KV heads (group 8), D=128;
- `mqa`: a Gemma-style decoder, 8 query heads over one KV head, D=256;
- `bert`: a BERT-style encoder (12 heads of 64, bidirectional);
- `vit`: a ViT-B/16-style image encoder at 224 px (197 tokens).

For each model, in one process:

1. record: prefill, greedy generation (decoders) and a training step with flashtune as the model's attention
   under FLASHTUNE_RECORD=1; the counts are flushed into `--db` (the dispatcher's keys: forward, training
   pair, KV-cache decode bucket);
2. tune: `tune --recorded --db DB --op OPS --budget S` (a subprocess of the installed CLI), once, over the
   recorded ops of `--ops` (default: every op flashtune has), the largest share of attention time first;
3. `dispatch.reload(DB)`, then interleaved rounds (flashtune, SDPA, flashtune, SDPA, ...) of each phase:
   `forward` (decoders: prefill, use_cache=False, logits_to_keep=1; encoders: the model's forward), captured
   into a CUDA graph per implementation where capture works (else eager for both, said in the table),
   `generate` (greedy, --set MODEL.new_tokens new tokens after a --set MODEL.prompt prompt, eager; the time is
   the whole generate() call, its prompt's prefill included, and tokens/s counts the new tokens), and `train`
   (forward + loss.backward(), no optimizer, eager).

Per phase it reports the median over rounds of SDPA's time / flashtune's time (above 1: flashtune is faster)
with the spread of those per-round ratios (min, max, quartiles), tokens/s of each, and what attention() ran
(the integration's kernel_counts / backend_counts / fallback_counts, from one eager call after the reload);
per recorded key it reports the dispatcher's choice after tuning (a kernel config or an SDPA backend).

GPU (H100): about 1-2 minutes per model with the default sizes and `--budget 40` (6-8 minutes for all four);
under a 10-minute limit per command, run the decoders and the encoders apart (each writes its own JSON):

    python3 bench/models.py --out bench/results/h100/models --budget 40
    python3 bench/models.py --out bench/results/h100/models --models gqa,mqa --budget 40
    python3 bench/models.py --out bench/results/h100/models --models bert,vit --budget 40
    python3 bench/models.py --out bench/results/h100/models --set gqa.layers=8 --rounds 9 --no-tune   # re-time

CPU: `python3 bench/models.py --smoke --out /tmp/models-smoke` (TRITON_INTERPRET=1, fp32, tiny configs; nothing
is tuned without a GPU, said so, and `tune --dry-run` lists the keys instead). Writes <out>/models.json (with
--models a subset: <out>/models_<a>-<b>.json), each model's database <out>/models_<model>.db (unless --db names
one for all; --no-tune re-times with it) and the tune logs <out>/tune_<model>_<op>.log; the table is printed last.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import (
    arguments,
    cuda_graph,
    error_line,
    out_dir,
    print_table,
    provenance,
    str_list,
    synced_s,
    use_interpreter,
    write_json,
    write_text,
)

SDPA = "sdpa"


@dataclass(frozen=True)
class Size:
    """A model's architecture and the shapes of its phases (each settable with --set MODEL.FIELD=VALUE)."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    batch: int  # forward phase (decoders: prefill)
    seq: int  # forward phase sequence length (vit: the image size in pixels)
    train_batch: int
    train_seq: int  # (vit: the image size in pixels)
    gen_batch: int = 0  # decoders only
    prompt: int = 0
    new_tokens: int = 0
    vocab: int = 32000
    patch: int = 16  # vit only


@dataclass(frozen=True)
class Model:
    """One benchmarked model: its family and its sizes on the GPU and in the smoke run."""

    name: str
    family: str  # "llama", "gemma", "bert", "vit"
    what: str
    gpu: Size
    smoke: Size

    @property
    def decoder(self) -> bool:
        return self.family in ("llama", "gemma")


MODELS: dict[str, Model] = {m.name: m for m in (
    Model("gqa", "llama", "Llama-style decoder, GQA 16/2 heads of 128",
          Size(layers=4, hidden=2048, heads=16, kv_heads=2, head_dim=128, intermediate=5632, batch=2, seq=2048,
               train_batch=2, train_seq=1024, gen_batch=8, prompt=512, new_tokens=32),
          Size(layers=1, hidden=64, heads=4, kv_heads=1, head_dim=16, intermediate=64, batch=1, seq=24,
               train_batch=1, train_seq=16, gen_batch=2, prompt=12, new_tokens=2, vocab=101)),
    Model("mqa", "gemma", "Gemma-style decoder, MQA 8/1 heads of 256",
          Size(layers=4, hidden=2048, heads=8, kv_heads=1, head_dim=256, intermediate=8192, batch=2, seq=2048,
               train_batch=2, train_seq=1024, gen_batch=8, prompt=512, new_tokens=32),
          Size(layers=1, hidden=64, heads=2, kv_heads=1, head_dim=32, intermediate=64, batch=1, seq=20,
               train_batch=1, train_seq=16, gen_batch=2, prompt=10, new_tokens=2, vocab=101)),
    Model("bert", "bert", "BERT-style encoder, 12 heads of 64",
          Size(layers=6, hidden=768, heads=12, kv_heads=12, head_dim=64, intermediate=3072, batch=32, seq=512,
               train_batch=16, train_seq=512, vocab=30522),
          Size(layers=1, hidden=32, heads=2, kv_heads=2, head_dim=16, intermediate=64, batch=2, seq=24,
               train_batch=1, train_seq=16, vocab=101)),
    Model("vit", "vit", "ViT-B/16-style encoder, 224 px (197 tokens), 12 heads of 64",
          Size(layers=6, hidden=768, heads=12, kv_heads=12, head_dim=64, intermediate=3072, batch=64, seq=224,
               train_batch=32, train_seq=224),
          Size(layers=1, hidden=32, heads=2, kv_heads=2, head_dim=16, intermediate=64, batch=2, seq=32,
               train_batch=1, train_seq=32, patch=8)),
)}


def apply_sets(models: dict[str, Model], sets: list[str], smoke: bool) -> dict[str, Size]:
    """Each model's Size, with --set MODEL.FIELD=VALUE overrides applied (ValueError naming a bad one)."""
    sizes = {name: (m.smoke if smoke else m.gpu) for name, m in models.items()}
    fields = {f.name for f in dataclasses.fields(Size)}
    for item in sets:
        target, _, value = item.partition("=")
        name, _, field = target.partition(".")
        if name not in models or field not in fields or not value.strip().isdigit():
            raise ValueError(f"--set {item!r}: expected MODEL.FIELD=INT with MODEL one of {', '.join(models)} "
                             f"and FIELD one of {', '.join(sorted(fields))}")
        sizes[name] = dataclasses.replace(sizes[name], **{field: int(value)})
    return sizes


# --- building the models and their phases ----------------------------------------------------------

def build(model: Model, size: Size, dtype: Any, device: str, seed: int) -> Any:
    """The model with random weights, in eval mode (no dropout anywhere: the kernels have none)."""
    import torch
    import transformers as tf

    common = {"hidden_size": size.hidden, "num_hidden_layers": size.layers, "num_attention_heads": size.heads,
              "intermediate_size": size.intermediate}
    if model.family == "llama":
        config = tf.LlamaConfig(**common, num_key_value_heads=size.kv_heads, head_dim=size.head_dim,
                                vocab_size=size.vocab, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2,
                                pad_token_id=0)
        cls = tf.LlamaForCausalLM
    elif model.family == "gemma":
        config = tf.GemmaConfig(**common, num_key_value_heads=size.kv_heads, head_dim=size.head_dim,
                                vocab_size=size.vocab, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2,
                                pad_token_id=0)
        cls = tf.GemmaForCausalLM
    elif model.family == "bert":
        config = tf.BertConfig(**common, vocab_size=size.vocab, max_position_embeddings=max(512, size.seq),
                               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        cls = tf.BertModel
    else:
        config = tf.ViTConfig(**common, image_size=max(size.seq, size.train_seq), patch_size=size.patch,
                              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        cls = tf.ViTModel
    torch.manual_seed(seed)
    with torch.device(device):
        net = cls(config, add_pooling_layer=False) if model.family in ("bert", "vit") else cls(config)
    return net.to(dtype).eval()


@dataclass
class Phases:
    """A model's phases as callables (each runs with whatever attention the model is set to)."""

    forward: Callable[[], Any]
    train: Callable[[], Any]
    generate: Callable[[], Any] | None
    tokens: dict[str, int]  # tokens each phase processes (generate: the new tokens)


def phases(model: Model, size: Size, net: Any, device: str, dtype: Any, seed: int) -> Phases:
    """The inputs drawn once; the callables that run the forward, the training step and greedy generation."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)

    def ids(batch: int, n: int) -> Any:
        return torch.randint(3, size.vocab, (batch, n), device=device, generator=gen)

    def pixels(batch: int, px: int) -> Any:
        return torch.randn(batch, 3, px, px, device=device, generator=gen).to(dtype)

    if model.family == "vit":
        x, xt = pixels(size.batch, size.seq), pixels(size.train_batch, size.train_seq)
        per_image = lambda px: (px // size.patch) ** 2 + 1

        def forward() -> Any:
            with torch.no_grad():
                return net(pixel_values=x, interpolate_pos_encoding=size.seq != size.train_seq).last_hidden_state

        def train() -> Any:
            net.zero_grad(set_to_none=True)
            out = net(pixel_values=xt, interpolate_pos_encoding=size.seq != size.train_seq).last_hidden_state
            out.float().square().mean().backward()

        return Phases(forward, train, None, {"forward": size.batch * per_image(size.seq),
                                             "train": size.train_batch * per_image(size.train_seq)})
    x, xt = ids(size.batch, size.seq), ids(size.train_batch, size.train_seq)
    tokens = {"forward": size.batch * size.seq, "train": size.train_batch * size.train_seq}
    if model.family == "bert":
        def forward() -> Any:
            with torch.no_grad():
                return net(input_ids=x).last_hidden_state

        def train() -> Any:
            net.zero_grad(set_to_none=True)
            net(input_ids=xt).last_hidden_state.float().square().mean().backward()

        return Phases(forward, train, None, tokens)

    prompt = ids(size.gen_batch, size.prompt)
    gen_args = {"max_new_tokens": size.new_tokens, "min_new_tokens": size.new_tokens, "do_sample": False,
                "attention_mask": torch.ones_like(prompt), "pad_token_id": 0}

    def forward() -> Any:
        with torch.no_grad():
            return net(x, use_cache=False, logits_to_keep=1).logits

    def train() -> Any:
        net.zero_grad(set_to_none=True)
        net(xt, labels=xt, use_cache=False).loss.backward()

    def generate() -> Any:
        with torch.no_grad():
            return net.generate(prompt, **gen_args)

    tokens["generate"] = size.gen_batch * size.new_tokens
    return Phases(forward, train, generate, tokens)


# --- CUDA graphs --------------------------------------------------------------------------------

@contextlib.contextmanager
def one_sequence_per_row() -> Iterator[None]:
    """Tell transformers' mask code that no input row packs several sequences.

    With no attention mask and no cache it looks for packed sequences in the position ids, a check that
    reads the device: during CUDA-graph capture it skips the read and assumes packing, which turns the
    plain causal mask into a materialised one (SDPA then runs a masked backend, flashtune's integration
    falls back to SDPA). The benchmark's rows are single sequences, so the answer is known: none."""
    from transformers import masking_utils

    original = masking_utils.find_packed_sequence_indices
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = original


def graphed(net: Any, impls: dict[str, str], fn: Callable[[], Any]) -> tuple[dict[str, Callable[[], Any]], str]:
    """Each implementation's fn as a CUDA-graph replay, or, if capture fails for either, eager for both;
    with the mode said in words ("cuda graph", or "eager: <impl> capture failed: <error>")."""
    replays: dict[str, Callable[[], Any]] = {}
    for label, impl in impls.items():
        net.set_attn_implementation(impl)
        try:
            with one_sequence_per_row():
                replays[label] = cuda_graph(fn, warmup=3)
        except Exception as exc:  # noqa: BLE001 - a model that cannot be captured is timed eagerly, and said so
            import torch

            torch.cuda.synchronize()
            return eager(net, impls, fn), f"eager: {label} capture failed: {error_line(exc, 160)}"
    return replays, "cuda graph"


def eager(net: Any, impls: dict[str, str], fn: Callable[[], Any]) -> dict[str, Callable[[], Any]]:
    """Each implementation's fn, run as it is: `switch` sets the model's attention before each sample."""
    return {label: fn for label in impls}


def switch(net: Any, impls: dict[str, str]) -> Callable[[str], None]:
    """Set the model's attention to the implementation of a label (outside the timed calls)."""
    return lambda label: net.set_attn_implementation(impls[label])


# --- timing ---------------------------------------------------------------------------------------

def quantile(values: list[float], q: float) -> float:
    """The q-quantile of values, linear between order statistics."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = int(pos)
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (pos - lo)


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int, inner: int, cuda: bool,
                tokens: int, before: Callable[[str], None] | None = None) -> dict[str, Any]:
    """`rounds` rounds of flashtune then SDPA (each sample: `inner` back-to-back calls, synchronised), after
    `warmup` untimed calls of each; the median times, tokens/s and SDPA/flashtune per round with its spread.
    `before(label)` runs untimed before each label's calls (switching an eager model's attention)."""
    before = before or (lambda label: None)
    for label, fn in fns.items():
        before(label)
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {label: [] for label in fns}

    def sample(fn: Callable[[], Any]) -> float:
        if not cuda:
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            return (time.perf_counter() - t0) / inner

        def loop() -> None:
            for _ in range(inner):
                fn()
        return synced_s(loop) / inner

    for _ in range(rounds):
        for label, fn in fns.items():
            before(label)
            times[label].append(sample(fn))
    ratios = [s / f for f, s in zip(times["flashtune"], times[SDPA])]
    result: dict[str, Any] = {f"{label}_ms": statistics.median(t) * 1e3 for label, t in times.items()}
    result.update({f"{label}_tokens_per_s": tokens / statistics.median(t) for label, t in times.items()})
    result.update({"ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
                   "ratio_q1": quantile(ratios, 0.25), "ratio_q3": quantile(ratios, 0.75), "ratios": ratios,
                   "times_ms": {label: [x * 1e3 for x in t] for label, t in times.items()}})
    return result


# --- what attention() ran ----------------------------------------------------------------------------

def ran(ft: Any, net: Any, impl: str, fn: Callable[[], Any]) -> dict[str, dict[str, int]]:
    """The integration's counters over one eager call of fn with flashtune: kernel paths, SDPA backends that
    won their keys, and calls that fell back to transformers' SDPA function (per reason)."""
    net.set_attn_implementation(impl)
    ft.reset_counts()
    fn()
    return {"kernel": ft.kernel_counts(), "sdpa_backend": ft.backend_counts(), "fallback": ft.fallback_counts()}


def ran_text(counts: dict[str, dict[str, int]]) -> str:
    """'kernel causal×4; cudnn causal×4; fallback mask×2' (compact, for the table)."""
    parts = [f"kernel {path}×{n}" for path, n in counts["kernel"].items()]
    parts += [f"{backend.split('/')[-1]} {backend.split('/')[0]}×{n}" for backend, n in counts["sdpa_backend"].items()]
    parts += [f"FALLBACK {reason}×{n}" for reason, n in counts["fallback"].items()]
    return "; ".join(parts) or "-"


def key_choices(keys: dict[Any, int]) -> list[dict[str, Any]]:
    """Per recorded key: the dispatcher's choice after the reload (provider, config, source)."""
    from flashtune.kernel import dispatch

    rows = []
    for key, calls in keys.items():
        row = {"arch": key.arch, "op": key.op, "seq_len": key.seq_len, "seq_len_kv": key.seq_len_kv,
               "head_dim": key.head_dim, "dtype": key.dtype, "causal": key.causal, "batch_heads": key.batch_heads,
               "group": key.group, "calls": calls}
        try:
            choice = dispatch.lookup(key.arch, key.seq_len, key.head_dim, key.dtype, key.causal,
                                     seq_len_kv=key.seq_len_kv, batch_heads=key.batch_heads, group=key.group,
                                     op=key.op)
            row.update(provider=choice.provider, config=str(choice.config), source=choice.source)
        except Exception as exc:  # noqa: BLE001 - a key the rules cannot plan is reported, not fatal
            row.update(provider=None, config=None, source=error_line(exc, 120))
        rows.append(row)
    return rows


def key_summary(rows: list[dict[str, Any]]) -> str:
    """'fwd: kernel 2 (exact 2); kvcache: sdpa_flash 30 (exact 20, nearest 10)' over a model's keys."""
    by_op: dict[str, dict[str, int]] = {}
    sources: dict[str, dict[str, int]] = {}
    for row in rows:
        by_op.setdefault(row["op"], {}).setdefault(str(row["provider"]), 0)
        by_op[row["op"]][str(row["provider"])] += 1
        sources.setdefault(row["op"], {}).setdefault(str(row["source"]), 0)
        sources[row["op"]][str(row["source"])] += 1
    return "; ".join(f"{op}: " + ", ".join(f"{p} {n}" for p, n in providers.items())
                     + " (" + ", ".join(f"{s} {n}" for s, n in sources[op].items()) + ")"
                     for op, providers in by_op.items())


# --- one model's flow ----------------------------------------------------------------------------

def tune(db: str, ops: list[str], budget: float, log: Path, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """`tune --recorded --db DB --op OPS --budget Ns [extra]`, its output in `log`; exit code and wall seconds."""
    cmd = [shutil.which("tune") or "tune", "--recorded", "--db", db, "--op", ",".join(ops), "--budget", f"{budget:g}s",
           *extra]
    print("$", " ".join(cmd), flush=True)
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, "FLASHTUNE_DB": db})
    seconds = time.perf_counter() - started
    write_text(log, f"$ {' '.join(cmd)}\n{done.stdout}\n{done.stderr}")
    tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
    print("\n".join(f"  {line}" for line in tail), flush=True)
    return {"command": cmd, "exit": done.returncode, "seconds": seconds, "log": str(log)}


def run_model(model: Model, size: Size, args: argparse.Namespace, out: Path, cuda: bool) -> dict[str, Any]:
    """Record, tune, reload and time one model; every failure of a phase is a row, not the end of the run."""
    import torch
    from flashtune.kernel import dispatch, record
    from flashtune.kernel.integrations import transformers as ft

    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32  # bf16 dots are wrong under the interpreter
    name = ft.register()
    impls = {"flashtune": name, SDPA: SDPA}
    started = time.perf_counter()
    net = build(model, size, dtype, device, args.seed)
    ph = phases(model, size, net, device, dtype, args.seed + 1)
    calls = {"forward": ph.forward, "generate": ph.generate, "train": ph.train}
    calls = {k: fn for k, fn in calls.items() if fn is not None and k in args.phases}
    result: dict[str, Any] = {"model": model.name, "what": model.what, "family": model.family,
                              "size": dataclasses.asdict(size), "dtype": str(dtype).removeprefix("torch."),
                              "params": sum(p.numel() for p in net.parameters()), "phases": {}}
    print(f"\n== {model.name}: {model.what}; {result['params'] / 1e6:.0f}M params, {size}", flush=True)

    # 1. record
    net.set_attn_implementation(name)
    record.ENABLED = True
    try:
        for phase, fn in calls.items():
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - its timing will fail again and say so; record the rest
                print(f"  recording {phase}: FAILED {error_line(exc)}", flush=True)
    finally:
        record.ENABLED = False
    keys = record.pending()
    db = args.db or f"sqlite:///{(out / f'models_{model.name}.db').resolve()}"
    os.environ["FLASHTUNE_DB"] = db
    result["db"] = db
    written = record.flush(db)
    print(f"recorded {written} key(s): " + ", ".join(f"{op} {sum(1 for k in keys if k.op == op)}"
                                                     for op in sorted({k.op for k in keys})), flush=True)

    # 2. tune
    if args.no_tune:
        result["tune"] = "skipped (--no-tune)"
    elif not cuda:
        from flashtune.kernel.dispatch import INTERPRETER_ARCH

        print("no CUDA GPU: nothing is tuned (tune --dry-run lists the recorded keys it would tune)", flush=True)
        planned = tune(db, args.ops, args.budget, out / f"tune_{model.name}.log",
                       ("--dry-run", "--arch", INTERPRETER_ARCH))
        result["tune"] = f"skipped: no CUDA GPU (tune --dry-run: exit {planned['exit']})"
    else:
        # One tune of every recorded op: it orders the keys by their share of the model's attention time
        # (a decode step records its cache-length bucket, so generation adds a handful of keys).
        ops = [op for op in args.ops if any(k.op == op for k in keys)]
        result["tune"] = ([tune(db, ops, args.budget, out / f"tune_{model.name}.log")] if ops
                          else "skipped: no keys of --ops recorded")

    # 3. reload, then time
    dispatch.reload(db, interpreter=not cuda)
    result["keys"] = key_choices(keys)
    result["keys_summary"] = key_summary(result["keys"])
    print(f"after reload: {result['keys_summary']}", flush=True)
    for phase, fn in calls.items():
        row: dict[str, Any] = {"tokens": ph.tokens[phase]}
        try:
            row["ran"] = ran(ft, net, name, fn)
            if phase == "forward" and cuda and not args.no_graphs:
                ft.reset_counts()
                fns, row["mode"] = graphed(net, impls, fn)
                if row["mode"] == "cuda graph":  # what the captured flashtune calls ran (warm-up and capture)
                    row["ran_captured"] = {"kernel": ft.kernel_counts(), "sdpa_backend": ft.backend_counts(),
                                           "fallback": ft.fallback_counts()}
            else:
                fns = eager(net, impls, fn)
                row["mode"] = "eager" if cuda or phase != "forward" else "eager (no CUDA)"
            # a replay runs what it captured; switching matters to eager calls only (harmless for replays)
            row.update(interleaved(fns, args.rounds, args.warmup, 1 if phase == "generate" else args.inner,
                                   cuda, ph.tokens[phase], switch(net, impls)))
            del fns
        except Exception as exc:  # noqa: BLE001 - one phase failing leaves the others' figures
            row["error"] = error_line(exc)
            print(f"  {phase}: FAILED {row['error']}", flush=True)
        result["phases"][phase] = row
        if "ratio" in row:
            print(f"  {phase} ({row['mode']}): SDPA {row['sdpa_ms']:.3f} ms, flashtune {row['flashtune_ms']:.3f} ms, "
                  f"SDPA/flashtune median {row['ratio']:.3f} [{row['ratio_min']:.3f}, {row['ratio_max']:.3f}]; "
                  f"ran {ran_text(row.get('ran_captured', row['ran']))}", flush=True)
    result["seconds"] = time.perf_counter() - started
    del net, ph, calls
    if cuda:
        torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__, out_help="results directory, e.g. bench/results/h100",
                       smoke="tiny fp32 models on the CPU under TRITON_INTERPRET=1 (tuning skipped)", seed=True)
    parser.add_argument("--models", type=str_list, default=",".join(MODELS), help=f"of {', '.join(MODELS)}")
    parser.add_argument("--phases", type=str_list, default="forward,generate,train",
                        help="of forward, generate, train (generate: decoders only)")
    parser.add_argument("--db", help="database URL every model records into, tunes and reloads (default: one SQLite "
                                     "file per model, OUT/models_MODEL.db)")
    parser.add_argument("--budget", type=float, default=40,
                        help="tuning seconds per model (default 40): one tune of its recorded ops")
    parser.add_argument("--ops", type=str_list, default=None,
                        help="tune --op: the recorded ops to tune (default: every op flashtune has)")
    parser.add_argument("--no-tune", action="store_true", help="time with whatever --db holds, without tuning")
    parser.add_argument("--rounds", type=int, help="interleaved rounds per phase (default 7; --smoke: 2)")
    parser.add_argument("--warmup", type=int, help="untimed calls per implementation and phase (default 2; --smoke: 0)")
    parser.add_argument("--inner", type=int, help="calls per timed sample of forward and train (default 3; --smoke: 1)")
    parser.add_argument("--no-graphs", action="store_true", help="time the forward phase eagerly too")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="MODEL.FIELD=INT",
                        help="override a size, e.g. gqa.layers=8, bert.batch=64, gqa.new_tokens=64 (repeatable)")
    args = parser.parse_args(argv)
    for option, gpu, smoke in (("rounds", 7, 2), ("warmup", 2, 0), ("inner", 3, 1)):
        if getattr(args, option) is None:
            setattr(args, option, smoke if args.smoke else gpu)
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        parser.error(f"--models: unknown {', '.join(unknown)} (known: {', '.join(MODELS)})")
    bad = [p for p in args.phases if p not in ("forward", "generate", "train")]
    if bad or args.rounds < 1 or args.inner < 1 or args.warmup < 0:
        parser.error(f"--phases takes forward, generate, train (got {', '.join(bad)})" if bad
                     else "--rounds and --inner must be at least 1, --warmup at least 0")
    try:
        sizes = apply_sets(MODELS, args.sets, args.smoke)
    except ValueError as exc:
        parser.error(str(exc))
    out = Path(args.out)
    if args.db:
        os.environ["FLASHTUNE_DB"] = args.db  # the dispatcher's first load, at import, reads it too
    interpreted = use_interpreter(args.smoke, even_with_gpu=True)
    import torch

    cuda = torch.cuda.is_available() and not interpreted
    if not cuda and not args.smoke:
        print("models.py: needs a CUDA GPU; --smoke runs tiny models on the CPU", file=sys.stderr)
        return 2
    if args.ops is None:
        from flashtune.kernel.ops import OPS

        args.ops = list(OPS)
    import transformers

    out = out_dir(out)
    started = time.perf_counter()
    result: dict[str, Any] = {**provenance(), "transformers": transformers.__version__, "db": args.db,
                              "options": {k: v for k, v in vars(args).items() if k != "out"}, "models": []}
    # a run of some of the models does not overwrite another's file in the same folder
    name_json = "models.json" if args.models == list(MODELS) else f"models_{'-'.join(args.models)}.json"
    for name in args.models:
        result["models"].append(run_model(MODELS[name], sizes[name], args, out, cuda))
        write_json(out / name_json, result)  # after every model: a killed run keeps the finished ones
    result["seconds"] = time.perf_counter() - started
    path = write_json(out / name_json, result)
    _tables(result, path)
    return 0


def _tables(result: dict[str, Any], path: Path) -> None:
    rows, keys = [], []
    for m in result["models"]:
        for phase, r in m["phases"].items():
            if "error" in r:
                rows.append([m["model"], phase, "FAILED", None, None, None, None, None, r["error"][:60]])
                continue
            rows.append([m["model"], phase, r["mode"].split(":")[0], r["sdpa_ms"], r["flashtune_ms"],
                         f"{r['ratio']:.3f}", f"{r['ratio_min']:.3f}..{r['ratio_max']:.3f}",
                         round(r["flashtune_tokens_per_s"]), ran_text(r.get("ran_captured", r["ran"]))])
        tuned = m["tune"] if isinstance(m["tune"], str) else "; ".join(
            f"{t['command'][t['command'].index('--op') + 1]} exit {t['exit']}, {t['seconds']:.0f} s" for t in m["tune"])
        keys.append([m["model"], len(m["keys"]), tuned, m["keys_summary"]])
    print(f"\n{result['gpu']}, torch {result['torch']}, Triton {result['triton']}, transformers "
          f"{result['transformers']}; {result['seconds']:.0f} s in all; wrote {path}")
    print_table(["model", "recorded keys", "tune", "after reload: op: provider count (source count)"], keys,
                title="What the dispatcher chose per recorded key")
    print_table(["model", "phase", "mode", "SDPA ms", "flashtune ms", "SDPA/flashtune", "min..max",
                 "flashtune tok/s", "attention() ran (graph: captured calls; eager: one call)"], rows, floats=".3f",
                title="SDPA time / flashtune time per phase (median over rounds; above 1: flashtune faster)")
    met = [r for m in result["models"] for r in m["phases"].values() if "ratio" in r]
    print(f"\n{sum(1 for r in met if r['ratio'] >= 0.98)} of {len(met)} phases at >= 0.98 (median ratio)")


if __name__ == "__main__":
    sys.exit(main())
