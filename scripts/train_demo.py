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

Usage: .venv/bin/python scripts/train_demo.py --minutes 30 --threads 1 --mlx-out mlx_step35/demo
  (the HF export in build/demo-hf; with --mlx-out, also its conversion as the bundled demo is
  made: `convert.py -q --q-group-size 32`, 4-bit in groups of 32 so that every split weight
  divides into whole groups over 2 ranks, router 8-bit, embedding/lm_head/MTP heads 6-bit)
"""

from __future__ import annotations

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
import torch.nn as nn
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------
# corpus
# --------------------------------------------------------------------------------------------

EXCLUDE_DIRS = {
    "test",
    "tests",
    "site-packages",
    "dist-packages",
    "idlelib",
    "lib2to3",
    "turtledemo",
    "ensurepip",
    "__pycache__",
    "encodings",
    "pydoc_data",
    "tkinter",
    "venv",
    "config-3",
}
DEMO_GROUP_SIZE = 32  # o_proj (6 heads x 32) and the experts' down_proj (64) split in 2 whole groups
CONTEXT = 262144  # the real model's max_position_embeddings (the RoPE scaling does not read it)
SPECIAL_TOKENS = ["<s>", "<|endoftext|>", "</s>", "<|im_start|>", "<|im_end|>"]


def collect_corpus(max_bytes: int, max_file_bytes: int = 150_000):
    """Deterministic sorted subset of the stdlib's own *.py sources."""
    root = os.path.dirname(os.__file__)
    files = []
    for d, dirs, fs in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in EXCLUDE_DIRS and not x.startswith("config-"))
        for f in sorted(fs):
            if f.endswith(".py") and not f.startswith("test_"):
                files.append(os.path.join(d, f))
    files.sort(key=lambda p: os.path.relpath(p, root))
    docs, total = [], 0
    for p in files:
        try:
            with open(p, "r", encoding="utf-8") as fh:
                text = fh.read()
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip() or len(text.encode()) > max_file_bytes:
            continue
        docs.append((os.path.relpath(p, root), text))
        total += len(text.encode())
        if total >= max_bytes:
            break
    return root, docs


def split_docs(docs, every: int = 50):
    """Hold out every `every`-th file (2% for every=50) for evaluation."""
    train = [d for i, d in enumerate(docs) if i % every != every - 1]
    held = [d for i, d in enumerate(docs) if i % every == every - 1]
    return train, held


def train_tokenizer(train_docs, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([t for _, t in train_docs], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)]
    )
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    return tok


def encode_stream(tok, docs):
    """<s> doc <|endoftext|> <s> doc <|endoftext|> ... as one int32 stream."""
    encs = tok.encode_batch([t for _, t in docs], add_special_tokens=False)
    out = []
    for e in encs:
        out.append(0)
        out.extend(e.ids)
        out.append(1)
    return np.asarray(out, dtype=np.int64)


def write_tokenizer_files(tok, out_dir, eos_ids, max_len):
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    # A base model trained on plain code; it still gets Step-3.5's chat template, so that the
    # chat path (server, generate.py without --ignore-chat-template) runs end to end on it.
    template_path = os.path.join(os.path.dirname(__file__), "..", "mlx_step35", "chat_template.jinja")
    added = {
        str(i): {
            "content": s,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, s in enumerate(SPECIAL_TOKENS)
    }
    tcfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": added,
        "chat_template": open(template_path, encoding="utf-8").read(),
    }
    json.dump(tcfg, open(os.path.join(out_dir, "tokenizer_config.json"), "w"), indent=2)
    stm = {
        "bos_token": "<s>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "</s>"],
    }
    json.dump(stm, open(os.path.join(out_dir, "special_tokens_map.json"), "w"), indent=2)
    gen = {
        "bos_token_id": 0,
        "eos_token_id": eos_ids,
        "pad_token_id": 1,
        "do_sample": False,
        "transformers_version": "5.0.0",
    }
    json.dump(gen, open(os.path.join(out_dir, "generation_config.json"), "w"), indent=2)


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------


