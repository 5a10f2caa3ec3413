"""Held-out evaluation of the demo model: trunk cross-entropy and top-1, and per MTP depth
its cross-entropy, accuracy against the data and against the trunk's argmax, alone and chained."""

import torch
import torch.nn.functional as F


@torch.no_grad()
def evaluate(model, seqs, bs=16):
    model.eval()
    m = model.m
    tot = {"trunk_nll": 0.0, "trunk_n": 0, "trunk_acc": 0}
    for k in range(1, m + 1):
        tot.update(
            {
                f"nll{k}": 0.0,
                f"n{k}": 0,
                f"acc{k}": 0,
                f"agree{k}": 0,
                f"chain_data{k}": 0,
                f"chain_trunk{k}": 0,
                f"chain_n{k}": 0,
            }
        )
    for s in range(0, len(seqs), bs):
        ids = seqs[s : s + bs]
        T = ids.shape[1]
        logits, mtp = model(ids)
        tgt = ids[:, 1:]
        tl = logits[:, :-1]
        tot["trunk_nll"] += F.cross_entropy(
            tl.reshape(-1, tl.shape[-1]), tgt.reshape(-1), reduction="sum"
        ).item()
        tot["trunk_n"] += tgt.numel()
        targ = logits.argmax(-1)  # trunk prediction for x_{t+1}
        tot["trunk_acc"] += (targ[:, :-1] == tgt).sum().item()
        # positions t where all m blocks have a target: t + m + 1 < T
        P = T - m - 1
        ok_data = torch.ones(ids.shape[0], P, dtype=torch.bool)
        ok_trunk = torch.ones(ids.shape[0], P, dtype=torch.bool)
        for k in range(1, m + 1):
            lk = mtp[k - 1][:, : T - k - 1]
            yk = ids[:, k + 1 :]
            tot[f"nll{k}"] += F.cross_entropy(
                lk.reshape(-1, lk.shape[-1]), yk.reshape(-1), reduction="sum"
            ).item()
            tot[f"n{k}"] += yk.numel()
            pk = lk.argmax(-1)
            tot[f"acc{k}"] += (pk == yk).sum().item()
            # draft k at t vs the trunk's own argmax at position t+k (its guess for x_{t+k+1})
            tk = targ[:, k : T - 1]
            tot[f"agree{k}"] += (pk == tk).sum().item()
            ok_data &= pk[:, :P] == yk[:, :P]
            ok_trunk &= pk[:, :P] == tk[:, :P]
            tot[f"chain_data{k}"] += ok_data.sum().item()
            tot[f"chain_trunk{k}"] += ok_trunk.sum().item()
            tot[f"chain_n{k}"] += ok_data.numel()
    res = {
        "trunk_ce": tot["trunk_nll"] / tot["trunk_n"],
        "trunk_top1": tot["trunk_acc"] / tot["trunk_n"],
        "mtp": [],
    }
    for k in range(1, m + 1):
        res["mtp"].append(
            {
                "depth": k,
                "ce": tot[f"nll{k}"] / tot[f"n{k}"],
                "acc_vs_data": tot[f"acc{k}"] / tot[f"n{k}"],
                "acc_vs_trunk_argmax": tot[f"agree{k}"] / tot[f"n{k}"],
                "chained_acc_vs_data": tot[f"chain_data{k}"] / tot[f"chain_n{k}"],
                "chained_acc_vs_trunk_argmax": tot[f"chain_trunk{k}"] / tot[f"chain_n{k}"],
            }
        )
    model.train()
    return res


def fmt_eval(r):
    s = f"trunk CE {r['trunk_ce']:.4f} (top1 {r['trunk_top1']:.3f})"
    for b in r["mtp"]:
        s += (
            f" | MTP{b['depth']} CE {b['ce']:.4f} acc {b['acc_vs_data']:.3f}"
            f" agree {b['acc_vs_trunk_argmax']:.3f} chain {b['chained_acc_vs_trunk_argmax']:.3f}"
        )
    return s
