"""The agent CLIs (Claude Code, Codex, opencode) installed from npm at pinned versions into a
gitignored cache (.cache/agent-clients, reused across runs), and run against our server with
isolated homes, no telemetry and no auto-update. Used by tests/test_agent_clients.py and
benchmarks/agent_sessions.py."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "agent-clients"
# client: (npm package, pinned version, executable)
PACKAGES = {
    "claude": ("@anthropic-ai/claude-code", "2.1.197", "claude"),
    "codex": ("@openai/codex", "0.171.0", "codex"),
    "opencode": ("opencode-ai", "1.18.33", "opencode"),
}
API_KEY = "sk-local"  # the server runs without --api-key: any key passes


def installed(client: str) -> Optional[Path]:
    package, version, exe = PACKAGES[client]
    meta = CACHE / "node_modules" / package / "package.json"
    binary = CACHE / "node_modules" / ".bin" / exe
    if meta.is_file() and json.loads(meta.read_text())["version"] == version and binary.exists():
        return binary
    return None


def install(client: str) -> Path:
    """The client's executable, installed with npm on first use. Raises RuntimeError with the
    reason when npm is missing or the install fails (the tests skip with it)."""
    if installed(client):
        return installed(client)
    if shutil.which("npm") is None:
        raise RuntimeError("npm is not installed (Node 20+ and npm are needed for the agent-CLI tests)")
    CACHE.mkdir(parents=True, exist_ok=True)
    specs = [f"{p}@{v}" for p, v, _ in PACKAGES.values()]  # all at once: one install, one lock file
    cmd = ["npm", "install", "--prefix", str(CACHE), "--no-audit", "--no-fund", "--loglevel=error", *specs]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if r.returncode != 0 or not installed(client):
        raise RuntimeError(f"`{' '.join(cmd)}` failed ({r.returncode}): {r.stderr[-2000:]}")
    return installed(client)


def base_env(home: Path, cwd: Path) -> dict:
    """A minimal environment: HOME and XDG folders inside `home`, PWD = the client's cwd (the
    Node clients find their project folder by PWD), nothing of the user's config."""
    env = {k: os.environ[k] for k in ("PATH", "LANG", "TERM", "TMPDIR", "SYSTEMROOT") if k in os.environ}
    env.update(
        HOME=str(home),
        PWD=str(cwd),
        XDG_CONFIG_HOME=str(home / ".config"),
        XDG_CACHE_HOME=str(home / ".cache"),
        XDG_DATA_HOME=str(home / ".local" / "share"),
        XDG_STATE_HOME=str(home / ".local" / "state"),
        NO_COLOR="1",
        CI="1",
    )
    return env


def claude_env(url: str, model: str, home: Path, cwd: Path) -> dict:
    env = base_env(home, cwd)
    env.update(
        ANTHROPIC_BASE_URL=url,  # no /v1: the client adds /v1/messages
        ANTHROPIC_API_KEY=API_KEY,
        ANTHROPIC_MODEL=model,
        ANTHROPIC_SMALL_FAST_MODEL=model,  # background calls (titles, summaries)
        ANTHROPIC_DEFAULT_HAIKU_MODEL=model,
        ANTHROPIC_DEFAULT_SONNET_MODEL=model,
        ANTHROPIC_DEFAULT_OPUS_MODEL=model,
        CLAUDE_CODE_MAX_OUTPUT_TOKENS="4096",
        CLAUDE_CONFIG_DIR=str(home / ".claude"),
        CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",  # no telemetry, error reports, update checks
        DISABLE_TELEMETRY="1",
        DISABLE_ERROR_REPORTING="1",
        DISABLE_AUTOUPDATER="1",
        DISABLE_BUG_COMMAND="1",
        DISABLE_COST_WARNINGS="1",
    )
    return env


def claude_cmd(exe: Path, prompt: str, resume: bool = False) -> list:
    cmd = [str(exe), "-p", prompt, "--allowedTools", "Bash", "--output-format", "text"]
    return cmd + (["--continue"] if resume else [])