def make_config(vocab_size, args, eos_ids):
    n = args.layers
    n_mtp = 3
    tot = n + n_mtp
    layer_types = ["full_attention" if i % 4 == 0 else "sliding_attention" for i in range(tot)]
    n_dense = 2
    lim = [0.0] * tot
    lim_sh = [0.0] * tot
    if args.swiglu_limits:  # like the real model: clamps only on the last two trunk layers
        for i in (n - 2, n - 1):
            if i >= n_dense:
                lim[i], lim_sh[i] = 7.0, 16.0
    return {
        "architectures": ["Step3p5ForCausalLM"],
        "model_type": "step3p5",
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate,
        "num_hidden_layers": n,
        "num_attention_heads": 4,
        "num_attention_groups": 2,
        "head_dim": 32,
        "vocab_size": vocab_size,
        "max_seq_len": args.max_pos,
        "max_position_embeddings": args.max_pos,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "layer_types": layer_types,
        "sliding_window": args.window,
        "attention_other_setting": {
            "attention_type": "sliding_attention",
            "num_attention_heads": 6,
            "num_attention_groups": 2,
            "head_dim": 32,
        },
        "partial_rotary_factors": [0.5 if t == "full_attention" else 1.0 for t in layer_types],
        "rope_theta": [5_000_000.0 if t == "full_attention" else 10_000.0 for t in layer_types],
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 2.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 32.0,
            "original_max_position_embeddings": args.seq,
        },
        "yarn_only_types": ["full_attention"],
        "use_head_wise_attn_gate": True,
        "use_qk_norm": True,
        "zero_centered": True,
        "att_impl_type": "GQA",
        "use_moe": True,
        "moe_layers_enum": ",".join(str(i) for i in range(n_dense, n)),
        "moe_num_experts": args.experts,
        "moe_top_k": args.top_k,
        "moe_intermediate_size": args.moe_intermediate,
        "share_expert_dim": args.share_dim,
        "moe_router_activation": "sigmoid",
        "moe_router_scaling_factor": 3.0,
        "norm_expert_weight": True,
        "use_moe_router_bias": True,
        "need_fp32_gate": True,
        "swiglu_limits": lim,
        "swiglu_limits_shared": lim_sh,
        "num_nextn_predict_layers": n_mtp,
        "bos_token_id": 0,
        "eos_token_id": eos_ids,
        "pad_token_id": 1,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }


# --------------------------------------------------------------------------------------------
# model (float32 torch; semantics per STEP35_FACTS.md)
# --------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Zero-centred RMSNorm: stored w, applied as (1 + w), computed in fp32."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).type_as(x)


def rope_inv_freq(cfg, i):
    hd = cfg["head_dim"]
    f = cfg["partial_rotary_factors"][i]
    th = cfg["rope_theta"][i] if isinstance(cfg["rope_theta"], list) else cfg["rope_theta"]
    d = int(hd * f)
    inv = 1.0 / (th ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    rs = cfg.get("rope_scaling")
    if rs and cfg["layer_types"][i] in cfg.get("yarn_only_types", [cfg["layer_types"][i]]):
        assert rs["rope_type"] == "llama3"
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old = rs["original_max_position_embeddings"]
        lo_wl, hi_wl = old / lo, old / hi
        wl = 2 * math.pi / inv
        out = torch.where(wl > lo_wl, inv / factor, inv)
        smooth = (old / wl - lo) / (hi - lo)
        sm = (1 - smooth) * out / factor + smooth * out
        med = ~(wl < hi_wl) * ~(wl > lo_wl)
        inv = torch.where(med, sm, out)
    return inv


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def apply_rope(x, inv_freq, pos):
    # x [B, nh, T, hd]; rotate the first 2*len(inv_freq) dims (non-interleaved)
    fr = pos[:, None].float() * inv_freq[None, :]
    emb = torch.cat((fr, fr), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    d = emb.shape[-1]
    xr, xp = x[..., :d], x[..., d:]
    return torch.cat((xr * cos + rotate_half(xr) * sin, xp), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg, i):
        super().__init__()
        H, hd = cfg["hidden_size"], cfg["head_dim"]
        self.sliding = cfg["layer_types"][i] == "sliding_attention"
        if self.sliding:
            o = cfg["attention_other_setting"]
            self.nh, self.nkv = o["num_attention_heads"], o["num_attention_groups"]
            hd = o.get("head_dim", hd)
        else:
            self.nh, self.nkv = cfg["num_attention_heads"], cfg["num_attention_groups"]
        self.hd = hd
        self.window = cfg["sliding_window"] if self.sliding else None
        self.q_proj = nn.Linear(H, self.nh * hd, bias=False)
        self.k_proj = nn.Linear(H, self.nkv * hd, bias=False)
        self.v_proj = nn.Linear(H, self.nkv * hd, bias=False)
        self.o_proj = nn.Linear(self.nh * hd, H, bias=False)
        self.g_proj = nn.Linear(H, self.nh, bias=False)
        self.q_norm = RMSNorm(hd, cfg["rms_norm_eps"])
        self.k_norm = RMSNorm(hd, cfg["rms_norm_eps"])
        self.register_buffer("inv_freq", rope_inv_freq(cfg, i), persistent=False)

    def forward(self, x, pos):
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.nh, self.hd)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(B, T, self.nkv, self.hd)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        q = apply_rope(q, self.inv_freq, pos)
        k = apply_rope(k, self.inv_freq, pos)
        rep = self.nh // self.nkv
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        qi = torch.arange(T)[:, None]
        ki = torch.arange(T)[None, :]
        mask = ki <= qi
        if self.window is not None:
            mask = mask & (qi - ki < self.window)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.hd**-0.5)
        o = o * torch.sigmoid(self.g_proj(x)).transpose(1, 2).unsqueeze(-1)  # head-wise gate
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.nh * self.hd))


