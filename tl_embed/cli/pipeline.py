"""Run ``pipelines/*.toml``: named steps, each one ``tl-embed`` command, skipped when up to date.

A pipeline file::

    description = "..."
    [vars]                      # defaults; override with --set key=value
    images = ""                 # "" means: must be set
    out = "tl-embed-out"

    [[step]]
    name = "embed"
    run = "embed"               # a tl-embed command
    args = ["{images}"]         # positional arguments
    inputs = ["{images}"]       # what the step reads ...
    outputs = ["{out}/photos.tle"]   # ... and writes
    [step.options]              # --key value (true: a flag)
    out = "{out}/photos.tle"

A step is skipped ("skipped: up to date"), as make or DVC would, when its outputs exist, nothing
under its inputs changed since it last ran (same files, sizes and mtimes), and its resolved command
line is the same.  Stamps live
in ``{out}/.tl-embed-pipeline.json``.  Everything is validated before any step runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import TlEmbedError, WeightsUnavailableError
from ..wording import count
from .options import add_command
from .parser import build_parser, dispatch

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, published as tomli
    import tomli as tomllib

STAMP_FILE = ".tl-embed-pipeline.json"
STEP_KEYS = {"name": str, "run": str, "args": list, "inputs": list, "outputs": list, "options": dict}
REQUIRED_STEP_KEYS = ("name", "run")
IGNORED_SUFFIXES = ("-wal", "-shm", "-journal")


@dataclass
class Step:
    name: str
    argv: list[str]  # the tl-embed command line, variables resolved
    inputs: list[Path]
    outputs: list[Path]
    line: int

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.argv).encode()).hexdigest()


@dataclass
class Pipeline:
    path: Path
    description: str
    variables: dict[str, str]
    steps: list[Step]
    stamp_dir: Path


def load(path: str | os.PathLike, overrides: list[str] | None = None) -> Pipeline:
    """Parse and fully validate a pipeline file; errors name the file, line and what was expected."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise TlEmbedError(f"cannot read pipeline {path}: {e.strerror}") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise TlEmbedError(f"{path}: invalid TOML: {e}") from None
    where = _Locator(path, text)
    unknown = set(doc) - {"description", "vars", "step"}
    if unknown:
        key = sorted(unknown)[0]
        raise where.error(f"unknown top-level key {key!r}; expected description, [vars] and [[step]]", key)
    variables = {k: str(v) for k, v in doc.get("vars", {}).items()}
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise TlEmbedError(f"--set takes key=value, not {item!r}")
        if key not in variables:
            raise TlEmbedError(f"--set {key}: {path} has no variable {key!r} "
                               f"(it has: {', '.join(sorted(variables))})")
        variables[key] = value
    missing = [k for k, v in variables.items() if v == ""]
    if missing:
        raise TlEmbedError(f"{path}: set " + ", ".join(f"--set {k}=..." for k in missing))
    for k in ("images", "out"):
        if k in variables:
            variables[k] = str(Path(variables[k]).expanduser())
    raw_steps = doc.get("step")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise where.error("no steps: expected one or more [[step]] tables", "[[step]]")
    steps = [_parse_step(raw, n, variables, where) for n, raw in enumerate(raw_steps)]
    names = [s.name for s in steps]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise where.error(f"two steps are named {dup!r}; step names must be unique", f'"{dup}"')
    stamp_dir = Path(variables.get("out", path.parent))
    return Pipeline(path, str(doc.get("description", "")), variables, steps, stamp_dir)


def _parse_step(raw: dict, n: int, variables: dict[str, str], where: _Locator) -> Step:
    line = where.step_line(n)
    for key in REQUIRED_STEP_KEYS:
        if key not in raw:
            raise where.at(line, f"step {n + 1} has no {key!r}; expected {key} = \"...\"")
    for key, value in raw.items():
        if key not in STEP_KEYS:
            raise where.at(where.key_line(n, key), f"step {raw['name']!r}: unknown key {key!r}; "
                           f"expected {', '.join(STEP_KEYS)}")
        if not isinstance(value, STEP_KEYS[key]):
            raise where.at(where.key_line(n, key), f"step {raw['name']!r}: {key} must be a "
                           f"{STEP_KEYS[key].__name__}, not {type(value).__name__}")

    def resolve(value) -> str:
        try:
            return str(value).format_map(variables)
        except KeyError as e:
            raise where.at(line, f"step {raw['name']!r} uses undefined variable {{{e.args[0]}}}") from None

    argv = [raw["run"], *(resolve(a) for a in raw.get("args", []))]
    for key, value in raw.get("options", {}).items():
        flag = ("-" if len(key) == 1 else "--") + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not False:
            argv += [flag, resolve(value)]
    outputs = [Path(resolve(p)) for p in raw.get("outputs", [])]
    _check_command(argv, raw["name"], where.at_factory(line))
    _check_out_folder(argv, outputs, raw["name"], where.at_factory(line))
    return Step(raw["name"], argv, [Path(resolve(p)) for p in raw.get("inputs", [])], outputs, line)


def _check_out_folder(argv: list[str], outputs: list[Path], name: str, error) -> None:
    """A step's --out folder must exist or be one that run() creates (a declared output's folder)."""
    flag = next((f for f in ("--out", "-o") if f in argv[:-1]), None)
    if flag is None:
        return
    parent = Path(argv[argv.index(flag) + 1]).expanduser().absolute().parent
    planned = [o.expanduser().absolute().parent for o in outputs]
    if not parent.is_dir() and not any(parent == f or parent in f.parents for f in planned):
        raise error(f"step {name!r}: --out: folder {parent} does not exist and is no declared output's "
                    "folder; create it or list the file under outputs")


