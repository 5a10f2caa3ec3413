"""A tiny real checkpoint that plays one agent turn: a shell tool call first, a final text once the
tool's result is in the prompt. Served by the real server (`python -m mlx_step35.server --model DIR`)
for the agent-CLI tests; `python tests/agent_checkpoint.py DIR --client claude` writes one.

How the weights script it (float32, no quantization: an HF checkpoint converted by our converter):
- Every residual branch is zero except the attention of layer 0 (full attention), so the
  trunk maps token x to lm_head(norm(embed(x) + t * trigger_vector)), t = 1 once the prompt holds
  a `<tool_response>` token (a special token of the tokenizer) before the position, else 0.
- Its one head attends sharply to `<tool_response>`: its query and key read residual dimensions
  (one constant in every embedding, one set only in the trigger's) into a non-rotated head
  dimension (full layers rotate half of head_dim), so q.k is +SCORE at a trigger and exactly 0
  elsewhere; its value is non-zero only at the trigger, and o_proj writes it to dimension OUT,
  which no embedding uses.
- lm_head is a successor map over two chains that start at the generation prompt's last token:
  the tool call (CALL) and the final text (FINAL). Row FINAL[0] scores 2/3 of row CALL[0] without
  the trigger vector and 4/3 with it; every other successor scores 1 (margins of about
  SCALE / (3 sqrt 2) = 28 logits, less the random overlap of embeddings).
- Each chain piece is one vocabulary entry (the last BPE merges renamed, as in
  test_server_chat.py), so the chains never repeat a token. The MTP blocks draft the successor
  map without the trigger: right everywhere except at FINAL's first token (one rejection).
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from factory import _save_shards, _shard_plan, make_config, make_weights, write_tokenizer  # noqa: E402
from mlx_lm.tokenizer_utils import load as load_tokenizer  # noqa: E402
from test_server_chat import bytes_to_unicode  # noqa: E402

from mlx_step35.chat_format import render_prompt  # noqa: E402
from mlx_step35.conversion import convert  # noqa: E402

TRIGGER = "<tool_response>"
MARKER = "agent_marker.txt"
MARKER_TEXT = "scripted-ok"
FINAL_TEXT = "The marker file is written."
COMMAND = f"echo {MARKER_TEXT} > {MARKER}"
DESCRIPTION = "Write the marker file"
# the shell tool and its arguments, as each client declares them
CLIENT_CALLS = {
    "claude": ("Bash", {"command": COMMAND, "description": DESCRIPTION}),
    "codex": ("exec_command", {"cmd": COMMAND}),
    "opencode": ("bash", {"command": COMMAND, "description": DESCRIPTION}),
}
VOCAB = 4096
HIDDEN, HEAD_DIM = 64, 16
CONST, FLAG, OUT = 0, 1, 2  # residual dimensions: constant in every embedding, trigger only, trigger vector
SCORE = 40.0  # q.k at the trigger (exp(40) outweighs any prompt length)
SCALE = 120.0  # logit of a successor (before the final norm's shrink by sqrt(2) with the trigger)
TRIGGER_GAIN = float(np.sqrt(HIDDEN))  # size of the trigger vector: as large as an embedding


def call_pieces(name: str, args: dict) -> list:
    params = [f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in args.items()]
    return ["<tool_call>\n", f"<function={name}>\n", *params, "</function>\n</tool_call>"]


def chains(client: str):
    """(CALL, FINAL): the reply pieces of turn 1 (reasoning, then the call) and of turn 2."""
    name, args = CLIENT_CALLS[client]
    call = ["I will run", " the command.\n</think>\n", *call_pieces(name, args)]
    final = ["The command ran.", "\n</think>\n", FINAL_TEXT]
    return call, final


def _rename_merges(path: Path, pieces: list) -> list:
    """Rename the tokens of the last BPE merges to `pieces` (no later merge uses them); add the
    trigger as a special token in place of one more. Returns the pieces' ids, trigger last."""
    tj = json.loads((path / "tokenizer.json").read_text())
    vocab, merges = tj["model"]["vocab"], tj["model"]["merges"]
    n = len(pieces) + 1
    last = merges[-n:]
    del merges[-n:]
    b2u = bytes_to_unicode()
    ids = []
    for merge, piece in zip(last, pieces + [TRIGGER]):
        a, b = merge if isinstance(merge, list) else merge.split(" ")
        name = "".join(b2u[c] for c in piece.encode())
        assert name not in vocab, piece
        ids.append(vocab.pop(a + b))
        vocab[name] = ids[-1]
    tj["added_tokens"].append(
        {
            "id": ids[-1],
            "content": TRIGGER,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
    )
    (path / "tokenizer.json").write_text(json.dumps(tj))
    return ids


def _embeddings(rng, trigger: int) -> np.ndarray:
    """Rows of RMS 1 (the input norms leave them as they are); FLAG set only in the trigger's,
    CONST positive in all, OUT zero in all."""
    E = rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)
    E[:, CONST] = 1.0
    E[:, [FLAG, OUT]] = 0.0
    E[trigger] = 0.0
    E[trigger, FLAG] = 1.0
    return E / np.sqrt(np.mean(E * E, axis=-1, keepdims=True))


