"""A ~1B-parameter Llama in transformers on a CUDA GPU: flashtune's attention vs SDPA's, same process.

The model is Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 query heads over 8 KV heads of 128,
intermediate 8192, vocab 128256, tied embeddings) with random weights (nothing is downloaded), bf16.
One model object; `set_attn_implementation` switches between "sdpa" and flashtune's registered name,
the runs interleaved:

1. prefill end to end: model(ids, use_cache=False, logits_to_keep=1), B=1 N=2048 and B=4 N=1024,
   CUDA-synchronised wall time, median of --reps;
2. greedy generation: 64 new tokens (min_new_tokens=64) after a 128-token prompt, B=1, tokens/s;
3. accuracy: full bf16 logits of a B=1 N=512 prompt with each implementation against an fp32 run of
   the same weights (SDPA, fp32), relative Frobenius error, and the argmax agreement;
4. the same tokens: fp32 greedy generation (64 tokens) with flashtune and with SDPA must be equal
   (fp32 dots are IEEE in both); --fp32-layers shrinks the fp32 model if time or memory need it.

    python3 bench/transformers_bench.py --out bench/results/h200

Writes <out>/transformers_bench.json; the table is printed last. Targets: prefill time <= SDPA's,
tokens/s >= SDPA's, fp32 tokens identical.
"""
from __future__ import annotations

import copy
import statistics
import sys
import time
from typing import Any

import torch
from common import Runs, arguments, out_dir, print_table, provenance, require_gpu, synced_s, write_json


def _config(layers: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=64 * 2, vocab_size=128256, max_position_embeddings=8192,
                       tie_word_embeddings=True, rope_theta=500000.0, bos_token_id=1, eos_token_id=2,
                       pad_token_id=0)


