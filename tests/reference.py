"""References for parity tests, written from the facts sheet and third-party code only.

- `hf_trunk(path)`: HF transformers' Step3p7TextModel loaded from the checkpoint by an explicit
  key map with strict accounting.
- `mlx_lm_trunk(path)`: mlx-lm's models/step3p5.Model loaded through its own `sanitize`.
- `numpy_trunk(path)` / `mtp_reference(path, tokens)`: plain float64 numpy written from
  STEP35_FACTS.md (zero-centred norms, partial rotate-half RoPE, head-wise gate, sigmoid router
  with bias-only selection, clamped SwiGLU, MTP blocks). Nothing here imports mlx_step35.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from factory import text_config

# ---------------------------------------------------------------------------------------------
# checkpoint reading (raw tensors, text keys normalised to the `model.` prefix)

SKIP_PREFIXES = ("vision_model.", "vit_large_projector.", "model.vision_model.")


def read_config(path) -> dict:
    return text_config(json.loads((Path(path) / "config.json").read_text()))


def read_tensors(path, *, keep_vision: bool = False) -> dict:
    """All tensors of a checkpoint as float32 torch tensors; `model.language_model.` -> `model.`."""
    from safetensors.torch import load_file

    path = Path(path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        for k, v in load_file(str(path / shard)).items():
            if k.startswith(SKIP_PREFIXES) and not keep_vision:
                continue
            k = k.replace("model.language_model.", "model.", 1)
            out[k] = v.float()
    assert set(out) <= {k.replace("model.language_model.", "model.", 1) for k in index["weight_map"]}
    return out


def _layer_of(key: str) -> int | None:
    parts = key.split(".")
    if len(parts) > 2 and parts[0] == "model" and parts[1] == "layers":
        return int(parts[2])
    return None


# ---------------------------------------------------------------------------------------------
# HF transformers (step3p7)


def hf_text_config(cfg: dict):
    """Step3p7TextConfig from a Step-3.5 text dict.

    Step3p7TextConfig already splits the 48-entry arrays into trunk + `mtp_*`, accepts 45-entry
    arrays, pops rope_theta / partial_rotary_factors / rope_scaling into per-type
    `rope_parameters`, maps attention_other_setting to `num_sliding_attention_heads` and
    moe_layers_enum to `mlp_layer_types`. We only drop keys that are not config fields and force
    eager float32 (the stored `torch_dtype` is bf16).
    """
    from transformers.models.step3p7.configuration_step3p7 import Step3p7TextConfig

    cfg = {k: v for k, v in cfg.items() if k not in ("model_type", "architectures", "torch_dtype")}
    hf = Step3p7TextConfig(**cfg, dtype="float32")
    hf._attn_implementation = "eager"
    # HF reads the sliding layers' KV-head count from num_attention_groups (it ignores
    # attention_other_setting's num_attention_groups / head_dim): make sure they agree here.
    other = cfg.get("attention_other_setting") or {}
    assert other.get("num_attention_groups", cfg["num_attention_groups"]) == cfg["num_attention_groups"]
    assert other.get("head_dim", cfg["head_dim"]) == cfg["head_dim"]
    # HF always renormalises the top-k weights and applies llama3 only to full_attention layers.
    assert cfg.get("norm_expert_weight", True)
    assert cfg.get("yarn_only_types", ["full_attention"]) == ["full_attention"] or not cfg.get("rope_scaling")
    return hf


def hf_state_dict(tensors: dict, n_layers: int) -> tuple:
    """Checkpoint keys -> Step3p7TextModel keys. Returns (state, lm_head, used checkpoint keys)."""
    import torch

    state, used = {}, set()

    def take(src, dst):
        state[dst] = tensors[src]
        used.add(src)

    for k in tensors:
        layer = _layer_of(k)
        if layer is not None and layer >= n_layers:
            continue  # MTP layers: not part of the trunk
        if k in ("lm_head.weight",) or k in used:
            continue
        name = k[len("model.") :]
        if ".moe.gate_proj." in k or ".moe.up_proj." in k:
            p = k.rsplit(".moe.", 1)[0]
            g, u = f"{p}.moe.gate_proj.weight", f"{p}.moe.up_proj.weight"
            state[f"{p[len('model.') :]}.mlp.experts.gate_up_proj"] = torch.cat(
                [tensors[g], tensors[u]], dim=1
            )  # [E, 2I, H]: gate rows first, as Step3p7Experts._apply_gate chunks them
            used.update((g, u))
            continue
        for src, dst in (
            (".moe.gate.weight", ".mlp.gate.weight"),
            (".moe.router_bias", ".mlp.gate.e_score_correction_bias"),
            (".moe.down_proj.weight", ".mlp.experts.down_proj"),
            (".share_expert.", ".mlp.shared_experts."),
        ):
            if src in name:
                name = name.replace(src, dst)
                break
        take(k, name)
    used.add("lm_head.weight")
    return state, tensors.get("lm_head.weight"), used


@dataclass
class HFTrunk:
    model: object  # Step3p7TextModel
    lm_head: object  # torch [V, H]
    config: dict

    def _run(self, tokens):
        import torch

        captured = {}
        hook = self.model.layers[-1].register_forward_hook(
            lambda mod, args, out: captured.__setitem__("h", out[0] if isinstance(out, tuple) else out)
        )
        try:
            with torch.no_grad():
                ids = torch.as_tensor(np.asarray(tokens), dtype=torch.long)[None]
                out = self.model(input_ids=ids, use_cache=False).last_hidden_state
        finally:
            hook.remove()
        return out[0], captured["h"][0]

    def logits(self, tokens) -> np.ndarray:
        """[L, V] float32 logits: lm_head on the final-normed output."""
        out, _ = self._run(tokens)
        return (out @ self.lm_head.T).numpy()

    def hidden_prenorm(self, tokens) -> np.ndarray:
        """[L, H] output of the last decoder layer, before model.norm."""
        return self._run(tokens)[1].numpy()


def hf_trunk(path) -> HFTrunk:
    from transformers.models.step3p7.modeling_step3p7 import Step3p7TextModel

    cfg = read_config(path)
    model = Step3p7TextModel(hf_text_config(cfg)).float().eval()
    tensors = read_tensors(path)
    n_layers = cfg["num_hidden_layers"]
    state, lm_head, used = hf_state_dict(tensors, n_layers)
    trunk_keys = {k for k in tensors if (_layer_of(k) is None or _layer_of(k) < n_layers)}
    assert used == trunk_keys, f"unused trunk keys: {sorted(trunk_keys - used)}"
    expected = set(model.state_dict())
    assert set(state) == expected, (sorted(expected - set(state)), sorted(set(state) - expected))
    for k, v in model.state_dict().items():
        assert v.shape == state[k].shape, (k, v.shape, state[k].shape)
    # Norm weights are loaded raw: Step3p7RMSNorm applies 1 + w itself.
    model.load_state_dict(state, strict=True)
    return HFTrunk(model=model, lm_head=lm_head, config=cfg)


# ---------------------------------------------------------------------------------------------
# mlx-lm (models/step3p5.py)


@dataclass
class MlxLmTrunk:
    model: object

    def logits(self, tokens) -> np.ndarray:
        import mlx.core as mx

        out = self.model(mx.array(np.asarray(tokens))[None])
        return np.array(out[0].astype(mx.float32))


def mlx_lm_trunk(path) -> MlxLmTrunk:
    """mlx-lm's Step-3.5 trunk in float32, loaded through its own sanitize (which adds +1 to norms
    and drops the MTP layers). mlx-lm has no step3p7 support: we hand it the text config and
    strip the `model.language_model.` prefix / vision tensors ourselves."""
    import mlx.core as mx
    from mlx_lm.models.step3p5 import Model, ModelArgs

    cfg = read_config(path)
    model = Model(ModelArgs.from_dict({**cfg, "model_type": "step3p5"}))
    weights = {k: mx.array(v.numpy()) for k, v in read_tensors(path).items()}
    weights = model.sanitize(weights)
    model.load_weights(list(weights.items()), strict=True)
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    return MlxLmTrunk(model=model)


# ---------------------------------------------------------------------------------------------
# numpy (float64), from the facts sheet


def _np(tensors: dict) -> dict:
    return {k: v.double().numpy() for k, v in tensors.items()}


def rms_norm(x, w, eps):
    """Zero-centred RMSNorm: stored w, applied as 1 + w."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * (1.0 + w)


