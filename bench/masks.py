"""Masked models through ``backend="sparge"`` vs Inductor dense: transformers builds the masks.

* ``llama``: a Llama-3-8B-shaped prefill (hidden 4096, 32 heads, 8 KV heads, head dim 128;
  ``--layers`` layers, random weights), ``--tokens`` tokens, causal mask built in the graph.
* ``bert``: BERT-base (12 layers, 12 heads x 64) at ``--bert-tokens`` tokens, a batch whose
  ``attention_mask`` pads ``--padding`` of the tokens (the mask is data: key-padding).

Per model: forward time (median of ``triton.testing.do_bench`` on the GPU), the sites the
report rewrote and their mean sparsity, and the output's relative L2 error against the dense
model (on the tokens that are not padding).
"""
from __future__ import annotations

from pathlib import Path

import torch

from bench import common as C
from bench import output as O
from bench.cli import module_entry


def add_args(p) -> None:
    p.add_argument("--tokens", type=int, default=32768, help="llama prefill length")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--bert-tokens", type=int, default=4096)
    p.add_argument("--bert-batch", type=int, default=4)
    p.add_argument("--padding", type=float, default=0.3, help="fraction of the BERT batch that is padding")
    p.add_argument("--topk", type=float, default=0.03)
    p.add_argument("--topp", type=float, default=0.2)
    p.add_argument("--block-q", type=int, default=128)
    p.add_argument("--block-k", type=int, default=64)
    p.add_argument("--min-seq-len", type=int, default=1024)
    p.add_argument("--models", default="llama,bert")


QUICK = dict(tokens=256, layers=1, bert_tokens=256, bert_batch=2, min_seq_len=0, block_q=32, block_k=16)


def _llama(args, device, dtype):
    C.allow_broken_torchvision()
    import transformers as tr

    small = args.quick
    cfg = tr.LlamaConfig(vocab_size=1024, hidden_size=64 if small else 4096,
                         intermediate_size=128 if small else 14336, num_hidden_layers=args.layers,
                         num_attention_heads=2 if small else 32, num_key_value_heads=1 if small else 8,
                         max_position_embeddings=args.tokens)
    cfg._attn_implementation = "sdpa"
    model = tr.LlamaModel(cfg).to(device=device, dtype=dtype).eval()
    ids = torch.randint(0, 1024, (1, args.tokens), device=device)
    return model, dict(input_ids=ids, use_cache=False), None


def _bert(args, device, dtype):
    C.allow_broken_torchvision()
    import transformers as tr

    small = args.quick
    cfg = tr.BertConfig(vocab_size=1024, hidden_size=64 if small else 768,
                        num_hidden_layers=2 if small else 12, num_attention_heads=2 if small else 12,
                        intermediate_size=128 if small else 3072, max_position_embeddings=args.bert_tokens)
    cfg._attn_implementation = "sdpa"
    model = tr.BertModel(cfg).to(device=device, dtype=dtype).eval()
    B, N = args.bert_batch, args.bert_tokens
    # lengths spread evenly so that the batch pads exactly --padding of its tokens (right padding)
    lengths = (N * (1 - 2 * args.padding * (torch.arange(B) + 0.5) / B)).round().long().clamp(1, N)
    mask = (torch.arange(N)[None, :] < lengths[:, None]).long().to(device)
    ids = torch.randint(0, 1024, (B, N), device=device)
    return model, dict(input_ids=ids, attention_mask=mask), mask.bool()


def _measure(name, build, args, device, errors) -> dict:
    import sparge_compile as sc

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, kw, valid = build(args, device, dtype)
    row = {"model": name, "tokens": int(kw["input_ids"].numel())}
    if valid is not None:
        row["padding"] = 1.0 - float(valid.float().mean())
    torch._dynamo.reset()
    with torch.no_grad():
        dense = torch.compile(model, backend="inductor")
        ref = C.guarded(lambda: dense(**kw).last_hidden_state, errors, f"{name}/inductor")
        row["inductor_ms"] = C.guarded(lambda: C.time_fn(lambda: dense(**kw), device), errors, f"{name}/time")
        be = sc.backend(config=sc.SpargeConfig(topk=args.topk, topp=args.topp, block_q=args.block_q,
                                                block_k=args.block_k, min_seq_len=args.min_seq_len))
        sparse = torch.compile(model, backend=be)
        out = C.guarded(lambda: sparse(**kw).last_hidden_state, errors, f"{name}/sparge")
        row["sparge_ms"] = C.guarded(lambda: C.time_fn(lambda: sparse(**kw), device), errors, f"{name}/stime")
    rep = be.report()
    row["sites"], row["rewritten"] = len(rep), len(rep.rewritten)
    sp = [s.sparsity for s in rep.rewritten if s.sparsity is not None]
    row["sparsity"] = sum(sp) / len(sp) if sp else None
    row["reasons"] = sorted({s.reason for s in rep.sites})
    if out is not None and ref is not None:
        sel = (lambda t: t[valid]) if valid is not None else (lambda t: t)
        row["rel_l2"] = C.rel_l2(sel(out.float()), sel(ref.float()))
    row["speedup"] = C.ratio(row.get("inductor_ms"), row.get("sparge_ms"))
    return row


def run(args) -> dict:
    if args.quick:
        C.quick_defaults(args, add_args, QUICK)
    device = C.pick_device(args.quick)
    errors: dict = {}
    builds = {"llama": _llama, "bert": _bert}
    rows = []
    for name in args.models.split(","):
        rows.append(_measure(name, builds[name], args, device, errors))
        partial = {"rows": rows, "errors": errors, "env": C.environment(device)}
        O.write_json(Path(args.out) / "masks.json", partial)   # each model as soon as it is measured
    result = {"rows": rows, "errors": errors, "args": vars(args), "env": C.environment(device)}
    O.write_result(args.out, "masks", "Masked models: sparge vs inductor", result, markdown(result))
    return result


def markdown(result: dict) -> list[tuple[str, str]]:
    cols = [("model", "model"), ("tokens", "tokens"), ("padding", "padding"),
            ("rewritten", "sites rewritten"), ("sparsity", "mean sparsity"),
            ("inductor_ms", "inductor ms"), ("sparge_ms", "sparge ms"), ("speedup", "speed-up"),
            ("rel_l2", "rel. L2 vs dense")]
    return [("Forward", O.table(result["rows"], cols))]


main = module_entry("bench.masks")

if __name__ == "__main__":
    raise SystemExit(main())
