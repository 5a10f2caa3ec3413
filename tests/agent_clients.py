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
API_KEY = "unused"  # the server runs without --api-key: any key passes
README_URL, README_MODEL = "http://127.0.0.1:8080", "Step-3.5-Flash-4bit"  # as the recipes write them


def readme_recipe(lang: str, url: str, model: str) -> str:
    """The first ```LANG block of the README's "Agent CLIs" section, for a server at `url` serving
    `model`: the tests run the recipes as the README writes them."""
    text = (ROOT / "README.md").read_text()
    section = text.split("### Agent CLIs", 1)[1].split("\n## ", 1)[0]
    m = re.search(rf"```{lang}\n(.*?)```", section, re.S)
    if m is None:
        raise AssertionError(f"README.md: no ```{lang} block in the Agent CLIs section")
    return m[1].replace(README_URL, url).replace(README_MODEL, model)


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
    for line in readme_recipe("bash", url, model).splitlines():  # export NAME=VALUE  # comment
        m = re.match(r"export (\w+)=(\S+)", line.strip())
        if m:
            env[m[1]] = m[2]
    assert env.get("ANTHROPIC_BASE_URL") == url and env.get("ANTHROPIC_MODEL") == model, env
    env.update(
        CLAUDE_CONFIG_DIR=str(home / ".claude"),
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
    # the README's recipe, with no update check and no analytics (top-level keys go first)
    toml = readme_recipe("toml", url, model)
    return "check_for_update_on_startup = false\n" + toml + "\n[analytics]\nenabled = false\n"


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
    """The README's opencode.json, plus: shell commands allowed, no auto-update, no sharing."""
    cfg = json.loads(readme_recipe("json", url, model))
    cfg.update(permission={"bash": "allow", "edit": "allow"}, autoupdate=False, share="disabled")
    return cfg


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


def run_client(
    client: str, url: str, model: str, home: Path, cwd: Path, prompt: str, resume=False, timeout=600
) -> subprocess.CompletedProcess:
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
    return subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


def request_counts(metrics_text: str) -> dict:
    """{(endpoint, status): count} from the server's /metrics."""
    pat = r'^mlx_step35_requests_total\{endpoint="([^"]*)",status="(\d+)"\} (\d+)'
    return {(m[1], int(m[2])): int(m[3]) for m in re.finditer(pat, metrics_text, re.M)}
