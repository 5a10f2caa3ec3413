"""Quantized full-attention KV (kv_bits): attention equals a hand-written dequantized
reference, drafting stays lossless against the quantized trunk (greedy and sampled), prompt
caches, files and the server's store keep the quantized form, and first-token accuracy is
no worse than mlx-lm's own QuantizedKVCache on the same layers."""

import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from factory import make_checkpoint, make_config
from spec_models import successor_model
from test_speculative import assert_same_distribution

import generate as generate_cli  # the script at the repository root (conftest)
from mlx_step35 import load, make_sampler
from mlx_step35.cache import FullKVCache, KVQuant, attention
from mlx_step35.config import parse_config
from mlx_step35.follow import request_kwargs
from mlx_step35.generation import generate_step
from mlx_step35.memory import kv_bytes
from mlx_step35.model import Model
from mlx_step35.prompt_cache import PromptCacheStore, load_prompt_cache, make_prompt_cache, save_prompt_cache
from mlx_step35.speculative import SpecStats

ROOT = Path(__file__).resolve().parents[1]
HEAD_DIM = 64  # a multiple of mlx-lm's default kv_group_size
WINDOW = 8
WIDE = dict(head_dim=HEAD_DIM, attention_other_setting={"num_attention_heads": 6, "num_attention_groups": 2})
PROMPT = [int(t) for t in np.random.default_rng(7).integers(3, 500, 20)]
GEN = 40


def tokens_of(model, prompt, **kw):
    return [t for t, _, _ in generate_step(model, prompt, **kw)]


def run(model, prompt, **kw):
    """(tokens, first-token logprobs as numpy)."""
    out, first = [], None
    for tok, lp, _ in generate_step(model, prompt, **kw):
        out.append(tok)
        first = np.array(lp) if first is None else first
    return out, first


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = dict(WIDE)
    cfg["attention_other_setting"] = {**cfg["attention_other_setting"], "head_dim": HEAD_DIM}
    return make_checkpoint(tmp_path_factory.mktemp("kvq"), sliding_window=WINDOW, **cfg)


@pytest.fixture(scope="module")
def random_model(ckpt):
    return load(ckpt, quantize=False, dtype="float32")[0]


@pytest.fixture(scope="module")
def mixed(ckpt):
    """Drafts partly accepted (see spec_models)."""
    return successor_model(ckpt, eps=2.5)[0]


# ---- the cache and its attention --------------------------------------------------------