def _model(layers: int, dtype: torch.dtype, seed: int = 0) -> Any:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = LlamaForCausalLM(_config(layers)).to(dtype)
    return model.eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__, out_help="directory for transformers_bench.json", seed=True,
                       timing=[Runs(warmup=2, reps=7, what="each prefill shape")])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--fp32-layers", type=int, default=16, help="layers of the fp32 model for the token check")
    parser.add_argument("--gen-reps", type=int, default=3, help="timed generations per implementation (median)")
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    require_gpu()
    out = out_dir(args.out)
    started = time.perf_counter()

    import transformers

    from flashtune.kernel.integrations import transformers as ft

    name = ft.register()
    impls = ("sdpa", name)
    torch.set_grad_enabled(False)
    model = _model(args.layers, torch.bfloat16, seed=args.seed)
    params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator(device="cuda").manual_seed(args.seed + 1)

    def ids(batch: int, n: int) -> torch.Tensor:
        return torch.randint(3, 128256, (batch, n), device="cuda", generator=gen)

    result: dict[str, Any] = {**provenance(), "transformers": transformers.__version__,
                              "model": {"params": params, "layers": args.layers, "dtype": "bf16"}}

    # 1. prefill
    prefill = []
    for batch, n in ((1, 2048), (4, 1024)):
        x = ids(batch, n)
        times: dict[str, list[float]] = {impl: [] for impl in impls}
        for impl in impls:  # warm up: compile the kernels, load torch's
            model.set_attn_implementation(impl)
            for _ in range(args.warmup):
                model(x, use_cache=False, logits_to_keep=1)
        for _ in range(args.reps):
            for impl in impls:
                model.set_attn_implementation(impl)
                times[impl].append(synced_s(lambda: model(x, use_cache=False, logits_to_keep=1)))
        row = {"batch": batch, "seq": n, **{f"{impl}_ms": statistics.median(t) * 1e3 for impl, t in times.items()}}
        row["ratio"] = row[f"{name}_ms"] / row["sdpa_ms"]
        prefill.append(row)
        print(f"prefill B={batch} N={n}: sdpa {row['sdpa_ms']:.2f} ms, flashtune {row[f'{name}_ms']:.2f} ms",
              flush=True)
    result["prefill"] = prefill

    # 2. generation tokens/s
    prompt = ids(1, 128)
    gen_args = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                    attention_mask=torch.ones_like(prompt), pad_token_id=0)
    tokens: dict[str, Any] = {}
    gtimes: dict[str, list[float]] = {impl: [] for impl in impls}
    for impl in impls:
        model.set_attn_implementation(impl)
        tokens[impl] = model.generate(prompt, **gen_args)  # warm-up, and the tokens
    ft.reset_counts()
    for _ in range(args.gen_reps):
        for impl in impls:
            model.set_attn_implementation(impl)
            gtimes[impl].append(synced_s(lambda: model.generate(prompt, **gen_args)))
    generation = {f"{impl}_tokens_per_s": args.new_tokens / statistics.median(t) for impl, t in gtimes.items()}
    generation["ratio"] = generation[f"{name}_tokens_per_s"] / generation["sdpa_tokens_per_s"]
    generation["bf16_tokens_equal"] = bool(torch.equal(tokens["sdpa"], tokens[name]))
    generation["kernel_counts"] = ft.kernel_counts()
    generation["fallback_counts"] = ft.fallback_counts()
    result["generation"] = generation
    print(f"generation: sdpa {generation['sdpa_tokens_per_s']:.1f} tok/s, flashtune "
          f"{generation[f'{name}_tokens_per_s']:.1f} tok/s; paths {generation['kernel_counts']}, "
          f"fallbacks {generation['fallback_counts']}", flush=True)

    # 3. accuracy of bf16 logits against fp32
    x = ids(1, 512)
    logits = {}
    for impl in impls:
        model.set_attn_implementation(impl)
        logits[impl] = model(x, use_cache=False).logits.float()
    model32 = copy.deepcopy(model).float()
    model32.set_attn_implementation("sdpa")
    ref = model32(x, use_cache=False).logits.float()
    accuracy = {f"{impl}_rel_err": _rel(logits[impl], ref) for impl in impls}
    accuracy.update({f"{impl}_argmax_agree": float((logits[impl].argmax(-1) == ref.argmax(-1)).float().mean())
                     for impl in impls})
    model32.set_attn_implementation(name)
    accuracy[f"fp32_{name}_rel_err"] = _rel(model32(x, use_cache=False).logits.float(), ref)
    result["accuracy"] = accuracy
    print(f"accuracy vs fp32: {accuracy}", flush=True)

    # 4. fp32 greedy tokens
    if args.fp32_layers != args.layers:
        del model32
        torch.cuda.empty_cache()
        model32 = _model(args.fp32_layers, torch.float32, seed=args.seed + 2)
    fp32_tokens = {}
    for impl in impls:
        model32.set_attn_implementation(impl)
        fp32_tokens[impl] = model32.generate(prompt, **gen_args)
    result["fp32_tokens"] = {"layers": args.fp32_layers, "new_tokens": args.new_tokens,
                             "equal": bool(torch.equal(fp32_tokens["sdpa"], fp32_tokens[name])),
                             "first_difference": _first_difference(fp32_tokens["sdpa"], fp32_tokens[name])}
    result["seconds"] = time.perf_counter() - started
    write_json(out / "transformers_bench.json", result)

    print(f"\n{result['gpu']}, torch {torch.__version__}, Triton {result['triton']}, transformers "
          f"{transformers.__version__}; Llama {params / 1e9:.2f}B params ({args.layers} layers), random weights; "
          f"{result['seconds']:.0f} s; wrote {out / 'transformers_bench.json'}")
    g, f32 = generation, result["fp32_tokens"]
    print_table(["what", "SDPA", "flashtune", "flashtune/SDPA", "target"], [
        *([f"prefill bf16 B={row['batch']} N={row['seq']} (ms)", f"{row['sdpa_ms']:.2f}", f"{row[f'{name}_ms']:.2f}",
           f"{row['ratio']:.3f}", f"<= 1 {'MET' if row['ratio'] <= 1 else 'NOT MET'}"] for row in prefill),
        [f"greedy generation bf16 B=1, {args.new_tokens} tokens (tok/s)", f"{g['sdpa_tokens_per_s']:.1f}",
         f"{g[f'{name}_tokens_per_s']:.1f}", f"{g['ratio']:.3f}", f">= 1 {'MET' if g['ratio'] >= 1 else 'NOT MET'}"],
        ["bf16 logits, rel. error vs fp32 (N=512)", f"{accuracy['sdpa_rel_err']:.2e}",
         f"{accuracy[f'{name}_rel_err']:.2e}", "", ""],
        ["bf16 argmax agreement with fp32", f"{accuracy['sdpa_argmax_agree']:.4f}",
         f"{accuracy[f'{name}_argmax_agree']:.4f}", "", ""],
        ["bf16 greedy tokens equal to SDPA's", "", g["bf16_tokens_equal"], "", "(report)"],
        [f"fp32 greedy tokens equal to SDPA's ({f32['layers']} layers, {args.new_tokens} tokens)", "", f32["equal"],
         "", f"equal {'MET' if f32['equal'] else 'NOT MET'}"],
    ], markdown=True)
    return 0


def _first_difference(a: torch.Tensor, b: torch.Tensor) -> int | None:
    if a.shape != b.shape:
        return 0
    diff = (a != b).any(0).nonzero()
    return int(diff[0, 0]) if len(diff) else None


if __name__ == "__main__":
    sys.exit(main())
