"""Step-3.5-Flash in MLX: the trunk, lm_head, and the three MTP blocks.

Module names follow mlx-lm's step3p5 for the trunk (so our conversions load in stock
mlx-lm) and the checkpoint's own names inside the MTP blocks. Norm weights hold the
effective scale (1 + w of the zero-centred checkpoint); the loader does that once.
"""

from functools import lru_cache
from typing import Any, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.activations import swiglu
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.rope_utils import initialize_rope
from mlx_lm.models.step3p5 import ClampedSwiGLU, clamped_swiglu
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwiGLU, SwitchGLU

from .cache import FullKVCache, KVQuant, SlidingKVCache, attention
from .config import ModelArgs
from .fusion import project

Row = Tuple[int, Any, Any]  # one packed sequence: (its number of tokens, its mask, its cache)


class MLP(nn.Module):
    MERGE = ("gate_proj", "up_proj")  # one matmul once loaded (fusion.py)
    merged = None

    def __init__(self, dim: int, hidden: int, limit: float = 0.0):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.limit = limit if limit > 0 else None  # 0 in the config means no clamp

    def __call__(self, x: mx.array) -> mx.array:
        (gate, up), _ = project(self, x)
        if self.limit is None:
            return self.down_proj(swiglu(gate, up))
        return self.down_proj(clamped_swiglu(up, gate, self.limit))


# The MoE in few kernels, in mlx-lm's order of operations and dtypes. Routing weight of
# expert e: w_e = scale * sigmoid(g_e) / S with S the sum of sigmoid(g) over the chosen experts
# (S = 1 without norm_expert_weight). The router hands over the chosen experts' raw gate
# logits; `_combine` takes the weights, the weighted sum, the shared expert and the residual
# add. Up to CHAIN_TOP_K experts its sums are chains of adds, which MLX fuses with the rest: 2
# kernels; beyond, such a chain outgrows MLX's fusion depth (9 kernels at top_k 8), and the sums
# are reductions: 5 kernels at any top_k. Both give the same bits (tests).
CHAIN_TOP_K = 4


@mx.compile
def _route(logits, bias, top_k: int):
    """Top-k experts by biased sigmoid score (fp32): indices and their raw logits, [B, L, top_k]."""
    idx = mx.argpartition(-(mx.sigmoid(logits.astype(mx.float32)) + bias), kth=top_k - 1, axis=-1)
    idx = idx[..., :top_k]
    return idx, mx.take_along_axis(logits, idx, axis=-1)


def _chain(terms):
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


def _combine(experts, chosen, shared, residual, scale: float, normalize: bool):
    """[residual +] (sum over k of experts[..., k, :] * w_k in fp32, rounded to the model's
    dtype) + shared; experts [B, L, top_k, H], chosen [B, L, top_k]."""
    few = experts.shape[-2] <= CHAIN_TOP_K
    return (_combine_chained if few else _combine_reduced)(
        experts, chosen, shared, residual, scale, normalize
    )


@mx.compile
def _combine_chained(experts, chosen, shared, residual, scale: float, normalize: bool):
    ws = mx.sigmoid(chosen.astype(mx.float32))  # [B, L, top_k]
    ws = [ws[..., k : k + 1] for k in range(experts.shape[-2])]  # [B, L, 1] each
    if normalize:
        total = _chain(ws)
        ws = [w / total for w in ws]
    routed = _chain([experts[..., k, :] * (w * scale) for k, w in enumerate(ws)])
    out = routed.astype(shared.dtype) + shared
    return out if residual is None else residual + out


@mx.compile
def _combine_reduced(experts, chosen, shared, residual, scale: float, normalize: bool):
    w = mx.sigmoid(chosen.astype(mx.float32))  # [B, L, top_k]
    wide = mx.broadcast_to(w[..., None], experts.shape)  # broadcast first: one fused kernel below
    if normalize:
        wide = wide / w.sum(axis=-1, keepdims=True)[..., None]
    routed = (experts * (wide * scale)).sum(axis=-2)
    out = routed.astype(shared.dtype) + shared
    return out if residual is None else residual + out