def _check_command(argv: list[str], name: str, error) -> None:
    """Let the real CLI parser judge the step's command line, without running it."""
    parser = build_parser()  # the stage commands: a step cannot be ``run`` itself
    if argv[0] not in parser.commands:
        raise error(f"step {name!r}: unknown command {argv[0]!r}; expected a tl-embed command "
                    "(embed, train, evaluate, predict, index, search, dedup, ...)")
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            parser.parse_args(argv)
    except SystemExit:
        msg = stderr.getvalue().strip().splitlines()[-1].split("error: ", 1)[-1]
        raise error(f"step {name!r}: {msg}") from None


class _Locator:
    """Line numbers for validation messages (tomllib gives values, not positions)."""

    def __init__(self, path: Path, text: str):
        self.path = path
        self.lines = text.splitlines()
        self.step_starts = [i + 1 for i, ln in enumerate(self.lines) if ln.strip() == "[[step]]"]

    def at(self, line: int, msg: str) -> TlEmbedError:
        return TlEmbedError(f"{self.path}:{line}: {msg}")

    def at_factory(self, line: int):
        return lambda msg: self.at(line, msg)

    def error(self, msg: str, needle: str) -> TlEmbedError:
        line = next((i + 1 for i, ln in enumerate(self.lines) if needle in ln), 1)
        return self.at(line, msg)

    def step_line(self, n: int) -> int:
        return self.step_starts[n] if n < len(self.step_starts) else 1

    def key_line(self, n: int, key: str) -> int:
        start = self.step_line(n)
        end = self.step_starts[n + 1] if n + 1 < len(self.step_starts) else len(self.lines) + 1
        pattern = re.compile(rf"^\s*(\[step\.)?{re.escape(key)}\b")
        return next((i for i in range(start, end) if pattern.match(self.lines[i - 1])), start)


def signature(path: Path) -> str:
    """Fingerprint of what is under ``path``: each file's relative path, size and mtime (as DVC does).

    Adding, changing, renaming or deleting a file changes it; reading does not.  Hidden files and
    SQLite's -wal/-shm sidecars are ignored: merely reading a store touches them, while a writer's
    commits reach manifest.sqlite itself when it closes.
    """
    if not path.exists():
        raise TlEmbedError(f"input {path} does not exist")
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(
        Path(d, f) for d, dirs, fs in os.walk(path) if not dirs.sort() and not any(
            part.startswith(".") for part in Path(d).relative_to(path).parts)
        for f in fs if not f.startswith(".") and not f.endswith(IGNORED_SUFFIXES))
    for f in files:
        with contextlib.suppress(FileNotFoundError):
            st = f.stat()
            h.update(f"{f.relative_to(path) if f != path else f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _up_to_date(step: Step, stamps: dict) -> bool:
    stamp = stamps.get(step.name)
    if not stamp or stamp["key"] != step.key or not all(p.exists() for p in step.outputs):
        return False
    return stamp["inputs"] == {str(p): signature(p) for p in step.inputs}


def run(pipeline: Pipeline, dry_run: bool = False, echo=print) -> int:
    """Run the steps in order; returns the number of steps that ran."""
    stamp_path = pipeline.stamp_dir / STAMP_FILE
    stamps = json.loads(stamp_path.read_text()) if stamp_path.is_file() else {}
    ran = 0
    stale = False  # once a step runs, every later step runs too (its inputs just changed)
    for n, step in enumerate(pipeline.steps, 1):
        shown = "tl-embed " + shlex.join(step.argv)
        if not stale and _up_to_date(step, stamps):
            echo(f"[{n}/{len(pipeline.steps)}] {step.name}: skipped: up to date")
            continue
        stale = True
        if dry_run:
            echo(f"[{n}/{len(pipeline.steps)}] {step.name}: would run: {shown}")
            continue
        echo(f"[{n}/{len(pipeline.steps)}] {step.name}: {shown}")
        for p in step.outputs:
            p.parent.mkdir(parents=True, exist_ok=True)
        try:
            code = dispatch(build_parser().parse_args(step.argv))
        except WeightsUnavailableError as e:
            raise TlEmbedError(f"{e} (in a pipeline: --set weights=none)") from None
        if code:
            raise TlEmbedError(f"step {step.name!r} failed (exit status {code}); later steps not run")
        stamps[step.name] = {"key": step.key, "inputs": {str(p): signature(p) for p in step.inputs}}
        pipeline.stamp_dir.mkdir(parents=True, exist_ok=True)
        from ..files import atomic_write

        atomic_write(stamp_path, lambda f: f.write(json.dumps(stamps, indent=2).encode()))
        ran += 1
    return ran


# ------------------------------------------------------------------- run
def register_run(sub) -> None:
    p = add_command(sub, "run", "run a pipeline file (pipelines/*.toml): several commands in one",
             "Run the steps of a pipeline file in order. A step whose outputs are newer than its "
             "inputs and whose options did not change is skipped (skipped: up to date).")
    p.add_argument("pipeline", help="pipeline file, e.g. pipelines/classify-folder.toml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a pipeline variable (images=..., model=..., weights=..., out=...)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    p.set_defaults(func=cmd_run)


def cmd_run(args) -> None:
    pipe = load(args.pipeline, args.overrides)
    if pipe.description:
        print(pipe.description)
    ran = run(pipe, dry_run=args.dry_run)
    if not args.dry_run:
        print(f"pipeline {Path(args.pipeline).name}: {count(ran, 'step')} ran, "
              f"{len(pipe.steps) - ran} up to date; outputs in {pipe.stamp_dir}")
