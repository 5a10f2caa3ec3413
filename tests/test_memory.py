"""Mac memory hygiene, tested by standing in for Metal: `mx.device_info`, `mx.set_wired_limit`
and `mx.clear_cache` answer (and count) the way a Mac does. The pre-flight's numbers for the
real model are checked against byte counts written here from the facts sheet."""

import json
import math
import sys
import threading
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from mlx_step35 import convert, load, stream_generate
from mlx_step35 import generation as gen_mod
from mlx_step35.conversion import working_memory
from mlx_step35.generation import generate_step
from mlx_step35.loading import preflight
from mlx_step35.memory import Device, InsufficientMemoryError, MemoryWarning, wired_limit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import convert as convert_cli  # noqa: E402
import generate as generate_cli  # noqa: E402

GIB = 1 << 30
PROMPT = [5, 9, 17, 3, 12, 40, 7, 8, 21, 30, 2]


class FakeMac:
    """What MLX on a Mac answers: memory, the recommended working set, the wired limit."""

    def __init__(self, memory=128 * GIB, recommended=96 * GIB):
        self.memory, self.recommended = memory, recommended
        self.limit = 0  # 0: macOS's default
        self.limits = []  # every value set
        self.clears = 0

    def device_info(self):
        return {
            "architecture": "applegpu_g16s",
            "device_name": "Apple M4 Max",
            "memory_size": self.memory,
            "max_recommended_working_set_size": self.recommended,
        }

    def set_wired_limit(self, n):
        old, self.limit = self.limit, n
        self.limits.append(n)
        return old

    def clear_cache(self):
        self.clears += 1


@pytest.fixture
def mac(monkeypatch):
    fake = FakeMac()
    for name in ("device_info", "set_wired_limit", "clear_cache"):
        monkeypatch.setattr(mx, name, getattr(fake, name))
    return fake


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return load(tiny_ckpt, quantize=False, dtype="float32")


# ---------------------------------------------------------------------------------------------
# Wired limit


@pytest.mark.parametrize("draft", [False, True])
def test_wired_limit_raised_while_generating_and_restored(mac, model, draft):
    seen = [mac.limit for _ in generate_step(model[0], PROMPT, max_tokens=6, draft_mtp=draft, num_draft=2)]
    assert seen == [mac.recommended] * 6
    assert mac.limit == 0 and mac.limits == [mac.recommended, 0]


def test_wired_limit_restored_when_generation_is_closed_early(mac, model):
    gen = generate_step(model[0], PROMPT, max_tokens=50, draft_mtp=True, num_draft=3)
    next(gen), next(gen)
    assert mac.limit == mac.recommended
    gen.close()
    assert mac.limit == 0
    stream = stream_generate(*model, PROMPT, 40, draft_mtp=True)
    next(stream)
    assert mac.limit == mac.recommended
    stream.close()
    assert mac.limit == 0


def test_wired_limit_restored_when_generation_raises(mac, model):
    calls = []

    def failing(tokens, logits):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return logits

    with pytest.raises(RuntimeError, match="boom"):
        list(generate_step(model[0], PROMPT, max_tokens=10, logits_processors=[failing]))
    assert mac.limit == 0 and mac.limits == [mac.recommended, 0]