class MoEGate(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.moe_top_k
        self.scale = args.moe_router_scaling_factor
        self.normalize = args.norm_expert_weight
        self.gate = nn.Linear(args.hidden_size, args.moe_num_experts, bias=False)
        self.router_bias = mx.zeros((args.moe_num_experts,), dtype=mx.float32)

    def __call__(self, x: mx.array):
        """(indices of the chosen experts, their raw gate logits), [B, L, top_k]."""
        return _route(self.gate(x), self.router_bias, self.top_k)


class DecodeSwitchGLU(SwitchGLU):
    """mlx-lm's SwitchGLU (same parameters, same results) whose few-token calls (decoding,
    verifying) give the gathered matmuls their row indices as constants: without them each
    gather_qmm builds an arange, one more kernel per call. Many tokens take mlx-lm's
    expert-sorted path. (Its gate and up projections are not merged like the dense ones: that
    would copy two thirds of the model's bytes at every load for one kernel per MoE layer.)"""

    def __call__(self, x: mx.array, idx: mx.array) -> mx.array:
        if idx.size >= 64:
            return super().__call__(x, idx)
        token_rows, rows = _gather_rows(*idx.shape)
        x = mx.expand_dims(x, (-2, -3))  # [B, L, 1, 1, H]
        up = _switch_linear(self.up_proj, x, token_rows, idx)  # [B, L, K, 1, I]
        gate = _switch_linear(self.gate_proj, x, token_rows, idx)
        return _switch_linear(self.down_proj, self.activation(up, gate), rows, idx).squeeze(-2)


@lru_cache(maxsize=32)
def _gather_rows(B: int, L: int, K: int):
    """Row indices for the experts' gathered matmuls, [B, L, K]: the token's row of x, and
    each (token, expert) pair's own row; built once per shape, on the host."""
    rows = np.arange(B * L * K, dtype=np.uint32).reshape(B, L, K)
    return mx.array(rows // K), mx.array(rows)


def _switch_linear(layer, x, rows, idx):
    """One of SwitchGLU's projections with explicit row indices (without them, gather_qmm
    builds an arange: one more kernel per call)."""
    if "bias" in layer:
        return layer(x, idx)
    if isinstance(layer, QuantizedSwitchLinear):
        return mx.gather_qmm(
            x,
            layer["weight"],
            layer["scales"],
            layer.get("biases"),
            lhs_indices=rows,
            rhs_indices=idx,
            transpose=True,
            group_size=layer.group_size,
            bits=layer.bits,
            mode=layer.mode,
            global_scale=getattr(layer, "global_scale", None),
        )
    return mx.gather_mm(x, layer["weight"].swapaxes(-1, -2), lhs_indices=rows, rhs_indices=idx)


class MoE(nn.Module):
    def __init__(self, args: ModelArgs, i: int):
        super().__init__()
        self.gate = MoEGate(args)
        limit = args.swiglu_limit(i, shared=False)
        self.switch_mlp = DecodeSwitchGLU(
            args.hidden_size,
            args.moe_intermediate_size,
            args.moe_num_experts,
            activation=ClampedSwiGLU(limit) if limit > 0 else SwiGLU(),
        )
        self.share_expert = MLP(args.hidden_size, args.share_expert_dim, args.swiglu_limit(i, shared=True))
        self.layer = i
        self.on_route = None  # optional callback(layer, idx): expert tracing
        self.sharding_group = None  # tensor parallel: each rank holds a slice of every expert

    def __call__(self, x: mx.array, residual: Optional[mx.array] = None) -> mx.array:
        """The routed experts plus the shared one, plus `residual` when given (fused with the sums)."""
        idx, chosen = self.gate(x)
        if self.on_route is not None:
            self.on_route(self.layer, idx)
        experts = self.switch_mlp(x, idx)  # [B, L, top_k, H]
        shared = self.share_expert(x)
        if self.sharding_group is None:
            return _combine(experts, chosen, shared, residual, self.gate.scale, self.gate.normalize)
        out = _combine(experts, chosen, shared, None, self.gate.scale, self.gate.normalize)
        out = mx.distributed.all_sum(out, group=self.sharding_group)  # one all-sum of the partial outputs
        return out if residual is None else residual + out


@mx.compile
def _head_gate(out, g):
    """out [B, L, heads, head_dim] times sigmoid(g [B, L, heads]) per head, in one kernel."""
    return out * mx.sigmoid(mx.broadcast_to(g[..., None], out.shape))


class Attention(nn.Module):
    MERGE = ("q_proj", "k_proj", "v_proj", "g_proj")  # one matmul once loaded (fusion.py)
    merged = None

    def __init__(self, args: ModelArgs, i: int, position_shift: int = 0):
        super().__init__()
        dim, hd = args.hidden_size, args.head_dim
        self.num_heads, self.num_kv_heads = args.heads(i)
        self.scale = hd**-0.5
        self.position_shift = position_shift  # MTP block k sees RoPE position t + k
        self.q_proj = nn.Linear(dim, self.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(dim, self.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(dim, self.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.num_heads * hd, dim, bias=False)
        self.q_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)
        self.k_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)
        self.use_gate = args.use_head_wise_attn_gate
        if self.use_gate:
            self.g_proj = nn.Linear(dim, self.num_heads, bias=False)
        self.rope = initialize_rope(
            dims=int(hd * args.rotary_factor(i)),
            base=args.rope_theta_at(i),
            traditional=False,
            scaling_config=args.rope_scaling_at(i),
            max_position_embeddings=args.max_position_embeddings,
        )

    def __call__(self, x: mx.array, mask=None, cache: Optional[Any] = None) -> mx.array:
        return self.rows(x, [(x.shape[1], mask, cache)])

    def rows(self, x: mx.array, rows: Sequence[Row]) -> mx.array:
        """Attention over packed sequences: x [B, T, dim] holds the tokens of each sequence
        of `rows` (length, mask, cache) one after another. The projections run once over
        all T tokens (one read of the weights); each sequence attends over its own cache."""
        B, T, _ = x.shape
        (q, k, v, *g), merged = project(self, x)
        if merged and T > 1:
            # Slices of the merged output have holes between rows; Metal's rms_norm would copy
            # them anyway: copy here, where the count of kernels sees it.
            q, k = mx.contiguous(q), mx.contiguous(k)
        q = self.q_norm(q.reshape(B, T, self.num_heads, -1))
        k = self.k_norm(k.reshape(B, T, self.num_kv_heads, -1))
        v = v.reshape(B, T, self.num_kv_heads, -1)
        if len(rows) == 1:
            out = self._attend(q, k, v, *rows[0][1:])
        else:
            outs, s = [], 0
            for n, mask, cache in rows:
                outs.append(self._attend(q[:, s : s + n], k[:, s : s + n], v[:, s : s + n], mask, cache))
                s += n
            out = mx.concatenate(outs, axis=1)
        if self.use_gate:
            out = _head_gate(out, g[0])
        return self.o_proj(out.reshape(B, T, -1))

    def _attend(self, q, k, v, mask, cache):
        """One sequence's queries, keys and values [B, L, heads, head_dim] (normed): RoPE at
        the cache's offset, the cache updated, attention. Returns [B, L, heads, head_dim]."""
        q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))
        offset = (cache.offset if cache is not None else 0) + self.position_shift
        q = self.rope(q, offset=offset)
        k = self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = attention(q, k, v, self.scale, mask, getattr(cache, "quant", None))
        return out.transpose(0, 2, 1, 3)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, i: int, position_shift: int = 0):
        super().__init__()
        self.is_sliding = args.is_sliding(i)
        self.self_attn = Attention(args, i, position_shift)
        if args.is_moe(i):
            self.mlp = MoE(args, i)
        else:
            limit = args.swiglu_limit(i, shared=True)
            self.mlp = MLP(args.hidden_size, args.intermediate_size, limit)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask=None, cache=None, rows: Optional[Sequence[Row]] = None) -> mx.array:
        """One sequence (mask, cache), or packed sequences (`rows`: see Attention.rows)."""
        rows = rows or [(x.shape[1], mask, cache)]
        h = x + self.self_attn.rows(self.input_layernorm(x), rows)
        if isinstance(self.mlp, MoE):
            return self.mlp(self.post_attention_layernorm(h), residual=h)
        return h + self.mlp(self.post_attention_layernorm(h))


