"""deploy/Dockerfile without Docker: its build and run steps, replayed on this machine.

Docker cannot build here, so the test does what the build would: the build context is what
.dockerignore lets through; the builder stage's COPY and RUN lines (read from the
Dockerfile, not copied into this file) run in a temporary directory standing in for the
image's root, so /opt/venv is <tmp>/opt/venv; the final stage's ENV, USER and WORKDIR then
apply to `worker demo`, run as a non-root user from a venv that user cannot write to.
A file the image needs that the context or a COPY leaves out fails the build here as in
Docker. Instructions the test does not know how to replay fail it too, so a changed
Dockerfile is either reproduced or reported, never skipped silently.

Prerequisites (skipped on a developer's machine when missing, a failure when
WORKER_REQUIRE_SERVICES=1, as in tests/services.py): a way to run as a non-root user,
a python3 that user can run, and the package index pip is configured with.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shlex
import shutil
import signal
import ssl
import stat
import subprocess
import sys
import tempfile
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from test_deploy import _dockerignore_excludes

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "deploy" / "Dockerfile"
# What the python:*-slim base images set before the Dockerfile's own ENV.
BASE_IMAGE_ENV = {
    "PATH": "/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
}
BUILD_STEP_TIMEOUT = 240  # seconds per pip step; the whole build takes 10-60 s
RUN_TIMEOUT = 120  # `worker demo` takes ~6 s
# Environment of the test run that would point pip at another interpreter or location.
NOT_FOR_THE_BUILD = {
    "VIRTUAL_ENV",
    "PYTHONPATH",
    "PYTHONHOME",
    "PYTHONSTARTUP",
    "PYTHONUSERBASE",
    "PIP_USER",
    "PIP_TARGET",
    "PIP_PREFIX",
    "PIP_REQUIRE_VIRTUALENV",
}


def _unavailable(message: str) -> None:
    """Skip, or fail when WORKER_REQUIRE_SERVICES=1 (as tests/services.py does)."""
    if os.environ.get("WORKER_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{message}; WORKER_REQUIRE_SERVICES=1 requires it")
    pytest.skip(f"{message}; the image test needs it")


def _run(cmd: list[str], *, timeout: float, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run `cmd` in its own process group with Docker's umask; on timeout kill the group."""
    with subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        umask=0o022,
        **kwargs,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"`{shlex.join(cmd)}` took over {timeout:g} s\n{out}\n{err}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


# --- deploy/Dockerfile, parsed ------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str | None
    steps: list[tuple[str, str]] = field(default_factory=list)


def _stages(text: str) -> list[Stage]:
    """Instructions per stage: continuation lines joined, comments and blank lines dropped."""
    stages: list[Stage] = []
    pending: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending.append(line[:-1].strip())
            continue
        keyword, _, args = " ".join([*pending, line]).partition(" ")
        pending = []
        if keyword.upper() == "FROM":
            words = args.split()
            named = len(words) == 3 and words[1].upper() == "AS"
            stages.append(Stage(words[0], words[2] if named else None))
        else:
            assert stages, f"{keyword} before the first FROM"
            stages[-1].steps.append((keyword.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return stages


def _not_reproduced(what: str) -> None:
    pytest.fail(f"tests/test_image.py does not know how to replay {what}: teach it")


# --- the build context --------------------------------------------------------------------


def _dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _could_reinclude(negation: str, folder: str) -> bool:
    """Whether a `!pattern` might match something under `folder` (else skip walking it)."""
    literal = re.split(r"[*?\[]", negation, maxsplit=1)[0]
    return literal.startswith(folder + "/") or folder.startswith(literal)


def _build_context(dest: Path) -> list[str]:
    """Copy what `docker build .` would send from the repository root; return its paths."""
    patterns = _dockerignore_patterns()
    negations = [p.removeprefix("!").strip("/") for p in patterns if p.startswith("!")]
    sent: list[str] = []
    for folder, dirs, files in os.walk(REPO):
        relative = Path(folder).relative_to(REPO).as_posix()
        prefix = "" if relative == "." else relative + "/"
        walked = []
        for name in dirs:
            path = prefix + name
            if os.path.islink(os.path.join(folder, name)):
                files.append(name)  # sent as a link, not followed
            elif not _dockerignore_excludes(patterns, path) or any(
                _could_reinclude(n, path) for n in negations
            ):
                walked.append(name)
        dirs[:] = walked
        for name in files:
            path = prefix + name
            if not _dockerignore_excludes(patterns, path):
                (dest / path).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(os.path.join(folder, name), dest / path, follow_symlinks=False)
                sent.append(path)
    return sorted(sent)


# --- the image's file system, under one temporary directory -------------------------------


@dataclass
class Image:
    root: Path  # stands in for the image's /
    context: Path  # the build context
    python: str  # the interpreter `python -m venv` runs with
    venv: str | None = None  # image path, from the builder's `python -m venv`
    extras: set[str] = field(default_factory=set)

    def host(self, image_path: str) -> Path:
        assert image_path.startswith("/"), f"{image_path} is not absolute"
        return self.root / image_path.lstrip("/")

    def mkdir(self, image_path: str, mode: int = 0o755) -> Path:
        """Create an image directory; its parents 0755, as in any image."""
        path = self.host(image_path)
        path.mkdir(parents=True, exist_ok=True)
        parent = self.root
        for part in path.relative_to(self.root).parts[:-1]:
            parent = parent / part
            parent.chmod(0o755)
        path.chmod(mode)
        return path

    def map_path(self, word: str) -> str:
        """A venv path in a RUN command, moved under the temporary root."""
        if self.venv and (word == self.venv or word.startswith(self.venv + "/")):
            return str(self.host(word))
        if word.startswith("/"):
            _not_reproduced(f"the path {word} in a builder RUN line")
        return word


@pytest.fixture
def image_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="cdp-sync-image-"))
    root.chmod(0o755)  # the non-root user must reach the venv and its home below it
    try:
        yield root
    finally:
        for folder, _, _ in os.walk(root):  # the venv is made read-only; rmtree needs u+w
            os.chmod(folder, stat.S_IMODE(os.lstat(folder).st_mode) | stat.S_IRWXU)
        shutil.rmtree(root)


