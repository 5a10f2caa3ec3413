"""Held-out quality of a demo-model conversion, measured with this runtime: trunk
cross-entropy and top-1, and per MTP depth the teacher-forced cross-entropy, accuracy and
agreement with the trunk's argmax (what greedy drafting is accepted on).

    python scripts/eval_demo.py [--model mlx_step35/demo] [--seq 128] [--max-seqs 64]
"""

import argparse
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from demo_data import collect_corpus, split_docs  # noqa: E402  (same held-out files)

from mlx_step35 import load  # noqa: E402


def heldout_ids(tokenizer, corpus_mb: float = 4.0):
    _, docs = collect_corpus(int(corpus_mb * 1e6))
    _, held = split_docs(docs)
    ids = []
    for _, text in held:
        ids += [0] + tokenizer.encode(text, add_special_tokens=False) + [1]
    return np.array(ids)


def evaluate(model, ids, seq: int, max_seqs: int):
    n = min(len(ids) // seq, max_seqs)
    K = model.num_mtp
    ce, top1 = [], []
    mtp = [dict(ce=[], acc=[], agree=[], chain=[]) for _ in range(K)]
    for s in range(n):
        x = mx.array(ids[s * seq : (s + 1) * seq][None])
        logits = model(x)[0, :-1].astype(mx.float32)
        target = x[0, 1:]
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        ce.append(-mx.take_along_axis(lp, target[:, None], axis=-1).mean().item())
        trunk_arg = logits.argmax(-1)
        top1.append((trunk_arg == target).mean().item())
        chain = mx.ones(seq - 1 - K, dtype=mx.bool_)
        for k, lk in enumerate(model.mtp_logits(x), start=1):  # row t predicts x_{t+k+1}
            lk = lk[0].astype(mx.float32)[: seq - 1 - k]
            tgt = x[0, k + 1 :]
            lpk = lk - mx.logsumexp(lk, axis=-1, keepdims=True)
            m = mtp[k - 1]
            m["ce"].append(-mx.take_along_axis(lpk, tgt[:, None], axis=-1).mean().item())
            m["acc"].append((lk.argmax(-1) == tgt).mean().item())
            agree = lk.argmax(-1) == trunk_arg[k:]  # draft == trunk's own prediction there
            m["agree"].append(agree.mean().item())
            chain = chain & agree[: seq - 1 - K]
            m["chain"].append(chain.mean().item())
    return np.mean(ce), np.mean(top1), [{k: float(np.mean(v)) for k, v in m.items()} for m in mtp], n


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the bundled demo model")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--max-seqs", type=int, default=64)
    a = ap.parse_args()
    model, tok = load(a.model)
    ce, top1, mtp, n = evaluate(model, heldout_ids(tok), a.seq, a.max_seqs)
    print(
        f"held-out: {n} sequences of {a.seq} tokens; trunk CE {ce:.4f} (ppl {np.exp(ce):.1f}), top-1 {top1:.3f}"
    )
    print("| MTP depth | CE | accuracy | agrees with trunk argmax | chain 1..k all agree |")
    print("|---|---|---|---|---|")
    for k, m in enumerate(mtp, start=1):
        print(f"| {k} | {m['ce']:.4f} | {m['acc']:.3f} | {m['agree']:.3f} | {m['chain']:.3f} |")


if __name__ == "__main__":
    main()