class SharedHead(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.output = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, h: mx.array) -> mx.array:
        return self.output(self.norm(h))


class MTPBlock(DecoderLayer):
    """MTP block k (layer num_hidden_layers + k - 1): a dense decoder layer fed
    eh_proj([enorm(embed(x_{t+k})), hnorm(h_{k-1,t})]), with its own output head."""

    def __init__(self, args: ModelArgs, k: int):
        super().__init__(args, args.num_hidden_layers + k - 1, position_shift=k)
        self.window = args.sliding_window if self.is_sliding else None
        self.enorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.hnorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * args.hidden_size, args.hidden_size, bias=False)
        self.shared_head = SharedHead(args)

    def __call__(self, emb: mx.array, h_prev: mx.array, cache=None) -> mx.array:
        """emb: embeddings of x_{t+k}; h_prev: h_{k-1,t}. Returns h_{k,t} (before the head norm)."""
        u = self.eh_proj(mx.concatenate([self.enorm(emb), self.hnorm(h_prev)], axis=-1))
        mask = create_attention_mask(u, cache, window_size=self.window)
        return super().__call__(u, mask, cache)


class Step3p5Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self._first = {}  # index of the first layer of each kind, whose cache gives the mask
        for i, layer in enumerate(self.layers):
            self._first.setdefault(layer.is_sliding, i)

    def __call__(self, inputs: mx.array, cache: Optional[List[Any]] = None) -> mx.array:
        """Hidden states after the last layer, before the final norm: [B, L, H]."""
        return self.packed(inputs, [(inputs.shape[1], cache)])

    def packed(self, inputs: mx.array, seqs: Sequence[Tuple[int, Optional[List[Any]]]]) -> mx.array:
        """Several sequences in one pass: inputs [B, T] holds the tokens of each of `seqs`
        (length, its caches) one after another; returns their hidden states [B, T, H] in the
        same order. Everything but attention runs once over all T tokens."""
        h = self.embed_tokens(inputs)
        per_layer = []
        for n, cache in seqs:
            cache = cache or [None] * len(self.layers)
            hs = h if len(seqs) == 1 else h[:, :n]  # its shape is what a mask needs
            masks = {
                sliding: create_attention_mask(
                    hs, cache[i], window_size=self.args.sliding_window if sliding else None
                )
                for sliding, i in self._first.items()
            }
            per_layer.append([(n, masks[layer.is_sliding], c) for layer, c in zip(self.layers, cache)])
        for i, layer in enumerate(self.layers):
            h = layer(h, rows=[rows[i] for rows in per_layer])
        return h


