"""The demo model in float32 torch: its config.json (a small Step-3.5-Flash) and the trunk +
MTP forward, with the semantics of the real model (see train_demo.py's docstring)."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


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