# --- prerequisites ------------------------------------------------------------------------


@dataclass
class User:
    uid: int
    gid: int
    name: str

    def popen(self) -> dict[str, Any]:
        if self.uid == os.geteuid():
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


def _non_root_user() -> User:
    """This user when not root; as root, `nobody` (switched to with setuid, no tool needed)."""
    if os.geteuid() != 0:
        return User(os.geteuid(), os.getegid(), pwd.getpwuid(os.geteuid()).pw_name)
    try:
        entry = pwd.getpwnam("nobody")
        user = User(entry.pw_uid, entry.pw_gid, "nobody")
    except KeyError:
        user = User(65534, 65534, "uid 65534")
    true = shutil.which("true") or "/bin/true"
    try:
        switched = _run([true], timeout=30, **user.popen())
    except OSError as exc:
        switched = subprocess.CompletedProcess([true], 1, "", str(exc))
    if switched.returncode != 0:
        _unavailable(f"cannot run a process as {user.name} ({switched.stderr.strip()})")
    return user


def _interpreter(user: User, image_version: str | None, requires: tuple[int, int]) -> str:
    """A base python3 (not a venv) that `user` can run, with venv and ensurepip; the
    image's version if there is one. As root, pyenv's pythons under /root are out of reach."""
    names = [f"python{image_version}"] if image_version else []
    names += ["python3", "/usr/local/bin/python3", "/usr/bin/python3", sys.executable]
    usable: dict[str, str] = {}
    tried: list[str] = []
    for name in names:
        found = shutil.which(name)
        if not found:
            continue
        base = _run(
            [found, "-c", "import sys; print(getattr(sys, '_base_executable', sys.executable))"],
            timeout=30,
        ).stdout.strip()
        if not base or base in usable or base in tried:
            continue
        try:
            probe = _run(
                [base, "-c", "import sys, venv, ensurepip; print('%d.%d' % sys.version_info[:2])"],
                timeout=30,
                cwd="/",
                env=BASE_IMAGE_ENV,
                **user.popen(),
            )
        except OSError:  # e.g. under /root, which is 0700
            tried.append(base)
            continue
        version = probe.stdout.strip()
        if probe.returncode == 0 and tuple(map(int, version.split("."))) >= requires:
            usable[base] = version
        else:
            tried.append(base)
    if not usable:
        _unavailable(
            f"no python3 >= {requires[0]}.{requires[1]} with venv that {user.name} can run "
            f"(tried {', '.join(tried) or 'none found'})"
        )
    matching = [base for base, version in usable.items() if version == image_version]
    return (matching or list(usable))[0]


