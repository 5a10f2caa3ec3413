#!/usr/bin/env python3
"""Train a tiny Step-3.5-Flash (trunk + 3 MTP blocks) on Python stdlib sources and export it
in the original HF checkpoint layout (config.json, bf16 safetensors shards, tokenizer files).

The model is exactly the Step-3.5 architecture (see /work/shared/STEP35_FACTS.md), only small:
  * zero-centred RMSNorm (applied as 1 + w), per-head q/k RMSNorm before RoPE
  * partial rotate-half RoPE (0.5 on full layers, 1.0 on sliding), per-layer theta
    (5e6 full / 1e4 sliding), llama3 rope scaling on the full layers only (yarn_only_types)
  * head-wise sigmoid attention gate (g_proj, one gate per head, before o_proj)
  * iSWA: layer i full attention iff i % 4 == 0, else sliding (window W: a query sees itself
    and the W-1 tokens before it); sliding layers use attention_other_setting's head count
  * dense SwiGLU first layers, then MoE: fp32 sigmoid router, top-k on scores + router_bias,
    weights = unbiased scores normalised to sum 1, times moe_router_scaling_factor, plus a
    shared expert; optional swiglu clamps min(silu(g), L) * clip(u, -L, L)
  * 3 MTP blocks (layers N..N+2, sliding attention, dense SwiGLU MLP) with the DeepSeek-V3 /
    Step-3.5 forward: u = eh_proj(cat(enorm(embed(x_{t+k})), hnorm(h_{k-1,t}))), h_0 = trunk
    hidden before the final norm, logits_k = shared_head.output(shared_head.norm(h_k)).

Router bias: DeepSeek-V3 aux-loss-free balancing (bias += gamma * sign(mean_load - load_e)
after each optimizer step; not a gradient parameter). MTP losses back-propagate into the trunk
(loss = CE_trunk + lambda * mean_k CE_k).

Usage: .venv/bin/python scripts/train_demo.py --minutes 30 --threads 1 --mlx-out build/demo-mlx
  (the HF export in build/demo-hf; with --mlx-out, a new folder, also its conversion as the
  bundled demo mlx_step35/demo is made: `convert.py -q --q-group-size 32`, 4-bit in groups of
  32 so that every split weight divides into whole groups over 2 ranks, router 8-bit,
  embedding/lm_head/MTP heads 6-bit)
"""

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from demo_data import (
    EXCLUDE_DIRS,
    SPECIAL_TOKENS,
    collect_corpus,
    encode_stream,
    split_docs,
    train_tokenizer,
    write_tokenizer_files,
)
from demo_eval import evaluate, fmt_eval
from demo_export import (
    DEMO_GROUP_SIZE,
    convert_demo,
    export,
    hf_trunk_logits,
    load_hf_state_dict,
    read_export,
)
from demo_model import Step35, make_config