def silu(x):
    return x / (1.0 + np.exp(-x))


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def swiglu(gate, up, limit):
    """`min(silu(gate), L) * clip(up, -L, L)`; limit 0 means no clamp."""
    a = silu(gate)
    if limit:
        a = np.minimum(a, limit)
        up = np.clip(up, -limit, limit)
    return a * up


def llama3_inv_freq(inv_freq, scaling):
    """Llama-3.1 frequency scaling (Meta's reference formula)."""
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old = scaling["original_max_position_embeddings"]
    wavelen = 2 * np.pi / inv_freq
    out = []
    for f, wl in zip(inv_freq, wavelen):
        if wl < old / high:
            out.append(f)
        elif wl > old / low:
            out.append(f / factor)
        else:
            s = (old / wl - low) / (high - low)
            out.append((1 - s) * f / factor + s * f)
    return np.array(out)


def rope(x, positions, theta, rot_dims, scaling=None):
    """Non-interleaved (rotate-half) RoPE on the first rot_dims dims. x: [L, heads, D]."""
    inv = 1.0 / theta ** (np.arange(0, rot_dims, 2, dtype=np.float64) / rot_dims)
    if scaling is not None:
        inv = llama3_inv_freq(inv, scaling)
    ang = np.asarray(positions, np.float64)[:, None] * inv[None]  # [L, rot/2]
    cos = np.concatenate([np.cos(ang)] * 2, -1)[:, None]  # [L, 1, rot]
    sin = np.concatenate([np.sin(ang)] * 2, -1)[:, None]
    xr, xp = x[..., :rot_dims], x[..., rot_dims:]
    half = rot_dims // 2
    rotated = np.concatenate([-xr[..., half:], xr[..., :half]], -1)
    return np.concatenate([xr * cos + rotated * sin, xp], -1)