class Model(nn.Module):
    def __init__(self, args: ModelArgs, mtp: bool = True):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = Step3p5Model(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        n_mtp = args.num_nextn_predict_layers if mtp else 0
        self.mtp = [MTPBlock(args, k) for k in range(1, n_mtp + 1)]

    @property
    def layers(self):
        return self.model.layers

    @property
    def num_mtp(self) -> int:
        return len(self.mtp)

    def __call__(self, inputs: mx.array, cache: Optional[List[Any]] = None) -> mx.array:
        return self.logits(self.model(inputs, cache))

    def hidden(self, inputs: mx.array, cache: Optional[List[Any]] = None) -> mx.array:
        """Trunk hidden states before the final norm (what the MTP blocks read)."""
        return self.model(inputs, cache)

    def packed(self, inputs: mx.array, seqs: Sequence[Tuple[int, Optional[List[Any]]]]) -> mx.array:
        """Trunk hidden states of several sequences in one pass (see Step3p5Model.packed)."""
        return self.model.packed(inputs, seqs)

    def logits(self, hidden: mx.array) -> mx.array:
        return self.lm_head(self.model.norm(hidden))

    def make_cache(self, slack: int = 4, kv: Optional[KVQuant] = None) -> List[Any]:
        """One cache per trunk layer; sliding ones can rewind up to `slack` tokens; with `kv`,
        the full-attention ones store keys and values quantized (sliding ones stay 16-bit)."""
        return [self._cache(layer.is_sliding, slack, kv) for layer in self.layers]

    def make_mtp_cache(self, slack: int = 4, kv: Optional[KVQuant] = None) -> List[Any]:
        return [self._cache(block.is_sliding, slack, kv) for block in self.mtp]

    def _cache(self, sliding: bool, slack: int, kv: Optional[KVQuant] = None):
        if sliding:
            return SlidingKVCache(self.args.sliding_window, slack)
        if kv is not None and self.args.head_dim % kv.group_size:
            raise ValueError(f"kv_group_size {kv.group_size} does not divide head_dim {self.args.head_dim}")
        return FullKVCache(kv)

    def _require_mtp(self):
        if not self.mtp:
            raise ValueError(
                "this model has no MTP weights (checkpoint without layers "
                f"{self.args.num_hidden_layers}+ or loaded with mtp=False)"
            )

    def mtp_hidden(self, k: int, tokens: mx.array, h_prev: mx.array, cache=None) -> mx.array:
        """Block k on tokens x_{t+k} and h_{k-1,t}: returns h_{k,t} (before its head norm)."""
        self._require_mtp()
        return self.mtp[k - 1](self.model.embed_tokens(tokens), h_prev, cache)

    def mtp_step(self, k: int, tokens: mx.array, h_prev: mx.array, cache=None):
        """As mtp_hidden, plus block k's logits for x_{t+k+1}."""
        h = self.mtp_hidden(k, tokens, h_prev, cache)
        return h, self.mtp[k - 1].shared_head(h)

    def mtp_logits(self, tokens: mx.array) -> List[mx.array]:
        """Teacher-forced MTP logits; element k-1 is [B, L-k, V], row t predicting x_{t+k+1}."""
        self._require_mtp()
        h = self.hidden(tokens)
        out = []
        L = tokens.shape[1]
        for k in range(1, self.num_mtp + 1):
            h, logits = self.mtp_step(k, tokens[:, k:], h[:, : L - k])
            out.append(logits)
        return out

    @property
    def cast_predicate(self):
        return lambda path: "router_bias" not in path