def _index_problem(pip: Path, env: dict[str, str]) -> str | None:
    """Why the index pip is configured with does not answer, or None if it does."""
    listed = _run([str(pip), "config", "list"], timeout=60, env=env).stdout
    config = {}
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        config[key.strip()] = value.strip().strip("'\"")

    def option(name: str) -> str | None:
        scopes = (":env:", "install", "global")
        return next((config[f"{s}.{name}"] for s in scopes if f"{s}.{name}" in config), None)

    index = (option("index-url") or "https://pypi.org/simple").split()[0]
    parts = urllib.parse.urlsplit(index)
    if parts.scheme == "file":
        return None if Path(urllib.parse.unquote(parts.path)).is_dir() else f"{index} is missing"
    cert = option("cert")
    context = ssl.create_default_context(cafile=cert if cert and Path(cert).is_file() else None)
    try:
        with urllib.request.urlopen(index.rstrip("/") + "/pip/", timeout=5, context=context):
            return None
    except urllib.error.HTTPError:
        return None  # it answers; pip reports anything else
    except (OSError, ValueError) as exc:
        return f"the package index at {parts.hostname} does not answer ({exc})"


# --- the builder stage --------------------------------------------------------------------


def _build_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in NOT_FOR_THE_BUILD}
    if sys.prefix != sys.base_prefix:  # drop this test run's own venv from PATH
        own = os.path.join(sys.prefix, "bin")
        env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != own)
    return env


def _copy(image: Image, args: str, workdir: str) -> None:
    """COPY from the build context: a missing source fails the build, as in Docker."""
    *sources, dest = shlex.split(args)
    if not sources or any(s.startswith("--") or re.search(r"[*?\[]", s) for s in sources):
        _not_reproduced(f"COPY {args}")
    target = image.host(dest if dest.startswith("/") else os.path.join(workdir, dest))
    into = dest.endswith("/") or len(sources) > 1
    for source in sources:
        sent = image.context / source
        if not sent.exists():
            why = ".dockerignore leaves it out" if (REPO / source).exists() else "no such file"
            pytest.fail(f"COPY {args}: {source} is not in the build context ({why})")
        if sent.is_dir():
            shutil.copytree(sent, target, symlinks=True, dirs_exist_ok=True)
        else:
            copied = target / sent.name if into else target
            copied.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(sent, copied, follow_symlinks=False)


def _commands(args: str) -> list[list[str]]:
    """A RUN line's commands, split on `&&`; any other shell syntax is not replayed."""
    if args.startswith("["):
        return [json.loads(args)]
    commands: list[list[str]] = [[]]
    for word in shlex.split(args):
        if word == "&&":
            commands.append([])
        elif word in {";", "||", "|", "&"} or word[:1] in "<>":
            _not_reproduced(f"RUN {args}")
        else:
            commands[-1].append(word)
    return commands


def _translate(image: Image, command: list[str], declared_extras: set[str]) -> list[str]:
    """`python -m venv DIR` and `DIR/bin/pip ...` with DIR under the temporary root."""
    if re.fullmatch(r"python(3(\.\d+)?)?", command[0]) and command[1:3] == ["-m", "venv"]:
        assert len(command) == 4, f"unexpected venv options: {command}"
        image.venv = command[3].rstrip("/")
        return [image.python, "-m", "venv", image.map_path(image.venv)]
    if image.venv and command[0] in (f"{image.venv}/bin/pip", f"{image.venv}/bin/python"):
        pip_args = command[1:] if command[0].endswith("pip") else command[3:]
        if command[0].endswith("python"):
            assert command[1:3] == ["-m", "pip"], command
        for word in pip_args:
            project = re.fullmatch(r"\.(?:\[([\w,-]*)\])?", word)
            if project:
                image.extras |= set(filter(None, (project[1] or "").split(",")))
        unknown = image.extras - declared_extras
        assert not unknown, f"the Dockerfile installs extras pyproject.toml lacks: {unknown}"
        return [str(image.host(image.venv)) + "/bin/pip", *map(image.map_path, pip_args)]
    _not_reproduced(f"the builder command `{shlex.join(command)}`")
    raise AssertionError  # unreachable: pytest.fail raised