@dataclass
class LayerSpec:
    sliding: bool
    heads: int
    kv_heads: int
    theta: float
    partial: float
    rope_scaling: dict | None
    moe: bool
    limit: float  # routed experts
    limit_shared: float  # shared expert, or the dense MLP


def layer_spec(cfg: dict, i: int) -> LayerSpec:
    """Settings of layer i, MTP layers included: per-layer arrays when they cover i, else the
    i % 4 pattern with values taken from an existing layer of the same type."""
    types = cfg.get("layer_types")
    if types and i < len(types):
        kind = types[i]
    else:
        kind = "full_attention" if i % 4 == 0 else "sliding_attention"
    sliding = kind == "sliding_attention"
    # an index of an existing layer with this type, for arrays that do not reach i
    donor = next(j for j in range(len(types or [])) if types[j] == kind) if types else i

    def per_layer(field, default):
        v = cfg.get(field, default)
        if not isinstance(v, list):
            return v
        return v[i] if i < len(v) else v[donor]

    def limit(field):
        v = cfg.get(field) or []
        return (v[i] or 0.0) if i < len(v) else 0.0

    other = cfg.get("attention_other_setting") or {}
    if sliding and other:
        heads, kv = other["num_attention_heads"], other["num_attention_groups"]
    else:
        heads, kv = cfg["num_attention_heads"], cfg["num_attention_groups"]
    yarn_types = cfg.get("yarn_only_types")
    scaled = cfg.get("rope_scaling") and (not yarn_types or kind in yarn_types)
    moe = {int(s) for s in str(cfg.get("moe_layers_enum", "")).split(",") if s.strip()}
    return LayerSpec(
        sliding=sliding,
        heads=heads,
        kv_heads=kv,
        theta=float(per_layer("rope_theta", 10000.0)),
        partial=float(per_layer("partial_rotary_factors", 1.0)),
        rope_scaling=cfg["rope_scaling"] if scaled else None,
        moe=i in moe and i < cfg["num_hidden_layers"],
        limit=limit("swiglu_limits"),
        limit_shared=limit("swiglu_limits_shared"),
    )