def reference_attention(q, ks, vs, start, quant, scale):
    """numpy float64: keys/values at positions >= start replaced by dequantize(quantize(x)),
    then causal softmax attention with GQA; q [B, H, L, D] for the last L positions."""

    def deq(x):
        if x.shape[2] == 0:
            return x
        w, s, b = mx.quantize(x, group_size=quant.group_size, bits=quant.bits)
        s, b = s.astype(mx.float32), b.astype(mx.float32)  # exact: no bf16 rounding of the values
        return mx.dequantize(w, s, b, group_size=quant.group_size, bits=quant.bits)

    def f64(x):
        return np.array(x.astype(mx.float32), dtype=np.float64)

    k = f64(mx.concatenate([ks[:, :, :start], deq(ks[:, :, start:])], axis=2))
    v = f64(mx.concatenate([vs[:, :, :start], deq(vs[:, :, start:])], axis=2))
    q = f64(q)
    rep = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    n, L = k.shape[2], q.shape[2]
    s = q @ k.swapaxes(-1, -2) * scale
    s = np.where(np.arange(n)[None] <= np.arange(n - L, n)[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("start", [0, 5, 11])
def test_attention_equals_dequantized_reference(bits, start):
    """Passes of 3, 1, 4, 6, 1 tokens (crossing the start inside a pass), a rewind of 5 back
    below the start and a rewrite: each pass's output equals the reference."""
    quant = KVQuant(bits, 32, start)
    mx.random.seed(bits + start)
    B, H, KV, D = 1, 4, 2, 64
    cache = FullKVCache(quant)
    ks = vs = None
    for n, back in ((3, 0), (1, 0), (4, 0), (6, 5), (1, 0), (5, 0)):
        if back:
            cache.trim(back)
            ks, vs = ks[:, :, :-back], vs[:, :, :-back]
        k, v, q = (
            mx.random.normal((B, KV, n, D)),
            mx.random.normal((B, KV, n, D)),
            mx.random.normal((B, H, n, D)),
        )
        ks = k if ks is None else mx.concatenate([ks, k], axis=2)
        vs = v if vs is None else mx.concatenate([vs, v], axis=2)
        got_k, got_v = cache.update_and_fetch(k, v)
        out = attention(q, got_k, got_v, D**-0.5, "causal" if n > 1 else None, quant)
        ref = reference_attention(q, ks, vs, start, quant, D**-0.5)
        assert np.abs(np.array(out) - ref).max() < 1e-5, (n, cache.offset)
        assert isinstance(got_k, tuple) == (cache.offset > start)
    assert cache.fp_len == min(cache.offset, start) and cache.q_len == cache.offset - cache.fp_len


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("start", [0, 600])
def test_bf16_attention_scores_are_not_rounded_to_bf16(bits, start):
    """bf16 queries, keys and values over 1,024 positions, scores of several units: the output
    is within bf16 rounding of a float64 reference over the same stored (dequantized) keys and
    values. Scores rounded to bf16, as mlx-lm's quantized attention leaves them, miss this by
    ~10x (max errors 0.04-0.14 measured); with a 16-bit prefix its scores still are (0.02)."""
    quant = KVQuant(bits, 32, start)
    B, H, KV, D, N = 1, 4, 2, 64, 1024
    for L in (1, 5):
        mx.random.seed(L)
        k = mx.random.normal((B, KV, N, D)).astype(mx.bfloat16)
        v = mx.random.normal((B, KV, N, D)).astype(mx.bfloat16)
        q = (3 * mx.random.normal((B, H, L, D))).astype(mx.bfloat16)
        got_k, got_v = FullKVCache(quant).update_and_fetch(k, v)
        out = attention(q, got_k, got_v, D**-0.5, "causal" if L > 1 else None, quant)
        assert out.dtype == mx.bfloat16
        ref = reference_attention(q, k, v, start, quant, D**-0.5)[:, :, -L:]
        err = np.abs(np.array(out.astype(mx.float32)) - ref).max()
        assert err < (0.01 if start == 0 else 0.035), (L, err)


def test_bad_settings_are_refused(random_model):
    for kw, what in ((dict(kv_bits=7), "kv_bits"), (dict(kv_bits=8, kv_group_size=48), "kv_group_size")):
        with pytest.raises(ValueError, match=what):
            tokens_of(random_model, PROMPT, max_tokens=1, **kw)
    with pytest.raises(ValueError, match="quantized_kv_start"):
        tokens_of(random_model, PROMPT, max_tokens=1, kv_bits=8, quantized_kv_start=-1)
    with pytest.raises(ValueError, match="does not divide head_dim"):
        tokens_of(random_model, PROMPT, max_tokens=1, kv_bits=8, kv_group_size=128)


# ---- drafting is lossless against the quantized trunk ------------------------------------


@pytest.mark.parametrize("bits,start", [(8, 0), (4, 0), (4, 13), (4, 30)])
def test_greedy_drafting_equals_plain_decoding_with_the_same_kv(mixed, bits, start):
    """start 13: the prompt's prefill crosses it, past the sliding window; 30: a verify pass
    crosses it while decoding. Depths 1-3 with partial acceptance, and auto."""
    kv = dict(kv_bits=bits, kv_group_size=64, quantized_kv_start=start)
    plain, first = run(mixed, PROMPT, max_tokens=GEN, **kv)
    _, first16 = run(mixed, PROMPT, max_tokens=1)
    if start < len(PROMPT):  # the quantized KV is really used
        assert np.abs(first - first16).max() > 1e-5
    for num_draft in (1, 2, 3, "auto"):
        stats = SpecStats()
        spec = tokens_of(
            mixed, PROMPT, max_tokens=GEN, draft_mtp=True, num_draft=num_draft, stats=stats, **kv
        )
        assert spec == plain, num_draft
        if num_draft != "auto":
            assert 0 < stats.accepted[0] < stats.drafted[0]


def test_sampling_with_quantized_kv_keeps_the_trunks_distribution():
    """As test_speculative's chi-square test (smaller: CPU time), with 4-bit KV from position
    2 on (the prompt is 5 tokens): tokens 2 and 3 of sampled generations, drafting vs plain
    (2 tests at alpha 1e-3). And each drafting step's trunk log-probabilities, which the
    acceptance rule (tested on its own in test_speculative) draws from, are exactly those of
    the quantized trunk run over the same tokens in one pass."""
    cfg = make_config(vocab_size=8, sliding_window=4, **WIDE)
    cfg["attention_other_setting"]["head_dim"] = HEAD_DIM
    cfg["eos_token_id"] = []
    mx.random.seed(0)
    model = Model(parse_config(cfg))
    model.update({"lm_head": {"weight": model.lm_head.weight * 6}})
    for block in model.mtp:
        block.shared_head.output.weight = block.shared_head.output.weight * 6
    mx.eval(model.parameters())
    sampler = make_sampler(temp=1.0, top_k=6)
    prompt, N, T = [1, 5, 3, 6, 2], 160, 3
    kv = dict(kv_bits=4, quantized_kv_start=2)
    runs = {}
    for draft in (False, True):
        mx.random.seed(123 if draft else 321)
        runs[draft] = np.array(
            [
                tokens_of(model, prompt, max_tokens=T, sampler=sampler, draft_mtp=draft, num_draft=3, **kv)
                for _ in range(N)
            ]
        )
    assert_same_distribution(runs[False], runs[True])
    out = list(
        generate_step(model, prompt, max_tokens=12, sampler=sampler, draft_mtp=True, num_draft=3, **kv)
    )
    toks = [t for t, _, _ in out]
    ref = model(mx.array([prompt + toks]), cache=model.make_cache(kv=KVQuant(4, 64, 2)))[
        0, len(prompt) - 1 : -1
    ]
    ref = ref - mx.logsumexp(ref, axis=-1, keepdims=True)
    assert sum(d for _, _, d in out) > 0  # some tokens came from accepted drafts
    assert np.abs(np.array(mx.stack([lp for _, lp, _ in out])) - np.array(ref)).max() < 1e-5


# ---- prompt caches, files and the store keep the quantized form --------------------------

KV = dict(kv_bits=8, kv_group_size=64, quantized_kv_start=16)


def test_prompt_cache_turns_and_branches_equal_cold_runs(mixed):
    """Turn 2 continues turn 1; then a branch restoring the checkpoint after the quantized
    start (26), then one before it (10: the quantized entries are rewound and rewritten):
    each equals a cold run with the same KV format."""
    base = PROMPT + [int(t) for t in np.random.default_rng(5).integers(3, 500, 14)]  # 34 tokens
    pc = make_prompt_cache(mixed, **KV)
    out1, _ = run(
        mixed, base, max_tokens=8, prompt_cache=pc, checkpoints=[10, 26], draft_mtp=True, num_draft=2, **KV
    )
    assert pc.cache[0].q_len > 0 and pc.cache[0].fp_len == 16
    out2, lp2 = run(mixed, [5, 6], max_tokens=8, prompt_cache=pc, draft_mtp=True, num_draft=3, **KV)
    cold2, cl2 = run(mixed, base + out1 + [5, 6], max_tokens=8, draft_mtp=True, num_draft=3, **KV)
    assert out2 == cold2 and np.abs(lp2 - cl2).max() < 1e-5
    for cut, cached in ((29, 26), (12, 10)):
        edited = base[:cut] + [9, 9, 9] + base[cut:]
        warm, wl = run(mixed, pc.continuation(edited), max_tokens=8, prompt_cache=pc, draft_mtp=True, **KV)
        assert pc.cached_tokens == cached
        cold, cl = run(mixed, edited, max_tokens=8, draft_mtp=True, **KV)
        assert warm == cold and np.abs(wl - cl).max() < 1e-5


def test_a_cache_of_another_kv_format_is_refused(random_model):
    pc = make_prompt_cache(random_model, **KV)
    run(random_model, PROMPT, max_tokens=2, prompt_cache=pc, **KV)
    with pytest.raises(ValueError, match="8-bit .* asks for 16-bit"):
        run(random_model, [5], max_tokens=2, prompt_cache=pc)


def file_after(model, tmp_path, name, **kv):
    pc = make_prompt_cache(model, **kv)
    out, _ = run(model, PROMPT * 3, max_tokens=4, prompt_cache=pc, draft_mtp=True, num_draft=2, **kv)
    f = tmp_path / name
    save_prompt_cache(f, pc)
    return f, out


@pytest.mark.parametrize("bits", [8, 4])
def test_files_keep_the_quantized_form_and_continue_exactly(random_model, tmp_path, bits):
    kv = dict(kv_bits=bits, quantized_kv_start=0)
    f16, _ = file_after(random_model, tmp_path, "16.safetensors")
    fq, out = file_after(random_model, tmp_path, "q.safetensors", **kv)
    loaded = load_prompt_cache(fq, random_model)
    full = [c for c in loaded.cache if isinstance(c, FullKVCache)]
    assert all(c.quant == KVQuant(bits, 64, 0) and c.q_len == len(loaded.tokens) for c in full)
    # only the full-attention KV shrinks (by 16 / (bits + 0.5)); sliding windows, MTP state stay
    kv16 = sum(c.nbytes for c in load_prompt_cache(f16, random_model).cache if isinstance(c, FullKVCache))
    kvq = sum(c.fp_len + c.q_len for c in full) * 2 * 2 * HEAD_DIM * (bits / 8 + 4 / 64)
    assert fq.stat().st_size < f16.stat().st_size - 0.9 * (kv16 - kvq)
    warm, wl = run(random_model, [8, 9], max_tokens=6, prompt_cache=loaded, draft_mtp=True, num_draft=2, **kv)
    cold, cl = run(random_model, PROMPT * 3 + out + [8, 9], max_tokens=6, draft_mtp=True, num_draft=2, **kv)
    assert warm == cold and np.abs(wl - cl).max() < 1e-5
    with pytest.raises(ValueError, match="asks for 16-bit"):
        run(random_model, [8], prompt_cache=load_prompt_cache(fq, random_model))


def test_store_on_disk_keeps_each_format_apart(random_model, tmp_path):
    prompt = PROMPT * 3 + [1, 2]
    q_store = PromptCacheStore(random_model, 1 << 30, directory=tmp_path, **KV)
    pc, cont = q_store.acquire(prompt)
    out, _ = run(random_model, cont, max_tokens=5, prompt_cache=pc, checkpoints=[40], **KV)
    q_store.release(pc)
    q_store.flush()  # (files are written by a background thread)
    files = set(tmp_path.glob("*.safetensors"))
    assert files
    # a 16-bit store on the same directory finds nothing of its format, and writes its own files
    plain = PromptCacheStore(random_model, 1 << 30, directory=tmp_path)
    pc, cont = plain.acquire(prompt + out + [3])
    assert pc.tokens == [] and len(cont) == len(prompt + out + [3])
    # a restarted quantized store reads its files back and continues exactly
    restarted = PromptCacheStore(random_model, 1 << 30, directory=tmp_path, **KV)
    pc, cont = restarted.acquire(prompt + out + [3])
    assert pc.cached_tokens == 0 and len(pc.tokens) >= 40 and pc.cache[0].q_len > 0
    warm, _ = run(random_model, cont, max_tokens=5, prompt_cache=pc, **KV)
    assert warm == run(random_model, prompt + out + [3], max_tokens=5, **KV)[0]


# ---- accuracy against mlx-lm's QuantizedKVCache ------------------------------------------


@pytest.mark.parametrize("bits", [8, 4])
def test_first_token_accuracy_no_worse_than_mlx_lm(ckpt, random_model, bits):
    """float32 weights, 240-token prompts (30 sliding windows), quantized from position 0:
    the first token's log-probabilities moved by quantizing the KV (max |d logprob| and KL
    to the 16-bit KV's) are no larger than when mlx-lm's own QuantizedKVCache replaces the
    KVCache on the same full-attention layers of mlx-lm's model with the same weights."""
    import reference as R
    from mlx_lm.models.cache import QuantizedKVCache

    theirs = R.mlx_lm_trunk(ckpt).model

    def mlx_lm_logprobs(prompt, quantized):
        cache = theirs.make_cache()
        if quantized:
            cache = [
                QuantizedKVCache(64, bits) if not layer.is_sliding else c
                for layer, c in zip(theirs.layers, cache)
            ]
        logits = theirs(mx.array([prompt]), cache=cache)[0, -1]
        return np.array(logits - mx.logsumexp(logits), dtype=np.float64)

    def ours(prompt, **kv):
        return run(random_model, prompt, max_tokens=1, prefill_step_size=64, **kv)[1].astype(np.float64)

    def moved(a, b):
        return np.abs(a - b).max(), float((np.exp(a) * (a - b)).sum())

    rng = np.random.default_rng(bits)
    for _ in range(2):
        prompt = [int(t) for t in rng.integers(3, 500, 240)]
        ref16 = mlx_lm_logprobs(prompt, False)
        ours16 = ours(prompt)
        assert np.abs(ours16 - ref16).max() < 1e-4  # the same model
        theirs_moved = moved(mlx_lm_logprobs(prompt, True), ref16)
        ours_moved = moved(ours(prompt, kv_bits=bits, quantized_kv_start=0), ours16)
        assert theirs_moved[0] > 1e-5  # quantizing changes something
        for o, t in zip(ours_moved, theirs_moved):
            assert o <= 1.05 * t + 1e-6, (ours_moved, theirs_moved)


# ---- memory pre-flight and the CLI --------------------------------------------------------


def test_kv_bytes_of_the_real_model_by_hand():
    """Step-3.5-Flash: 12 full-attention layers of 8 KV heads x 128 dims (facts sheet). 16-bit:
    48 KiB per token; 8-bit with groups of 64: 8 bits + a 16-bit scale and bias per 64 values."""
    args = parse_config(
        make_config(
            num_hidden_layers=45,
            hidden_size=4096,
            head_dim=128,
            num_attention_heads=64,
            num_attention_groups=8,
            attention_other_setting={"num_attention_heads": 96, "num_attention_groups": 8, "head_dim": 128},
            sliding_window=512,
        )
    )
    per16 = 12 * 2 * 8 * 128 * 2
    assert per16 == 48 * 1024
    ctx = 32768
    sliding = 33 * 2 * 8 * 128 * 2 * (511 + 4)
    assert kv_bytes(args, ctx, draft=False) == (per16 * ctx + sliding, per16)
    for bits in (8, 4):
        perq = 12 * 2 * 8 * 128 * (bits / 8 + 4 / 64)
        start = 5120  # a multiple of the allocation step
        got = kv_bytes(args, ctx, draft=False, kv=KVQuant(bits, 64, start))
        assert got == (per16 * start + perq * (ctx - start) + sliding, perq)


def test_cli_flags(ckpt, capsys):
    """The real script with the flags; the refusal calls the same main() in-process."""
    args = [
        "--model",
        str(ckpt),
        "--max-tokens",
        "4",
        "--prompt",
        "hi",
    ]
    cmd = [sys.executable, str(ROOT / "generate.py"), *args]
    r = subprocess.run(
        cmd + ["--kv-bits", "4", "--quantized-kv-start", "0", "--draft-mtp"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "Generation: 4 tokens" in r.stdout
    for bad in (["--kv-bits", "7", "--quantized-kv-start", "-3"],):
        with pytest.raises(SystemExit) as e:
            generate_cli.main(args + bad)
        err = capsys.readouterr().err
        assert e.value.code == 2 and "Traceback" not in err and bad[0] in err, err


def test_tensor_parallel_requests_carry_the_kv_format():
    """Rank 0 shares each request with the KV settings (the server's Engine adds them); every
    rank builds the same generate_step call, and its caches then hold its own KV heads,
    quantized alike (mx.quantize groups run along head_dim, so a head never straddles ranks)."""
    shared = {"prompt": [1, 2], "max_tokens": 3, "kv_bits": 4, "kv_group_size": 64, "quantized_kv_start": 0}
    kw = request_kwargs(shared)
    assert (kw["kv_bits"], kw["kv_group_size"], kw["quantized_kv_start"]) == (4, 64, 0)
    assert "kv_bits" not in request_kwargs({"prompt": [1], "max_tokens": 1})


def test_server_flags():
    from mlx_step35.cli import kv_arguments
    from mlx_step35.server import parser

    a = parser().parse_args(["--kv-bits", "8", "--quantized-kv-start", "100"])
    assert kv_arguments(a) == dict(kv_bits=8, kv_group_size=64, quantized_kv_start=100)