def swiglu(g, u, limit):
    g = F.silu(g)
    if limit:
        g = g.clamp(max=limit)
        u = u.clamp(min=-limit, max=limit)
    return g * u


class MLP(nn.Module):
    def __init__(self, H, I, limit=0.0):
        super().__init__()
        self.gate_proj = nn.Linear(H, I, bias=False)
        self.up_proj = nn.Linear(H, I, bias=False)
        self.down_proj = nn.Linear(I, H, bias=False)
        self.limit = limit

    def forward(self, x):
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), self.limit))


class MoE(nn.Module):
    def __init__(self, cfg, i):
        super().__init__()
        H, E, I = cfg["hidden_size"], cfg["moe_num_experts"], cfg["moe_intermediate_size"]
        self.E, self.k = E, cfg["moe_top_k"]
        self.scale = cfg["moe_router_scaling_factor"]
        self.limit = cfg["swiglu_limits"][i]
        self.gate = nn.Linear(H, E, bias=False)  # moe.gate.weight [E, H]
        self.register_buffer("router_bias", torch.zeros(E))  # moe.router_bias [E] fp32
        self.gate_proj = nn.Parameter(torch.empty(E, I, H))
        self.up_proj = nn.Parameter(torch.empty(E, I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))
        self.last_load = None

    def forward(self, x):
        shp = x.shape
        x = x.reshape(-1, shp[-1])
        scores = torch.sigmoid(F.linear(x.float(), self.gate.weight.float()))
        _, idx = torch.topk(scores + self.router_bias, self.k, dim=-1)
        w = scores.gather(1, idx)
        w = w / w.sum(-1, keepdim=True) * self.scale
        out = torch.zeros_like(x)
        with torch.no_grad():
            self.last_load = torch.bincount(idx.flatten(), minlength=self.E).float()
        for e in range(self.E):
            tok, slot = torch.where(idx == e)
            if tok.numel() == 0:
                continue
            xe = x[tok]
            h = swiglu(xe @ self.gate_proj[e].t(), xe @ self.up_proj[e].t(), self.limit)
            out.index_add_(0, tok, (h @ self.down_proj[e].t()) * w[tok, slot, None].to(x.dtype))
        return out.reshape(shp)