CONTEXT = 262144  # the real model's max_position_embeddings (the RoPE scaling does not read it)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="build/demo-hf")
    ap.add_argument("--steps", type=int, default=None, help="max optimizer steps (default: unlimited)")
    ap.add_argument("--minutes", type=float, default=None, help="wall-clock training budget")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--mtp-lambda", type=float, default=0.3)
    ap.add_argument("--bias-gamma", type=float, default=1e-3, help="aux-loss-free router-bias step")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--eval-every", type=int, default=0, help="0: only at the end")
    ap.add_argument("--corpus-mb", type=float, default=4.0)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--intermediate", type=int, default=256)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--moe-intermediate", type=int, default=64)
    ap.add_argument("--share-dim", type=int, default=128)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--max-pos", type=int, default=CONTEXT, help="context (default: the real model's)")
    ap.add_argument(
        "--mlx-out",
        default=None,
        help="also convert the export here as the bundled demo is (4-bit, groups of %d)" % DEMO_GROUP_SIZE,
    )
    ap.add_argument(
        "--no-swiglu-limits",
        dest="swiglu_limits",
        action="store_false",
        help="export zeros instead of the real model's 7/16 clamps on the last 2 layers",
    )
    ap.add_argument("--max-eval-seqs", type=int, default=256)
    args = ap.parse_args()
    if args.mlx_out and os.path.exists(args.mlx_out):  # convert() refuses it: say so before training
        ap.error(f"--mlx-out {args.mlx_out} already exists; remove it or choose another folder")
    if args.steps is None and args.minutes is None:
        args.steps = 2000

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    t_start = time.time()
    os.makedirs(args.out, exist_ok=True)

    # corpus + tokenizer
    root, docs = collect_corpus(int(args.corpus_mb * 1e6))
    train_docs, held_docs = split_docs(docs)
    h = hashlib.sha256()
    for p, t in docs:
        h.update(p.encode() + b"\0" + t.encode() + b"\0")
    tok = train_tokenizer(train_docs, args.vocab)
    V = tok.get_vocab_size()
    eos_ids = [1, 2, tok.token_to_id("<|im_end|>")]
    train_ids = encode_stream(tok, train_docs)
    held_ids = encode_stream(tok, held_docs)
    nbytes_tr = sum(len(t.encode()) for _, t in train_docs)
    nbytes_he = sum(len(t.encode()) for _, t in held_docs)
    print(
        f"corpus: {len(docs)} files from {root} ({nbytes_tr + nbytes_he} bytes, sha256 {h.hexdigest()[:16]}); "
        f"train {len(train_docs)} files {len(train_ids)} tokens, held-out {len(held_docs)} files "
        f"{len(held_ids)} tokens; vocab {V}; {time.time() - t_start:.1f}s",
        flush=True,
    )

    cfg = make_config(V, args, eos_ids)
    write_tokenizer_files(tok, args.out, eos_ids, args.max_pos)

    model = Step35(cfg)
    model.init_weights(args.seed)
    nparam = sum(p.numel() for p in model.parameters())
    print(f"model: {nparam} params ({nparam * 2 / 1e6:.2f} MB bf16)", flush=True)

    T = args.seq
    nh = (len(held_ids) - 1) // T
    held = torch.from_numpy(held_ids[: nh * T].reshape(nh, T))[: args.max_eval_seqs]

    decay, no_decay = [], []
    for n_, p in model.named_parameters():
        (no_decay if (p.dim() < 2 or n_.endswith("norm.weight")) else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    rng = np.random.default_rng(args.seed)
    budget_s = args.minutes * 60 if args.minutes is not None else None
    t_train = time.time()
    step, hist = 0, []
    model.train()
    while True:
        el = time.time() - t_train
        prog = 0.0
        if args.steps:
            prog = max(prog, step / args.steps)
        if budget_s:
            prog = max(prog, el / budget_s)
        if prog >= 1.0:
            break
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * prog)))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = rng.integers(0, len(train_ids) - T, size=args.batch)
        ids = torch.from_numpy(np.stack([train_ids[s : s + T] for s in starts]))
        logits, mtp = model(ids)
        loss_t = F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
        loss_m = []
        for k, lk in enumerate(mtp, start=1):
            lk = lk[:, : T - k - 1]
            loss_m.append(F.cross_entropy(lk.reshape(-1, V), ids[:, k + 1 :].reshape(-1)))
        loss = loss_t + args.mtp_lambda * torch.stack(loss_m).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        # aux-loss-free load balancing (DeepSeek-V3): push under-loaded experts up
        with torch.no_grad():
            for moe in model.moe_layers():
                load = moe.last_load
                moe.router_bias += args.bias_gamma * torch.sign(load.mean() - load)
        step += 1
        hist.append([loss_t.item()] + [x.item() for x in loss_m])
        if step % args.log_every == 0 or step == 1:
            a = np.mean(hist[-args.log_every :], axis=0)
            loads = [(m.last_load.max() / m.last_load.mean()).item() for m in model.moe_layers()]
            print(
                f"step {step} {time.time() - t_train:.0f}s lr {lr:.2e} trunk {a[0]:.4f} mtp "
                + " ".join(f"{x:.4f}" for x in a[1:])
                + f" gnorm {gn:.2f} max/mean load "
                + " ".join(f"{x:.2f}" for x in loads),
                flush=True,
            )
        if args.eval_every and step % args.eval_every == 0:
            print(f"eval @ {step}: {fmt_eval(evaluate(model, held))}", flush=True)
    train_s = time.time() - t_train
    print(f"trained {step} steps in {train_s:.0f}s", flush=True)

    # round to bf16 so the reported metrics are those of the shipped weights
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    res = evaluate(model, held)
    print(f"held-out (bf16 weights): {fmt_eval(res)}", flush=True)

    export(model, cfg, args.out)

    # verification 1: reload the shards into a fresh model
    fresh = Step35(cfg)
    load_hf_state_dict(fresh, read_export(args.out))
    fresh.eval()
    model.eval()
    probe = held[:4]
    with torch.no_grad():
        a_l, a_m = model(probe)
        b_l, b_m = fresh(probe)
    d_reload = max([(a_l - b_l).abs().max().item()] + [(x - y).abs().max().item() for x, y in zip(a_m, b_m)])
    print(f"verify reload: max |logit diff| trunk+MTP = {d_reload:.3e}", flush=True)
    assert d_reload < 1e-5, d_reload
    # verification 2: transformers' Step3p7TextModel on the exported weights
    d_hf = None
    try:
        hl = hf_trunk_logits(args.out, read_export(args.out), probe)
        d_hf = (hl - b_l).abs().max().item()
        print(f"verify vs transformers Step3p7TextModel: max |logit diff| = {d_hf:.3e}", flush=True)
        assert d_hf < 1e-3, d_hf
    except ImportError as e:  # pragma: no cover
        print(f"transformers step3p7 unavailable: {e}")

    # swiglu clamp activity on the held-out set (how often the exported clamps bite)
    files = sorted(f for f in os.listdir(args.out))
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in files if f.endswith(".safetensors"))
    log = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "args": vars(args),
        "seed": args.seed,
        "steps": step,
        "train_wall_s": round(train_s, 1),
        "total_wall_s": round(time.time() - t_start, 1),
        "threads": args.threads,
        "params": nparam,
        "safetensors_bytes": size,
        "corpus": {
            "description": "CPython standard library *.py sources (sorted walk of dirname(os.__file__), "
            f"excluding dirs {sorted(EXCLUDE_DIRS)} and test_*.py, files <= 150 kB), "
            "first ~%.1f MB; every 50th file held out" % args.corpus_mb,
            "root": root,
            "python": platform.python_version(),
            "files": len(docs),
            "train_files": len(train_docs),
            "heldout_files": len(held_docs),
            "train_tokens": int(len(train_ids)),
            "heldout_tokens": int(len(held_ids)),
            "bytes": nbytes_tr + nbytes_he,
            "sha256": h.hexdigest(),
        },
        "tokenizer": {"type": "byte-level BPE (tokenizers)", "vocab_size": V, "special": SPECIAL_TOKENS},
        "training": {
            "optimizer": "AdamW(0.9,0.95) wd 0.1",
            "lr": args.lr,
            "schedule": "linear warmup + cosine to 10%",
            "batch": args.batch,
            "seq": T,
            "mtp_lambda": args.mtp_lambda,
            "mtp_grad_into_trunk": True,
            "router_bias": f"aux-loss-free sign update, gamma {args.bias_gamma}",
        },
        "heldout_eval_seqs": int(held.shape[0]),
        "final_heldout": res,
        "verify": {"reload_max_abs_logit_diff": d_reload, "hf_step3p7_max_abs_logit_diff": d_hf},
        "final_train_loss_avg_last_50": np.mean(hist[-50:], axis=0).tolist() if hist else None,
    }
    json.dump(log, open(os.path.join(args.out, "train_log.json"), "w"), indent=2)
    print(f"exported to {args.out}: {files}; safetensors {size} bytes; total {time.time() - t_start:.0f}s")
    if args.mlx_out:
        convert_demo(args.out, args.mlx_out, log)


if __name__ == "__main__":
    main()
