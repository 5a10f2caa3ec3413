"""The real agent CLIs against the real server: Claude Code (`claude -p`, POST /v1/messages), Codex
(`codex exec`, POST /v1/responses) and opencode (`opencode run`, POST /v1/chat/completions), each
installed from npm at a pinned version (skipped, with the reason, without npm). The server runs a
tiny checkpoint scripted by its weights (tests/agent_checkpoint.py): the first turn calls the
client's shell tool to write a marker file, and once the tool's result is in the prompt it answers
a final text. Passes when the marker holds the command's output, the client prints the final text,
exits 0, and the server answered no request with a 4xx/5xx."""

import shutil

import httpx
import mlx.core as mx
import pytest
from agent_checkpoint import FINAL_TEXT, MARKER, MARKER_TEXT, build, chains
from agent_clients import install, request_counts, run_client
from mlx_lm.tokenizer_utils import load as load_tokenizer
from server_util import running_server

from mlx_step35 import load
from mlx_step35.chat_format import render_prompt

MODEL = "step-scripted"
PROMPT = "Write the marker file with the shell tool."


def _greedy(model, tokenizer, prompt, limit=40):
    cache, out = model.make_cache(), []
    logits = model(mx.array([prompt]), cache)[:, -1]
    while len(out) < limit:
        out.append(int(mx.argmax(logits)))
        if out[-1] == tokenizer.eos_token_id:
            break
        logits = model(mx.array([[out[-1]]]), cache)[:, -1]
    return tokenizer.decode(out)


def test_checkpoint_calls_the_tool_then_answers(tmp_path):
    """The checkpoint on its own (plain greedy decoding, no server): a long prompt without a tool
    result gives the call; the same conversation with the result, the final text."""
    path = build(tmp_path / "ckpt", "opencode")
    model, tok = load(path)
    call, final = chains("opencode")
    filler = "Rules of the project, repeated. " * 150  # the trigger must be seen from afar
    user = [{"role": "system", "content": filler}, {"role": "user", "content": PROMPT}]
    first = _greedy(model, tok, render_prompt(tok, user))
    assert first == "".join(call) + "<|im_end|>"
    args = {"command": "echo hi", "description": "x"}
    turn = {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"function": {"name": "bash", "arguments": args}}],
    }
    result = {"role": "tool", "content": "hi\n" + filler}  # long output between the trigger and the end
    second = _greedy(model, tok, render_prompt(tok, user + [turn, result]))
    assert second == "".join(final) + "<|im_end|>"
    again = user + [
        turn,
        result,
        {"role": "assistant", "content": FINAL_TEXT},
        {"role": "user", "content": "more"},
    ]
    assert _greedy(model, tok, render_prompt(tok, again)) == "".join(final) + "<|im_end|>"
    assert len(render_prompt(load_tokenizer(path), user)) > 1000


@pytest.fixture(scope="module", params=["opencode", "claude", "codex"])
def served(request, tmp_path_factory):
    client = request.param
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed: the agent-CLI tests need Node 20+ and npm")
    exe = install(client)
    path = build(tmp_path_factory.mktemp(f"agent-{client}"), client)
    with running_server(["--model", path, "--served-model-name", MODEL], timeout=300) as url:
        yield client, url, exe


def test_client_runs_the_tool_and_answers(served, tmp_path):
    client, url, _ = served
    work = tmp_path / "project"
    r = run_client(client, url, MODEL, tmp_path / "home", work, PROMPT)
    log = f"exit {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    counts = request_counts(httpx.get(url + "/metrics", timeout=10).text)
    assert counts and all(status < 400 for _, status in counts), (counts, log)
    assert r.returncode == 0, log
    assert (work / MARKER).read_text().strip() == MARKER_TEXT, log
    assert FINAL_TEXT in r.stdout, log