def attention(w, p, spec: LayerSpec, cfg, x, positions):
    """x: [L, H] (already input-normed). Causal; sliding layers see the last `sliding_window`
    positions including their own."""
    L, D, eps = x.shape[0], cfg["head_dim"], cfg["rms_norm_eps"]
    q = (x @ w[f"{p}.q_proj.weight"].T).reshape(L, spec.heads, D)
    k = (x @ w[f"{p}.k_proj.weight"].T).reshape(L, spec.kv_heads, D)
    v = (x @ w[f"{p}.v_proj.weight"].T).reshape(L, spec.kv_heads, D)
    q = rms_norm(q, w[f"{p}.q_norm.weight"], eps)
    k = rms_norm(k, w[f"{p}.k_norm.weight"], eps)
    rot = int(D * spec.partial)
    q = rope(q, positions, spec.theta, rot, spec.rope_scaling)
    k = rope(k, positions, spec.theta, rot, spec.rope_scaling)
    rep = spec.heads // spec.kv_heads
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)  # head h uses kv head h // rep
    scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(D)
    qi, ki = np.arange(L)[:, None], np.arange(L)[None]
    allowed = ki <= qi
    if spec.sliding:
        allowed &= ki > qi - cfg["sliding_window"]
    scores = np.where(allowed[None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("hqk,khd->qhd", probs, v)  # [L, heads, D]
    gate = sigmoid(x @ w[f"{p}.g_proj.weight"].T)  # [L, heads]: one gate per head
    out = out * gate[..., None]
    return out.reshape(L, -1) @ w[f"{p}.o_proj.weight"].T


def dense_mlp(w, p, x, limit):
    g, u = x @ w[f"{p}.gate_proj.weight"].T, x @ w[f"{p}.up_proj.weight"].T
    return swiglu(g, u, limit) @ w[f"{p}.down_proj.weight"].T


def moe(w, p, spec: LayerSpec, cfg, x):
    scores = sigmoid(x @ w[f"{p}.moe.gate.weight"].T)  # [L, E]
    choice = scores + w[f"{p}.moe.router_bias"]  # bias only picks the experts
    top = np.argsort(-choice, axis=-1, kind="stable")[:, : cfg["moe_top_k"]]  # [L, k]
    weights = np.take_along_axis(scores, top, -1)
    if cfg.get("norm_expert_weight", True):
        weights = weights / weights.sum(-1, keepdims=True)
    weights = weights * cfg.get("moe_router_scaling_factor", 1.0)
    G, U, Dn = (w[f"{p}.moe.{n}_proj.weight"] for n in ("gate", "up", "down"))
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for e, wt in zip(top[t], weights[t]):
            out[t] += wt * (Dn[e] @ swiglu(G[e] @ x[t], U[e] @ x[t], spec.limit))
    return out + dense_mlp(w, f"{p}.share_expert", x, spec.limit_shared)


def decoder_layer(w, cfg, i, x, positions):
    """One Step-3.5 decoder layer (trunk or MTP block) on x: [L, H]."""
    spec, p, eps = layer_spec(cfg, i), f"model.layers.{i}", cfg["rms_norm_eps"]
    y = rms_norm(x, w[f"{p}.input_layernorm.weight"], eps)
    h = x + attention(w, f"{p}.self_attn", spec, cfg, y, positions)
    y = rms_norm(h, w[f"{p}.post_attention_layernorm.weight"], eps)
    if spec.moe:
        return h + moe(w, p, spec, cfg, y)
    return h + dense_mlp(w, f"{p}.mlp", y, spec.limit_shared)


@dataclass
class NumpyTrunk:
    w: dict
    config: dict

    def hidden_prenorm(self, tokens) -> np.ndarray:
        tokens = np.asarray(tokens)
        h = self.w["model.embed_tokens.weight"][tokens]
        for i in range(self.config["num_hidden_layers"]):
            h = decoder_layer(self.w, self.config, i, h, np.arange(len(tokens)))
        return h

    def logits(self, tokens) -> np.ndarray:
        h = rms_norm(self.hidden_prenorm(tokens), self.w["model.norm.weight"], self.config["rms_norm_eps"])
        return h @ self.w["lm_head.weight"].T


def numpy_trunk(path) -> NumpyTrunk:
    return NumpyTrunk(w=_np(read_tensors(path)), config=read_config(path))


def mtp_blocks(w, cfg, tokens, h0) -> list[np.ndarray]:
    """Logits of the MTP blocks, element k-1 of shape [L-k, V], from trunk hidden h0 [L, H]
    (before the final norm). Block k at position t reads x_{t+k} and h_{k-1,t}; its attention is
    over its own positions with RoPE position t+k."""
    tokens, eps = np.asarray(tokens), cfg["rms_norm_eps"]
    L, n = len(tokens), cfg["num_hidden_layers"]
    h, out = np.asarray(h0, np.float64), []
    for k in range(1, cfg["num_nextn_predict_layers"] + 1):
        p = f"model.layers.{n - 1 + k}"
        e = rms_norm(w["model.embed_tokens.weight"][tokens[k:]], w[f"{p}.enorm.weight"], eps)
        hh = rms_norm(h[: L - k], w[f"{p}.hnorm.weight"], eps)
        u = np.concatenate([e, hh], -1) @ w[f"{p}.eh_proj.weight"].T  # embedding first
        h = decoder_layer(w, cfg, n - 1 + k, u, np.arange(L - k) + k)
        y = rms_norm(h, w[f"{p}.transformer.shared_head.norm.weight"], eps)
        out.append(y @ w[f"{p}.transformer.shared_head.output.weight"].T)
    return out


def mtp_reference(path, tokens, h0=None) -> list[np.ndarray]:
    """MTP logits of all blocks; h0 defaults to the HF trunk's pre-norm hidden states."""
    if h0 is None:
        h0 = hf_trunk(path).hidden_prenorm(tokens)
    return mtp_blocks(_np(read_tensors(path)), read_config(path), tokens, h0)


def hf_decoder_layer(path, i):
    """HF's Step3p7DecoderLayer for checkpoint layer i (MTP layers included), as a function
    (x [L, H], positions [L]) -> [L, H] with causal (sliding where the layer is) attention.
    Used to cross-check `decoder_layer` on the MTP blocks' weights. Needs per-layer arrays that
    cover layer i (the 48-entry layout)."""
    import torch
    from transformers.models.step3p7.modeling_step3p7 import (
        Step3p7DecoderLayer,
        Step3p7RotaryEmbedding,
    )

    cfg = read_config(path)
    n_all = cfg["num_hidden_layers"] + cfg["num_nextn_predict_layers"]
    assert len(cfg["layer_types"]) == n_all, "needs per-layer arrays that cover the MTP layers"
    # Pretend every layer is a trunk layer so HF builds layer i with its own settings.
    hf = hf_text_config({**cfg, "num_hidden_layers": n_all, "num_nextn_predict_layers": 0})
    layer = Step3p7DecoderLayer(hf, i).float().eval()
    rotary = Step3p7RotaryEmbedding(hf)
    tensors = read_tensors(path)
    prefix = f"model.layers.{i}."
    state, _, used = hf_state_dict({k: v for k, v in tensors.items() if k.startswith(prefix)}, n_all)
    state = {k[len(f"layers.{i}.") :]: v for k, v in state.items() if k.startswith(f"layers.{i}.")}
    mtp_only = {"enorm.weight", "hnorm.weight", "eh_proj.weight"}
    state = {k: v for k, v in state.items() if k not in mtp_only and not k.startswith("transformer.")}
    layer.load_state_dict(state, strict=True)
    kind = hf.layer_types[i]

    def run(x, positions):
        L = x.shape[0]
        q, k = np.arange(L)[:, None], np.arange(L)[None]
        allowed = k <= q
        if kind == "sliding_attention":
            allowed &= k > q - cfg["sliding_window"]
        mask = torch.where(torch.as_tensor(allowed), 0.0, float("-inf"))[None, None]
        with torch.no_grad():
            xt = torch.as_tensor(np.asarray(x), dtype=torch.float32)[None]
            pos = torch.as_tensor(np.asarray(positions), dtype=torch.long)[None]
            pe = rotary(xt, pos, kind)
            out = layer(xt, attention_mask=mask, position_ids=pos, position_embeddings=pe)
        return (out[0] if isinstance(out, tuple) else out)[0].numpy()

    return run