def _head(E, call_ids, final_ids, end, eos) -> np.ndarray:
    head = np.zeros((VOCAB, HIDDEN), np.float32)
    for chain in (call_ids, final_ids):
        seq = [end] + chain + [eos]
        for prev, nxt in zip(seq, seq[1:]):
            head[nxt] += E[prev]
    # the fork at `end`: FINAL[0] = 2/3 of CALL[0]'s score, + 2/3 with the trigger vector
    # (whose component after the final norm is TRIGGER_GAIN / sqrt(2), as is the embedding's share)
    head[final_ids[0]] = (2 / 3) * E[end]
    head[final_ids[0], OUT] = (2 / 3) * HIDDEN / TRIGGER_GAIN
    return head * (SCALE / HIDDEN)


def build(path, client: str, seed: int = 0) -> Path:
    """Write the converted checkpoint for `client` into `path` (HF source in path/hf); returns
    the converted folder, path/model."""
    path = Path(path)
    hf = path / "hf"
    hf.mkdir(parents=True)
    # one attention head per layer (prefill time grows with the prompt's square in the full layer);
    # the MTP blocks slide (the last one would be full)
    cfg = make_config(
        num_hidden_layers=2,
        moe_layers_enum="1",
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        head_dim=HEAD_DIM,
        sliding_window=8,
        max_position_embeddings=262144,
        num_attention_heads=1,
        num_attention_groups=1,
        attention_other_setting={"num_attention_heads": 1, "num_attention_groups": 1, "head_dim": HEAD_DIM},
    )
    for field, value in (
        ("layer_types", "sliding_attention"),
        ("partial_rotary_factors", 1.0),
        ("rope_theta", 1e4),
    ):
        cfg[field][cfg["num_hidden_layers"] :] = [value] * cfg["num_nextn_predict_layers"]
    cfg["eos_token_id"] = [1, 2, VOCAB - 1]
    write_tokenizer(hf, VOCAB, chat_template=True)
    call, final = chains(client)
    ids = _rename_merges(hf, call + final)
    call_ids, final_ids, trigger = ids[: len(call)], ids[len(call) : -1], ids[-1]
    end = _generation_prompt_end(hf)
    eos = VOCAB - 1
    w = make_weights(cfg, seed=seed)
    rng = np.random.default_rng(seed + 1)
    E = _embeddings(rng, trigger)
    w["model.embed_tokens.weight"] = E
    for k in list(w):
        if k.endswith(("o_proj.weight", "down_proj.weight", "g_proj.weight")):
            w[k] = np.zeros_like(w[k])
        elif k.endswith("norm.weight"):
            w[k] = np.zeros_like(w[k])  # zero-centred: scale 1
    _trigger_head(w, cfg)
    head = _head(E, call_ids, final_ids, end, eos)
    w["lm_head.weight"] = head.copy()
    H = HIDDEN
    for i in range(cfg["num_hidden_layers"], cfg["num_hidden_layers"] + cfg["num_nextn_predict_layers"]):
        p = f"model.layers.{i}"
        w[f"{p}.eh_proj.weight"] = np.concatenate([np.eye(H), np.zeros((H, H))], axis=1).astype(np.float32)
        w[f"{p}.transformer.shared_head.output.weight"] = head.copy()
    _save_shards(w, _shard_plan(list(w), cfg["num_hidden_layers"], 2), hf, "float32")
    (hf / "config.json").write_text(json.dumps(cfg, indent=2))
    (path / "script.json").write_text(json.dumps({"client": client, "call": call, "final": final}))
    return convert(hf, path / "model", dtype="float32")


def _trigger_head(w: dict, cfg: dict) -> None:
    """Layer 0, head 0: q and k in head dimension j (not rotated) from CONST and FLAG; the value
    from FLAG, written by o_proj to OUT (times 2: the head gate is sigmoid(0) = 1/2)."""
    D, j = HEAD_DIM, HEAD_DIM - 1
    p = "model.layers.0.self_attn"
    assert cfg["layer_types"][0] == "full_attention" and cfg["partial_rotary_factors"][0] == 0.5
    for key in ("q_proj", "k_proj", "v_proj"):
        w[f"{p}.{key}.weight"] = np.zeros_like(w[f"{p}.{key}.weight"])
    w[f"{p}.q_proj.weight"][j, CONST] = 1.0  # head 0 (its kv group: 0)
    w[f"{p}.k_proj.weight"][j, FLAG] = 1.0
    w[f"{p}.v_proj.weight"][0, FLAG] = 1.0
    # after q/k RMS norms the vectors are sqrt(D) * g in dimension j; score = D * gq * gk / sqrt(D)
    g = np.sqrt(SCORE / np.sqrt(D))
    for key in ("q_norm", "k_norm"):
        w[f"{p}.{key}.weight"] = np.zeros(D, np.float32)
        w[f"{p}.{key}.weight"][j] = g - 1.0  # zero-centred
    # the value at the trigger is its FLAG component (its embedding is sqrt(H) * e_FLAG)
    w[f"{p}.o_proj.weight"][OUT, 0] = 2.0 * TRIGGER_GAIN / np.sqrt(HIDDEN)


def _generation_prompt_end(hf: Path) -> int:
    tok = load_tokenizer(hf)
    return render_prompt(tok, [{"role": "user", "content": "hi"}])[-1]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("--client", choices=sorted(CLIENT_CALLS), required=True)
    print(build(ap.parse_args().path, ap.parse_args().client))