def test_wired_limit_held_by_a_server_across_generations_and_threads(mac, model):
    with wired_limit(model[0]):  # a server holds it for its whole life
        assert mac.limit == mac.recommended
        threads = [
            threading.Thread(target=lambda: list(generate_step(model[0], PROMPT, max_tokens=5)))
            for _ in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        list(generate_step(model[0], PROMPT, max_tokens=3))
        assert mac.limit == mac.recommended  # not restored by a generation ending inside
    assert mac.limit == 0 and mac.limits == [mac.recommended, 0]


def test_wired_limit_warns_when_model_is_close_to_the_working_set(mac, model):
    mac.recommended = 1000  # bytes: far below the tiny model
    with pytest.warns(MemoryWarning, match=r"sudo sysctl iogpu\.wired_limit_mb="):
        with wired_limit(model[0]):
            pass


def test_cpu_backend_leaves_the_wired_limit_alone(monkeypatch, model):
    limits = []
    monkeypatch.setattr(mx, "device_info", lambda: {"architecture": "x86_64", "device_name": "cpu"})
    monkeypatch.setattr(mx, "set_wired_limit", lambda n: limits.append(n) or 0)
    assert len(list(generate_step(model[0], PROMPT, max_tokens=4))) == 4
    assert limits == []


# ---------------------------------------------------------------------------------------------
# Buffer cache


@pytest.mark.parametrize("draft", [False, True])
def test_long_prefill_clears_the_cache_between_chunks(mac, model, draft):
    prompt = (PROMPT * 4)[:40]
    gen = generate_step(model[0], prompt, max_tokens=2, prefill_step_size=8, draft_mtp=draft, num_draft=1)
    next(gen)
    # Without a drafter the last prompt token is left for the first step (39 tokens: 5 chunks).
    assert mac.clears == math.ceil((40 if draft else 39) / 8)
    gen.close()


@pytest.mark.parametrize("num_draft", [None, 3, "auto"])
def test_decoding_clears_the_cache_every_few_hundred_tokens(mac, model, monkeypatch, num_draft):
    monkeypatch.setattr(gen_mod, "DECODE_CLEAR_EVERY", 16)
    assert gen_mod.DECODE_CLEAR_EVERY < 256 < 1000  # mlx-lm clears every 256 decoded tokens
    kw = dict(draft_mtp=True, num_draft=num_draft) if num_draft else {}
    counts = []
    for _ in generate_step(model[0], PROMPT, max_tokens=50, prefill_step_size=64, **kw):
        counts.append(mac.clears)
    prefill = counts[0]
    assert prefill == 1  # one chunk
    # After the 16th, 32nd and 48th token.
    assert [c - prefill for c in counts] == [0] * 16 + [1] * 16 + [2] * 16 + [3] * 2


# ---------------------------------------------------------------------------------------------
# Pre-flight of the real model (config and key list written from STEP35_FACTS.md)

H, V, HD, N, NEXTN = 4096, 128896, 128, 45, 3


def real_config():
    return {
        "model_type": "step3p5",
        "hidden_size": H,
        "head_dim": HD,
        "vocab_size": V,
        "num_hidden_layers": N,
        "num_nextn_predict_layers": NEXTN,
        "intermediate_size": 11264,
        "num_attention_heads": 64,
        "num_attention_groups": 8,
        "sliding_window": 512,
        "attention_other_setting": {"num_attention_heads": 96, "num_attention_groups": 8, "head_dim": 128},
        "layer_types": ["full_attention" if i % 4 == 0 else "sliding_attention" for i in range(N + NEXTN)],
        "moe_layers_enum": ",".join(str(i) for i in range(3, N)),
        "moe_num_experts": 288,
        "moe_top_k": 8,
        "moe_intermediate_size": 1280,
        "share_expert_dim": 1280,
        "rms_norm_eps": 1e-5,
        "eos_token_id": [1, 2, 128007],
    }


def real_tensors():
    """Every checkpoint key of the real model with its shape (facts sheet)."""
    t = {"model.embed_tokens.weight": [V, H], "model.norm.weight": [H], "lm_head.weight": [V, H]}
    for i in range(N + NEXTN):
        p = f"model.layers.{i}."
        heads = 64 if i % 4 == 0 else 96
        t[p + "input_layernorm.weight"] = t[p + "post_attention_layernorm.weight"] = [H]
        t[p + "self_attn.q_proj.weight"] = [heads * HD, H]
        t[p + "self_attn.k_proj.weight"] = t[p + "self_attn.v_proj.weight"] = [8 * HD, H]
        t[p + "self_attn.o_proj.weight"] = [H, heads * HD]
        t[p + "self_attn.g_proj.weight"] = [heads, H]
        t[p + "self_attn.q_norm.weight"] = t[p + "self_attn.k_norm.weight"] = [HD]
        if 3 <= i < N:
            t[p + "moe.gate.weight"], t[p + "moe.router_bias"] = [288, H], [288]
            t[p + "moe.gate_proj.weight"] = t[p + "moe.up_proj.weight"] = [288, 1280, H]
            t[p + "moe.down_proj.weight"] = [288, H, 1280]
            t[p + "share_expert.gate_proj.weight"] = t[p + "share_expert.up_proj.weight"] = [1280, H]
            t[p + "share_expert.down_proj.weight"] = [H, 1280]
        else:
            t[p + "mlp.gate_proj.weight"] = t[p + "mlp.up_proj.weight"] = [11264, H]
            t[p + "mlp.down_proj.weight"] = [H, 11264]
        if i >= N:
            t[p + "enorm.weight"] = t[p + "hnorm.weight"] = [H]
            t[p + "eh_proj.weight"] = [H, 2 * H]
            t[p + "transformer.shared_head.norm.weight"] = [H]
            t[p + "transformer.shared_head.output.weight"] = [V, H]
    return t


@pytest.fixture(scope="module")
def real_index(tmp_path_factory):
    """The real checkpoint's config, index and shard headers; the shards' data are holes
    (sparse files of the right size: nothing is written or read)."""
    path = tmp_path_factory.mktemp("real")
    (path / "config.json").write_text(json.dumps(real_config()))
    tensors = real_tensors()
    weight_map = {}
    for j, layer in enumerate([None, *range(N + NEXTN)]):  # one shard per layer, the rest first
        prefix = "model.layers." if layer is None else f"model.layers.{layer}."
        keys = [k for k in tensors if k.startswith(prefix) == (layer is not None)]
        name = f"model-{j + 1:05d}-of-{N + NEXTN + 1:05d}.safetensors"
        header, offset = {}, 0
        for k in keys:
            size = math.prod(tensors[k]) * (4 if k.endswith("router_bias") else 2)
            dtype = "F32" if k.endswith("router_bias") else "BF16"
            header[k] = {"dtype": dtype, "shape": tensors[k], "data_offsets": [offset, offset + size]}
            offset += size
            weight_map[k] = name
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(path / name, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            f.truncate(8 + len(raw) + offset)
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return path


def q(rows, cols, bits):
    """A quantized matrix: packed bits, and a bf16 scale and bias per group of 64 inputs."""
    return rows * cols * bits // 8 + 2 * 2 * (rows * cols // 64)


def expected_weights(b):
    """Bytes of the real model with its MTP blocks under the default recipe at `b` bits:
    router 8-bit, embedding/lm_head/MTP heads 6-bit, norms bf16, router bias fp32."""

    def attention(i):
        heads = 64 if i % 4 == 0 else 96
        return q(heads * HD, H, b) + 2 * q(8 * HD, H, b) + q(H, heads * HD, b) + q(heads, H, b) + 2 * HD * 2

    dense = 3 * q(11264, H, b)
    moe = q(288, H, 8) + 288 * 4 + 3 * 288 * q(1280, H, b) + 3 * q(1280, H, b)
    total = 2 * q(V, H, 6) + H * 2
    for i in range(N):
        total += attention(i) + 2 * H * 2 + (moe if i >= 3 else dense)
    mtp = NEXTN * (attention(1) + 2 * H * 2 + dense + 3 * H * 2 + q(H, 2 * H, b) + q(V, H, 6))
    return total + mtp, mtp


def expected_kv(context, draft):
    """bf16 K and V, 8 KV heads of 128: full layers (12) hold the context (allocated in steps of
    256 as mlx-lm's KVCache does), sliding ones (33, +3 MTP blocks when drafting) the window
    of 512 plus 3 rewindable tokens."""
    per_layer_token = 2 * 8 * HD * 2
    full = math.ceil(context / 256) * 256
    sliding = 33 + (3 if draft else 0)
    return per_layer_token * (12 * full + sliding * min(full, 511 + 4))


def macos(memory_gib):
    memory = memory_gib * GIB
    return Device(memory, memory * 3 // 4)


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("memory_gib", [64, 128, 192])
def test_preflight_of_the_real_model(real_index, bits, memory_gib):
    context = 32768
    r = preflight(real_index, q_bits=bits, context=context, device=macos(memory_gib))
    weights, mtp = expected_weights(bits)
    assert (r.needs.weights, r.needs.mtp) == (weights, mtp)
    assert r.needs.kv_cache == expected_kv(context, draft=True)
    need = weights + expected_kv(context, True) + 4 * GIB  # 4 GiB headroom for the big model
    assert r.needs.total == need
    memory, rec = memory_gib * GIB, memory_gib * GIB * 3 // 4
    if need <= rec:
        assert r.verdict == "fits" and r.fixes == []
    elif need - 4 * GIB > memory:
        assert r.verdict == "cannot-fit" and r.refuse and "cannot fit" in r.text()
    elif need <= memory - 8 * GIB:
        assert r.verdict == "raise-wired-limit"
        assert r.fixes[0] == f"sudo sysctl iogpu.wired_limit_mb={math.ceil(need / GIB) * 1024}"
    else:
        assert r.verdict == "tight"
    for f in r.fixes:
        assert f in r.text()


def test_preflight_facts_and_fixes_on_a_128gb_mac(real_index):
    """The facts sheet: 4 bits with group 64 is about 110 GB, and a 128 GB Mac must raise
    iogpu.wired_limit_mb; 3 bits fits as is; 8 bits cannot fit at all."""
    mac = macos(128)
    four = preflight(real_index, q_bits=4, device=mac)
    assert 105e9 < four.needs.weights - four.needs.mtp < 115e9
    assert four.verdict == "raise-wired-limit" and not four.refuse
    text = four.text()
    assert "sudo sysctl iogpu.wired_limit_mb=" in text and "--q-bits 3" in text and "fits as is" in text
    assert preflight(real_index, q_bits=3, device=mac).ok
    eight = preflight(real_index, q_bits=8, device=mac)
    assert eight.refuse and "--q-bits 4" in eight.text()
    # A context too long for the Mac: the fix names the longest context that fits.
    long = preflight(real_index, q_bits=3, context=262144, device=mac)
    assert not long.ok and "a shorter context: at most" in long.text()
    # Without drafting, the MTP blocks' caches are not counted; trunk only, no MTP weights.
    plain = preflight(real_index, q_bits=4, mtp=False, device=mac)
    assert plain.needs.mtp == 0
    assert plain.needs.kv_cache == expected_kv(32768, draft=False)
    assert plain.needs.weights == expected_weights(4)[0] - expected_weights(4)[1]


def test_preflight_expert_cache_hook(real_index):
    """With an expert cache (issue 12) the routed experts count as the cache's size."""
    full = preflight(real_index, q_bits=4, device=macos(64))
    cached = preflight(real_index, q_bits=4, expert_cache_gb=20, device=macos(64))
    experts = 42 * 3 * 288 * q(1280, H, 4)  # MoE layers 3..44, gate/up/down stacks
    assert cached.needs.weights == full.needs.weights - experts
    assert cached.needs.expert_cache == 20 * 10**9
    assert "expert cache" in cached.text()
    # The 4-bit model cannot fit a 64 GB Mac; the fix names the largest expert cache that does.
    assert full.refuse
    gb = int((48 * GIB - (full.needs.total - experts)) // 10**9)
    assert f"--expert-cache-gb {gb} " in full.text()
    assert preflight(real_index, q_bits=4, expert_cache_gb=gb, device=macos(64)).ok


def test_load_refuses_what_cannot_fit_and_force_goes_on(tiny_ckpt, mac):
    mac.memory, mac.recommended = 64 << 10, 48 << 10  # a 64 KiB "Mac": the tiny model cannot fit
    with pytest.raises(InsufficientMemoryError, match="(?s)cannot fit.*force=True"):
        load(tiny_ckpt, quantize=False)
    with pytest.warns(MemoryWarning, match="cannot fit"):
        m, _ = load(tiny_ckpt, quantize=False, force=True)
    assert m.args.num_hidden_layers > 0


def test_load_warns_with_the_sysctl_when_the_working_set_is_too_small(tiny_ckpt, mac):
    mac.memory, mac.recommended = 64 << 30, 1 << 10
    with pytest.warns(MemoryWarning, match=r"sudo sysctl iogpu\.wired_limit_mb=1024"):
        load(tiny_ckpt, quantize=False)


def test_cli_prints_the_preflight_and_refuses_without_force(tiny_ckpt, mac, capsys, recwarn):
    mac.memory, mac.recommended = 64 << 10, 48 << 10
    argv = [
        "--model",
        str(tiny_ckpt),
        "--max-tokens",
        "3",
        "--prompt",
        "hi",
        "--no-quantize",
        "--dtype",
        "float32",
    ]
    with pytest.raises(SystemExit) as e:
        generate_cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "memory pre-flight" in err and "cannot fit" in err and "--force" in err
    generate_cli.main(argv + ["--force"])
    out = capsys.readouterr()
    assert "Generation: 3 tokens" in out.out and "memory pre-flight" in out.err
    assert not [w for w in recwarn if w.category is MemoryWarning]  # said once, in the block


def test_num_draft_implies_drafting(tiny_ckpt, capsys):
    generate_cli.main(["--model", str(tiny_ckpt), "--max-tokens", "8", "--prompt", "hi", "--num-draft", "3"])
    assert "MTP acceptance by depth: 1:" in capsys.readouterr().out


def test_conversion_working_memory_of_the_real_model(real_index, mac):
    """One 5 GiB output shard, the largest tensor as read (the stacked experts, bf16) and the
    largest output module twice (4-bit stacked experts: slices, then their concatenation)."""
    need, device = working_memory(real_index, quantize=True)
    assert need == 5 * GIB + 288 * 1280 * H * 2 + 2 * 288 * q(1280, H, 4)
    assert device.memory == mac.memory


def test_convert_refuses_when_its_working_memory_cannot_fit(tiny_ckpt, mac, tmp_path, capsys):
    mac.memory = 64 << 10
    argv = ["--hf-path", str(tiny_ckpt), "--mlx-path", str(tmp_path / "out"), "-q", "--quiet"]
    with pytest.raises(SystemExit) as e:
        convert_cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "working memory" in err and "--force" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(InsufficientMemoryError, match="force=True"):
        convert(tiny_ckpt, tmp_path / "out2", quantize=True)
    convert_cli.main(argv + ["--force"])
    assert (tmp_path / "out" / "config.json").exists()


def loaded_bytes(model):
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_preflight_weights_equal_what_load_allocates(tiny_ckpt, tmp_path, bits):
    """The pre-flight's weight bytes against a real load: the HF checkpoint quantized while
    loading, and a conversion (whose index records the bytes it wrote)."""
    assert preflight(tiny_ckpt, q_bits=bits).needs.weights == loaded_bytes(load(tiny_ckpt, q_bits=bits)[0])
    out = convert(tiny_ckpt, tmp_path / "conv", quantize=True, q_bits=bits)
    written = json.loads((out / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    assert preflight(out).needs.weights == written == loaded_bytes(load(out)[0])


def test_server_holds_the_wired_limit_for_its_whole_life(mac, model):
    from fastapi.testclient import TestClient

    from mlx_step35.server import Engine, Settings, create_app

    app = create_app(Engine(*model), Settings(model_id="tiny"))
    with TestClient(app):
        assert mac.limit == mac.recommended
    assert mac.limit == 0 and mac.limits == [mac.recommended, 0]