def _build(image: Image, builder: Stage) -> list[str]:
    """Replay the builder stage as this (root) user, as Docker's builder runs."""
    declared = set(
        tomllib.loads((REPO / "pyproject.toml").read_text())["project"].get(
            "optional-dependencies", {}
        )
    )
    env, workdir, log, index_checked = _build_env(), "/", [], False
    for keyword, args in builder.steps:
        if keyword == "WORKDIR":
            workdir = os.path.join(workdir, args)
            image.mkdir(workdir)
        elif keyword == "COPY":
            _copy(image, args, workdir)
        elif keyword == "RUN":
            for command in _commands(args):
                cmd = _translate(image, command, declared)
                if cmd[0].endswith("/bin/pip") and not index_checked:
                    problem = _index_problem(Path(cmd[0]), env)
                    if problem:
                        _unavailable(problem)
                    index_checked = True
                done = _run(cmd, timeout=BUILD_STEP_TIMEOUT, cwd=image.host(workdir), env=env)
                assert done.returncode == 0, (
                    f"builder step `{shlex.join(command)}` failed ({done.returncode}):\n"
                    f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
                )
                log.append(shlex.join(command))
        else:
            _not_reproduced(f"{keyword} in the builder stage")
    assert image.venv, "the builder stage creates no venv (`python -m venv DIR`)"
    assert image.extras, "the builder stage installs the project (`.[extras]`) nowhere"
    return log


def _read_only(path: Path) -> None:
    for folder, dirs, files in os.walk(path, topdown=False):
        for name in [*files, *dirs, None]:
            entry = os.path.join(folder, name) if name else folder
            if not os.path.islink(entry):
                os.chmod(entry, stat.S_IMODE(os.lstat(entry).st_mode) & ~0o222)


# --- the final stage ----------------------------------------------------------------------


@dataclass
class Runtime:
    env: dict[str, str]
    workdir: str
    entrypoint: list[str]
    image_user: str


def _runtime(image: Image, final: Stage, builder: str | None) -> Runtime:
    env, home, workdir, user, entrypoint = dict(BASE_IMAGE_ENV), None, "/", None, None
    for keyword, args in final.steps:
        if keyword == "ENV":
            words = shlex.split(args)
            if "=" in words[0]:
                pairs = [word.split("=", 1) for word in words]
            else:  # the legacy `ENV KEY value with spaces`
                pairs = [[words[0], " ".join(words[1:])]]
            for key, value in pairs:
                env[key] = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m[1], ""), value)
        elif keyword == "RUN" and shlex.split(args)[0] == "useradd":
            words = shlex.split(args)
            assert "--create-home" in words or "-m" in words, "the user gets no home to write"
            flag = "--home-dir" if "--home-dir" in words else "-d"
            home = words[words.index(flag) + 1]
        elif keyword == "COPY" and args.startswith("--from="):
            source, _, rest = args.removeprefix("--from=").partition(" ")
            assert source == builder, f"COPY --from={source}: not the builder stage"
            assert rest.split() == [image.venv, image.venv], (
                "the venv must land at the path it was built at (its scripts name it)"
            )
        elif keyword == "USER":
            user = args
        elif keyword == "WORKDIR":
            workdir = os.path.join(workdir, args)
        elif keyword == "ENTRYPOINT":
            entrypoint = json.loads(args)
        elif keyword not in {"EXPOSE", "HEALTHCHECK", "CMD", "LABEL"}:
            _not_reproduced(f"{keyword} {args} in the final stage")
    assert user, "no USER: the image runs as root"
    assert user.split(":")[0] not in {"0", "root"}, f"USER {user}: the image runs as root"
    assert home, "no `useradd --home-dir DIR --create-home`: the user has nowhere to write"
    assert workdir == home, f"WORKDIR {workdir} is not the user's home {home}: writable?"
    assert isinstance(entrypoint, list), "no exec-form ENTRYPOINT"
    assert entrypoint, "an empty ENTRYPOINT"
    env.setdefault("HOME", home)  # Docker takes it from the image's /etc/passwd
    env["TMPDIR"] = "/tmp"  # the container's own /tmp: here under the temporary root
    assert image.venv
    # One pass, so a host path (itself under /tmp) is never mapped twice.
    dirs = sorted({image.venv, home, "/tmp"}, key=len, reverse=True)
    pattern = re.compile(r"(?<![\w.-])(" + "|".join(map(re.escape, dirs)) + r")(?=/|:|$)")
    env = {k: pattern.sub(lambda m: str(image.host(m[1])), v) for k, v in env.items()}
    return Runtime(env, workdir, entrypoint, user)