class DecoderLayer(nn.Module):
    def __init__(self, cfg, i):
        super().__init__()
        H, eps = cfg["hidden_size"], cfg["rms_norm_eps"]
        self.input_layernorm = RMSNorm(H, eps)
        self.post_attention_layernorm = RMSNorm(H, eps)
        self.self_attn = Attention(cfg, i)
        moe_set = {int(s) for s in cfg["moe_layers_enum"].split(",") if s.strip()}
        if i in moe_set and i < cfg["num_hidden_layers"]:
            self.moe = MoE(cfg, i)
            self.share_expert = MLP(H, cfg["share_expert_dim"], cfg["swiglu_limits_shared"][i])
        else:
            self.mlp = MLP(H, cfg["intermediate_size"], cfg["swiglu_limits_shared"][i])

    def forward(self, x, pos):
        x = x + self.self_attn(self.input_layernorm(x), pos)
        h = self.post_attention_layernorm(x)
        if hasattr(self, "moe"):
            return x + self.moe(h) + self.share_expert(h)
        return x + self.mlp(h)


class SharedHead(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        self.output = nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)


class MTPTransformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.shared_head = SharedHead(cfg)


class MTPLayer(DecoderLayer):
    def __init__(self, cfg, i):
        super().__init__(cfg, i)
        H, eps = cfg["hidden_size"], cfg["rms_norm_eps"]
        self.enorm = RMSNorm(H, eps)
        self.hnorm = RMSNorm(H, eps)
        self.eh_proj = nn.Linear(2 * H, H, bias=False)
        self.transformer = MTPTransformer(cfg)


class Inner(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        n, m = cfg["num_hidden_layers"], cfg["num_nextn_predict_layers"]
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.layers = nn.ModuleList(
            [DecoderLayer(cfg, i) for i in range(n)] + [MTPLayer(cfg, i) for i in range(n, n + m)]
        )
        self.norm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])


class Step35(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.n = cfg["num_hidden_layers"]
        self.m = cfg["num_nextn_predict_layers"]
        self.model = Inner(cfg)
        self.lm_head = nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)

    def init_weights(self, seed):
        g = torch.Generator().manual_seed(seed)
        nl = self.n + self.m
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.zeros_(p)
                continue
            std = 0.02
            if name.endswith(("o_proj.weight", "down_proj.weight", "down_proj")):
                std = 0.02 / math.sqrt(2 * nl)
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * std)

    def trunk(self, ids):
        T = ids.shape[1]
        pos = torch.arange(T)
        h = self.model.embed_tokens(ids)
        for layer in self.model.layers[: self.n]:
            h = layer(h, pos)
        return h  # before the final norm

    def forward(self, ids, n_mtp=None):
        """Returns trunk logits [B,T,V] and a list of MTP logits; block k's logits have length
        T-k, position t predicts ids[t+k+1] (valid for t < T-k-1)."""
        n_mtp = self.m if n_mtp is None else n_mtp
        h0 = self.trunk(ids)
        logits = self.lm_head(self.model.norm(h0))
        T = ids.shape[1]
        emb = self.model.embed_tokens(ids)
        mtp_logits, h_prev = [], h0
        for k in range(1, n_mtp + 1):
            blk = self.model.layers[self.n + k - 1]
            L = T - k
            e = emb[:, k : k + L]  # embed(x_{t+k})
            u = blk.eh_proj(torch.cat((blk.enorm(e), blk.hnorm(h_prev[:, :L])), dim=-1))
            hk = DecoderLayer.forward(blk, u, torch.arange(L) + k)  # RoPE position t+k
            sh = blk.transformer.shared_head
            mtp_logits.append(sh.output(sh.norm(hk)))
            h_prev = hk
        return logits, mtp_logits

    def moe_layers(self):
        return [l.moe for l in self.model.layers[: self.n] if hasattr(l, "moe")]


# --------------------------------------------------------------------------------------------
# export / import in the HF checkpoint layout
# --------------------------------------------------------------------------------------------


def hf_state_dict(model):
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith("inv_freq"):
            continue
        if k.endswith((".moe.gate_proj", ".moe.up_proj", ".moe.down_proj")):
            k = k + ".weight"
        v = v.detach().clone().contiguous()
        sd[k] = v.float() if k.endswith("router_bias") else v.to(torch.bfloat16)
    return sd


def load_hf_state_dict(model, sd):
    own = {}
    for k, v in sd.items():
        if k.endswith((".moe.gate_proj.weight", ".moe.up_proj.weight", ".moe.down_proj.weight")):
            k = k[: -len(".weight")]
        own[k] = v.float()
    missing, unexpected = model.load_state_dict(own, strict=False)
    missing = [m for m in missing if not m.endswith("inv_freq")]
    assert not missing and not unexpected, (missing, unexpected)