def codex_home(url: str, model: str, home: Path) -> Path:
    """$CODEX_HOME with a config.toml naming our server as a Responses-API provider."""
    d = home / ".codex"
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.toml").write_text(codex_config(url, model))
    return d


def codex_config(url: str, model: str) -> str:
    return (
        f'model = "{model}"\n'
        'model_provider = "mlx"\n'
        "check_for_update_on_startup = false\n"
        "[analytics]\nenabled = false\n"
        "[model_providers.mlx]\n"
        'name = "mlx-step35"\n'
        f'base_url = "{url}/v1"\n'
        'wire_api = "responses"\n'
        'env_key = "MLX_STEP35_API_KEY"\n'
    )


def codex_env(url: str, model: str, home: Path, cwd: Path) -> dict:
    env = base_env(home, cwd)
    env.update(CODEX_HOME=str(codex_home(url, model, home)), MLX_STEP35_API_KEY=API_KEY, RUST_LOG="error")
    return env


def codex_cmd(exe: Path, prompt: str, cwd: Path, resume: bool = False) -> list:
    flags = ["--skip-git-repo-check", "--dangerously-bypass-approvals-and-sandbox", "-C", str(cwd)]
    if resume:
        return [str(exe), "exec", *flags, "resume", "--last", prompt]
    return [str(exe), "exec", *flags, prompt]


def opencode_config(url: str, model: str) -> dict:
    return {
        "$schema": "https://opencode.ai/config.json",
        "provider": {
            "mlx": {
                "npm": "@ai-sdk/openai-compatible",
                "name": "mlx-step35",
                "options": {"baseURL": f"{url}/v1", "apiKey": API_KEY},
                "models": {model: {"name": model, "limit": {"context": 262144, "output": 4096}}},
            }
        },
        "model": f"mlx/{model}",
        "permission": {"bash": "allow", "edit": "allow"},
        "autoupdate": False,
        "share": "disabled",
    }


def opencode_env(url: str, model: str, home: Path, cwd: Path) -> dict:
    (cwd / "opencode.json").write_text(json.dumps(opencode_config(url, model), indent=2))
    env = base_env(home, cwd)
    # its plugin package is fetched from npm into the config folder once: keep that one in the cache
    env["XDG_CONFIG_HOME"] = str(CACHE / "opencode-config")
    env.update(
        OPENCODE_DISABLE_AUTOUPDATE="1",
        OPENCODE_DISABLE_MODELS_FETCH="1",
        OPENCODE_DISABLE_LSP_DOWNLOAD="1",
        OPENCODE_DISABLE_SHARE="1",
    )
    return env


def opencode_cmd(exe: Path, prompt: str, resume: bool = False) -> list:
    return [str(exe), "run", *(["--continue"] if resume else []), prompt]


def run_client(client: str, url: str, model: str, home: Path, cwd: Path, prompt: str, resume=False,
               timeout=600) -> subprocess.CompletedProcess:
    """One non-interactive turn of `client` in `cwd` against the server at `url`."""
    exe = install(client)
    home.mkdir(parents=True, exist_ok=True)
    cwd.mkdir(parents=True, exist_ok=True)
    if client == "claude":
        env, cmd = claude_env(url, model, home, cwd), claude_cmd(exe, prompt, resume)
    elif client == "codex":
        env, cmd = codex_env(url, model, home, cwd), codex_cmd(exe, prompt, cwd, resume)
    else:
        env, cmd = opencode_env(url, model, home, cwd), opencode_cmd(exe, prompt, resume)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def request_counts(metrics_text: str) -> dict:
    """{(endpoint, status): count} from the server's /metrics."""
    pat = r'^mlx_step35_requests_total\{endpoint="([^"]*)",status="(\d+)"\} (\d+)'
    return {(m[1], int(m[2])): int(m[3]) for m in re.finditer(pat, metrics_text, re.M)}