PROBE = """
import contextlib, importlib, os, pkgutil, shutil, sqlite3, sys, sysconfig
from importlib import metadata
import worker
problems = []
if not (metadata.metadata(sys.argv[1]).get_payload() or "").strip():
    problems.append(f"{sys.argv[1]} has no long description: was its readme in the build?")
if os.getuid() == 0:
    problems.append("running as root")
if not worker.__file__.startswith(sys.prefix + os.sep):
    problems.append(f"worker imported from {worker.__file__}, not from the venv {sys.prefix}")
if shutil.which("worker") != os.path.join(sys.prefix, "bin", "worker"):
    problems.append(f"`worker` on PATH is {shutil.which('worker')}, not the venv's")
for module in pkgutil.walk_packages(worker.__path__, "worker."):
    if not module.name.endswith(".__main__"):  # that one runs the CLI
        importlib.import_module(module.name)  # every backend's client library is installed
for path in (sys.prefix, sysconfig.get_paths()["purelib"]):
    if os.access(path, os.W_OK):
        problems.append(f"the venv is writable: {path}")
if not os.access(os.getcwd(), os.W_OK):
    problems.append(f"the working directory {os.getcwd()} is not writable")
state = os.environ["WORKER_STATE"]
if state.startswith("sqlite:///"):
    path = state.removeprefix("sqlite:///")
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE probe (x)")
    os.remove(path)
print("\\n".join(problems))
sys.exit(1 if problems else 0)
"""


@pytest.mark.slow
def test_the_image_builds_and_runs_the_demo_as_a_non_root_user(image_root: Path) -> None:
    stages = _stages(DOCKERFILE.read_text())
    final = stages[-1]
    version = re.match(r"python:(\d+\.\d+)", final.base)
    pulled = [args.split()[0].removeprefix("--from=") for k, args in final.steps if k == "COPY"]
    builder = next((s for s in stages[:-1] if s.name in pulled), None)
    assert builder, "no builder stage that the final stage copies from"
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    minimum = re.fullmatch(r">=\s*(\d+)\.(\d+)", requires)
    assert minimum, f"requires-python {requires}: only >=X.Y is understood here"

    user = _non_root_user()
    python = _interpreter(user, version[1] if version else None, (int(minimum[1]), int(minimum[2])))
    context = image_root / "context"
    sent = _build_context(context)
    assert "pyproject.toml" in sent, sent
    assert not any("__pycache__" in path for path in sent), sent
    image = Image(root=image_root / "rootfs", context=context, python=python)
    image.mkdir("/")
    steps = _build(image, builder)

    assert image.venv
    installed = [*image.host(image.venv).glob("lib/python*/site-packages/worker")]
    assert len(installed) == 1, f"the venv holds {len(installed)} worker packages"
    missing = {p.relative_to(REPO).as_posix() for p in (REPO / "worker").rglob("*.py")} - {
        p.relative_to(installed[0].parent).as_posix() for p in installed[0].rglob("*.py")
    }
    assert not missing, f"modules of the repository missing from the image: {sorted(missing)}"
    _read_only(image.host(image.venv))  # owned by root as in the image; a-w for anyone else
    runtime = _runtime(image, final, builder.name)
    home = image.mkdir(runtime.workdir, 0o700)
    os.chown(home, user.uid, user.gid)
    image.mkdir("/tmp", 0o1777)
    env, cwd = runtime.env, image.host(runtime.workdir)
    assert env["PATH"].split(":")[0] == f"{image.host(image.venv)}/bin", env["PATH"]
    assert env.get("PYTHONUNBUFFERED") == "1"
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1"
    assert env.get("WORKER_STATE", "").startswith(f"sqlite:///{cwd}/"), env.get("WORKER_STATE")
    facts = (
        f"built with {python}, extras {sorted(image.extras)}; steps {steps}; "
        f"run as {user.name} (image USER {runtime.image_user}) in {cwd}"
    )

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["name"]
    probed = _run(
        ["python", "-c", PROBE, project], timeout=RUN_TIMEOUT, cwd=cwd, env=env, **user.popen()
    )
    assert probed.returncode == 0, f"{facts}\n{probed.stdout}\n{probed.stderr}"

    demo = _run(
        [*runtime.entrypoint, "demo"], timeout=RUN_TIMEOUT, cwd=cwd, env=env, **user.popen()
    )
    assert demo.returncode == 0, f"{facts}\n{demo.stdout}\n{demo.stderr}"
    summary = re.search(r"contacts at CDP\s+(\d+) on (\d+) orders, (\d+) orders with", demo.stdout)
    assert summary, f"no summary line:\n{demo.stdout}"
    assert summary[3] == "0", f"orders with more than one contact:\n{demo.stdout}"
    assert summary[1] == summary[2] != "0", demo.stdout
    print(facts, demo.stdout, sep="\n")