def export(model, cfg, out_dir):
    from safetensors.torch import save_file

    sd = hf_state_dict(model)
    n = cfg["num_hidden_layers"]

    def is_mtp(key):
        parts = key.split(".")
        return key.startswith("model.layers.") and int(parts[2]) >= n

    shards = {
        "model-00001-of-00002.safetensors": {k: v for k, v in sd.items() if not is_mtp(k)},
        "model-00002-of-00002.safetensors": {k: v for k, v in sd.items() if is_mtp(k)},
    }
    weight_map, total = {}, 0
    for fname, part in shards.items():
        save_file(part, os.path.join(out_dir, fname), metadata={"format": "pt"})
        for k, v in part.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    json.dump(index, open(os.path.join(out_dir, "model.safetensors.index.json"), "w"), indent=2)
    json.dump(cfg, open(os.path.join(out_dir, "config.json"), "w"), indent=2)
    return sd


def read_export(out_dir):
    from safetensors.torch import load_file

    index = json.load(open(os.path.join(out_dir, "model.safetensors.index.json")))
    sd = {}
    for fname in sorted(set(index["weight_map"].values())):
        sd.update(load_file(os.path.join(out_dir, fname)))
    assert set(sd) == set(index["weight_map"])
    return sd


def hf_trunk_logits(out_dir, sd, ids):
    """Logits of transformers' Step3p7TextModel (+ lm_head) on the exported weights."""
    from transformers.models.step3p7.configuration_step3p7 import Step3p7TextConfig
    from transformers.models.step3p7.modeling_step3p7 import Step3p7TextModel

    raw = json.load(open(os.path.join(out_dir, "config.json")))
    raw = {k: v for k, v in raw.items() if k not in ("architectures", "model_type", "torch_dtype")}
    hcfg = Step3p7TextConfig(**raw)
    hcfg._attn_implementation = "eager"
    hf = Step3p7TextModel(hcfg).float().eval()
    n = raw["num_hidden_layers"]
    target = {}
    for k, v in sd.items():
        if not k.startswith("model."):
            continue
        k2 = k[len("model.") :]
        if k2.startswith("layers.") and int(k2.split(".")[1]) >= n:
            continue
        k2 = (
            k2.replace(".moe.gate.weight", ".mlp.gate.weight")
            .replace(".moe.router_bias", ".mlp.gate.e_score_correction_bias")
            .replace(".moe.down_proj.weight", ".mlp.experts.down_proj")
            .replace(".share_expert.", ".mlp.shared_experts.")
        )
        if k2.endswith(".moe.up_proj.weight"):
            continue
        if k2.endswith(".moe.gate_proj.weight"):
            up = sd[k.replace("gate_proj", "up_proj")]
            k2 = k2.replace(".moe.gate_proj.weight", ".mlp.experts.gate_up_proj")
            v = torch.cat((v, up), dim=1)
        target[k2] = v.float()
    hsd = hf.state_dict()
    missing = set(hsd) - set(target)
    extra = set(target) - set(hsd)
    assert not missing and not extra, (sorted(missing)[:10], sorted(extra)[:10])
    for k in hsd:
        assert hsd[k].shape == target[k].shape, (k, hsd[k].shape, target[k].shape)
    hf.load_state_dict(target, strict=True)
    with torch.no_grad():
        h = hf(input_ids=ids).last_hidden_state
        return F.linear(h, sd["lm_head.weight"].float())


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


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


def convert_demo(hf_dir, mlx_dir, log):
    """The bundled demo's conversion of the export, with the training log beside it."""
    from mlx_step35 import convert

    convert(hf_dir, mlx_dir, quantize=True, q_group_size=DEMO_GROUP_SIZE)
    log = dict(
        log,
        conversion=f"python convert.py --hf-path {hf_dir} --mlx-path {mlx_dir} -q --q-group-size {DEMO_GROUP_SIZE}",
    )
    json.dump(log, open(os.path.join(mlx_dir, "train_log.json"), "w"), indent=2)
    print(f"converted to {mlx_dir} (4-bit, groups of {DEMO_GROUP_SIZE})")


if __name__ == "__main__":
    main()
