"""Where a stage's rows come from: local files, a folder of them, the Hugging Face hub, or a weighted mixture.

A stage's `data:` spec is one of

    {path: data/x.jsonl, format: auto, split: train}   # .jsonl .json .parquet .csv .txt .md, or a folder
    {hub: HuggingFaceH4/ultrafeedback_binarized, split: train_prefs, subset: null, format: auto}
    {mixture: [{path: a.jsonl, weight: 0.7}, {hub: ..., weight: 0.3}], n: 1000, seed: 0}

with, on a source (or a mixture entry), `columns:` mapping alignpipe's column names to the file's
(`{prompt: question, response: answer}`, `{chosen: good, rejected: bad}`, message tags such as
`{role_tag: from, content_tag: value, user_tag: human}`, as LLaMA-Factory's dataset_info does), and on
the spec `max_dropped:` (default 0.05), the share of rows that may be dropped before the stage stops.

`prepare_data` loads it, normalises every file to the family the stage needs, and mixes.
"""

from __future__ import annotations

# Heavy imports (pyarrow, datasets) stay inside the functions that use them: the CLI starts without them.
import csv
import json
import os
import random
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from alignpipe.data import registry
from alignpipe.data.formats import BadLine, DataError, NormalisedData, normalise
from alignpipe.data.screening import check_screen, screen_part

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt", ".md")
SOURCE_KEYS = {"path", "hub", "format", "split", "subset", "columns", "max_dropped", "screen"}
MIXTURE_KEYS = {"mixture", "n", "seed", "max_dropped"}
SOURCES = ("embedded", "path", "hub", "dataset", "mixture", "from")  # a data spec names exactly one (from: a label stage)
MAX_DROPPED = 0.05
TEXT_DOC_CHARS = 20_000  # a plain-text document longer than this is cut (at a line end where there is one)
# columns: alignpipe's names a map may use; `response` is `completion`. Tags rename keys / roles inside messages.
COLUMN_NAMES = {"text", "instruction", "input", "output", "system", "history", "conversations", "messages",
                "prompt", "completion", "response", "chosen", "rejected", "chosen_messages", "rejected_messages",
                "label", "tools"}
TAGS = {"role_tag": "role", "content_tag": "content"}
ROLE_TAGS = {"user_tag": "user", "assistant_tag": "assistant", "system_tag": "system", "observation_tag": "tool",
             "function_tag": "function_call"}


@dataclass
class RawRows:
    """The rows of one file (or hub split) as read, before any format is applied."""

    source: str  # path as written in the recipe (plus the file, for a folder), or hub id[split]
    rows: list
    row_numbers: list[int]  # 1-based; file lines for .jsonl/.csv, record indices otherwise
    unit: str  # "line" or "row"


@dataclass
class PreparedData:
    """A stage's rows, ready for `datasets.Dataset.from_list`, and how they were obtained."""

    family: str
    rows: list[dict]
    parts: list[NormalisedData]  # one per file / hub split read, in order
    mixture: list[dict] | None = None  # per component: source, weight, available, taken, upsampled


# --------------------------------------------------------------------------- reading files


def _read_jsonl(path: Path, name: str) -> RawRows:
    rows, numbers = [], []
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:  # listed with the other bad rows, not alone and first
                rows.append(BadLine("invalid_json", f"invalid JSON: {e.msg} at column {e.colno}"))
            except RecursionError:  # thousands of nested brackets: no row of any format is that deep
                rows.append(BadLine("invalid_json", "invalid JSON: nested too deeply"))
            numbers.append(number)
    return RawRows(name, rows, numbers, "line")


def _read_text(path: Path, name: str) -> RawRows:
    """Plain text (.txt, .md) as `{"text": document}` rows: documents are separated by blank lines, or, in a
    file without blank lines, are its lines; a document over TEXT_DOC_CHARS is cut, at line ends if it can."""
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    blank = any(not line.strip() for line in lines)
    docs, start, current = [], None, []

    def close():
        nonlocal start, current
        if current:
            docs.append((start, "\n".join(current)))
        start, current = None, []

    for number, line in enumerate(lines, start=1):
        if not line.strip():
            close()
            continue
        if start is None:
            start = number
        if current and (not blank or sum(len(c) + 1 for c in current) + len(line) > TEXT_DOC_CHARS):
            close()
            start = number
        while len(line) > TEXT_DOC_CHARS:  # one very long line: cut at the last space within the limit
            cut = line.rfind(" ", 0, TEXT_DOC_CHARS)
            cut = cut if cut > 0 else TEXT_DOC_CHARS
            current.append(line[:cut])
            close()
            start, line = number, line[cut:].lstrip()
        current.append(line)
    close()
    return RawRows(name, [{"text": text} for _, text in docs], [n for n, _ in docs], "line")


def _read_json(path: Path, name: str) -> RawRows:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        hint = "it looks like JSON Lines: rename it to .jsonl" if e.msg == "Extra data" else "fix the file"
        raise DataError(name, f"line {e.lineno} column {e.colno}", f"invalid JSON: {e.msg}", hint) from None
    except RecursionError:
        raise DataError(name, "top level", "invalid JSON: nested too deeply", "fix the file") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(name, "top level", f"a JSON {type(data).__name__}",
                        'expected a list of objects or {"data": [...]}')
    return RawRows(name, data, list(range(1, len(data) + 1)), "row")


def _csv_cell(value: str):
    # Message lists in a CSV can only be JSON text; decode those, leave every other cell a string.
    if value.startswith("[{"):
        try:
            decoded = json.loads(value)
            if isinstance(decoded, list) and all(isinstance(m, dict) for m in decoded):
                return decoded
        except (json.JSONDecodeError, RecursionError):
            pass
    return value


def _read_csv(path: Path, name: str) -> RawRows:
    csv.field_size_limit(1 << 30)  # the default 128 KiB per cell is too small for long documents
    rows, numbers = [], []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise DataError(name, "line 1", "no header row", "the first line must name the columns")
        for row in reader:
            rows.append({k: _csv_cell(v) if isinstance(v, str) else v for k, v in row.items()})
            numbers.append(reader.line_num)  # the line the row ends on: right for all but multi-line cells
    return RawRows(name, rows, numbers, "line")


def _read_parquet(path: Path, name: str) -> RawRows:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several unrelated types for a damaged file
        raise DataError(name, "file", f"cannot read parquet ({type(e).__name__}: {e})", "re-export the file") from None
    return RawRows(name, rows, list(range(1, len(rows) + 1)), "row")


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet,
            ".txt": _read_text, ".md": _read_text}


def read_file(path: Path, name: str | None = None) -> RawRows:
    """Rows of one .jsonl / .json / .parquet / .csv / .txt / .md file; `name` is how messages refer to it."""
    name = name or str(path)
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(name, "file", f"unsupported file type {path.suffix!r}", f"use one of {', '.join(SUFFIXES)}")
    try:
        return reader(path, name)
    except UnicodeDecodeError as e:
        raise DataError(name, f"byte {e.start}", "not UTF-8 text", "re-save the file as UTF-8") from None


def _read_saved_dataset(folder: Path, name: str, split: str | None) -> RawRows:
    """A folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    import datasets

    ds = datasets.load_from_disk(str(folder))
    if isinstance(ds, datasets.DatasetDict):
        split = split or "train"
        if split not in ds:
            raise DataError(name, f"split {split}", "no such split", f"use one of {', '.join(ds)}")
        ds = ds[split]
    rows = ds.to_list()
    return RawRows(name, rows, list(range(1, len(rows) + 1)), "row")


def _read_folder(folder: Path, name: str, split: str | None) -> list[RawRows]:
    if registry.is_registry(folder):  # LLaMA-Factory's data folder: its entries are named, not read together
        names = list(registry.read_registry(folder, name))
        raise DataError(name, "path", f"is a LLaMA-Factory data folder ({registry.INFO_FILE}, {len(names)} entries), "
                        "not one dataset", f"name an entry: {{dataset: {names[0] if names else 'NAME'}, dataset_dir: "
                        f"{name}}} (alignpipe data {name} lists them)")
    if (folder / "dataset_info.json").exists() or (folder / "dataset_dict.json").exists():
        return [_read_saved_dataset(folder, name, split)]
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES and not p.name.startswith("."))
    # Hub-style folders name files by split (train.jsonl, test-00000-of-00001.parquet); a folder
    # without split names is all one split.
    if split:
        matching = [p for p in files if p.name.startswith(split)]
        if matching or split != "train":
            files = matching
    if not files:
        want = f" for split {split!r}" if split else ""
        raise DataError(name, "folder", f"no {'/'.join(SUFFIXES)} files{want}",
                        "point path: at a data file or a folder of them")
    return [read_file(p, f"{name}/{p.relative_to(folder)}") for p in files]


# --------------------------------------------------------------------------- the hub


def offline_setting() -> str | None:
    """The environment variable that puts the hub client in offline (cache-only) mode, if one is set."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}:
            return var
    return None


def probe_hub() -> str | None:
    """Why the hub cannot be reached, or None. Without this, a machine with no internet spends ~25 s
    in the hub client's retries before failing."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # behind a proxy a direct probe proves nothing; let the hub client try
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError as e:
        return f"cannot connect to {host} ({e})"
    return None


def _read_hub(hub: str, subset: str | None, split: str, key: str) -> RawRows:
    name = f"{hub}[{split}]"
    offline = offline_setting()
    unreachable = None if offline else probe_hub()
    if unreachable:
        raise DataError(name, f"{key}.hub", f"the Hugging Face hub is not reachable: {unreachable}",
                        f"use a local file ({key}.path), or set HF_HUB_OFFLINE=1 if this dataset is already cached")
    import datasets

    try:
        ds = datasets.load_dataset(hub, subset, split=split)
    except ConnectionError as e:
        if offline:  # offline mode only looks in the local cache: the dataset is not there
            raise DataError(name, f"{key}.hub", f"the Hugging Face hub is not reachable ({offline} is set) "
                            "and this dataset is not in the local cache",
                            f"use a local file ({key}.path), or unset {offline} on a connected machine "
                            "to download it first") from None
        raise DataError(name, f"{key}.hub", f"the Hugging Face hub is not reachable ({e})",
                        f"use a local file ({key}.path), or set HF_HUB_OFFLINE=1 if it is already cached") from None
    except Exception as e:  # not found, gated, bad subset or split: datasets uses many exception types
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(name, f"{key}.hub", f"cannot load ({type(e).__name__}: {first_line})",
                        f"check {key}.hub, {key}.subset and {key}.split") from None
    rows = ds.to_list()
    return RawRows(name, rows, list(range(1, len(rows) + 1)), "row")


# --------------------------------------------------------------------------- specs


def _check_keys(spec: dict, allowed: set[str], key: str) -> None:
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise DataError("recipe", key, f"unknown key {unknown[0]!r}", f"use one of {', '.join(sorted(allowed))}")


def check_one_source(spec: dict, key: str) -> None:
    """A data spec names one source: `embedded`, `path`, `hub` or `mixture`. A `--set ...data.path=` onto a
    recipe whose stage has `embedded:` would otherwise leave the path silently unused."""
    named = [k for k in SOURCES if k in spec]
    if len(named) > 1:
        raise DataError("recipe", key, f"names two sources, {named[0]} and {named[1]}; a data spec has one of "
                        f"{', '.join(SOURCES)}",
                        f"keep one; from the command line, replace the whole mapping: --set '{key}={{path: my.jsonl}}'")


def apply_columns(raw: RawRows, columns: dict, key: str) -> RawRows:
    """Rename a file's columns (and keys / role names inside its messages) to the ones alignpipe reads."""
    if not isinstance(columns, dict) or not all(isinstance(v, str) for v in columns.values()):
        raise DataError("recipe", f"{key}.columns", "must map names to column names",
                        "e.g. columns: {prompt: question, response: answer}")
    unknown = sorted(set(columns) - COLUMN_NAMES - set(TAGS) - set(ROLE_TAGS))
    if unknown:
        raise DataError("recipe", f"{key}.columns.{unknown[0]}", "is not a column alignpipe reads",
                        f"use {', '.join(sorted(COLUMN_NAMES | set(TAGS) | set(ROLE_TAGS)))}")
    present = {k for row in raw.rows[:1000] if isinstance(row, dict) for k in row}
    renames = {("completion" if ours == "response" else ours): theirs for ours, theirs in columns.items()
               if ours in COLUMN_NAMES}
    for ours, theirs in renames.items():
        if theirs not in present:
            raise DataError(raw.source, f"{key}.columns.{ours}", f"column {theirs!r} is not in the file; its "
                            f"columns are {', '.join(sorted(present)) or 'none'}",
                            f"map {ours} to one of those columns")
    keys = {theirs: ours for ours, theirs in ((TAGS[t], v) for t, v in columns.items() if t in TAGS)}
    roles = {v: ROLE_TAGS[t] for t, v in columns.items() if t in ROLE_TAGS}

    def message(m):
        if not isinstance(m, dict):
            return m
        m = {keys.get(k, k): v for k, v in m.items()}
        role_key = "role" if "role" in m else "from" if "from" in m else None
        if role_key and m[role_key] in roles:
            m[role_key] = roles[m[role_key]]
        return m

    def row(r):
        if not isinstance(r, dict):
            return r
        out = {k: v for k, v in r.items() if k not in renames.values()}
        out.update({ours: r[theirs] for ours, theirs in renames.items() if theirs in r})
        if keys or roles:
            for name in ("messages", "conversations", "chosen", "rejected", "chosen_messages", "rejected_messages",
                         "prompt", "completion"):
                v = out.get(name)
                if isinstance(v, list):
                    out[name] = [message(m) for m in v]
                elif isinstance(v, dict):
                    out[name] = message(v)
        return out

    return RawRows(raw.source, [row(r) for r in raw.rows], raw.row_numbers, raw.unit)


def load_rows(spec: dict, base_dir: Path, key: str = "data") -> list[RawRows]:
    """Read a `{path: ...}` or `{hub: ...}` spec: one RawRows per file read (a folder gives several).

    `key` is where the spec sits in the recipe (e.g. "stages.sft.data"), for error messages; relative
    paths are resolved against `base_dir`.
    """
    _check_keys(spec, SOURCE_KEYS, key)
    if ("path" in spec) == ("hub" in spec):
        raise DataError("recipe", key, "needs exactly one of path: or hub:", "e.g. {path: data/train.jsonl}")
    if "hub" in spec:
        return [_read_hub(str(spec["hub"]), spec.get("subset"), spec.get("split") or "train", key)]
    written = str(spec["path"])
    path = Path(written).expanduser()
    path = path if path.is_absolute() else Path(base_dir) / path
    if not path.exists():
        raise DataError(written, f"{key}.path", "no such file or folder",
                        "check the path" if Path(written).expanduser().is_absolute() else
                        f"relative paths are resolved against {base_dir}")
    if path.is_dir():
        return _read_folder(path, written, spec.get("split"))
    return [read_file(path, written)]


def _normalise_source(spec: dict, base_dir: Path, family: str, key: str) -> list[NormalisedData]:
    fmt = spec.get("format") or "auto"
    raws = load_rows(spec, base_dir, key)
    if spec.get("columns") is not None:
        raws = [apply_columns(raw, spec["columns"], key) for raw in raws]
    screen = check_screen(spec.get("screen"), key)
    parts = [normalise(raw.rows, fmt, source=raw.source, row_numbers=raw.row_numbers, family=family, unit=raw.unit)
             for raw in raws]
    for part in parts:  # planted triggers and likely secrets (alignpipe.data.screening)
        screen_part(part, screen)
    return parts


def check_dropped(parts: list[NormalisedData], spec: dict, key: str) -> None:
    """Stop when more than `max_dropped` of the rows read were dropped (the message says by what)."""
    limit = spec.get("max_dropped", MAX_DROPPED)
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not 0 <= limit <= 1:
        raise DataError("recipe", f"{key}.max_dropped", f"{limit!r} is not a share between 0 and 1",
                        "e.g. max_dropped: 0.1")
    read, dropped = sum(p.rows_read for p in parts), sum(p.drops.total for p in parts)
    if read and dropped / read > limit:
        worst = max(parts, key=lambda p: p.drops.total)
        raise DataError(worst.source, key, f"{dropped} of {read} rows dropped ({dropped / read:.1%}), more than "
                        f"max_dropped {limit:g}: {worst.drops.summary(worst.unit)}",
                        f"fix those rows, or accept more: --set {key}.max_dropped={min(1.0, dropped / read + 0.01):.2f}")


def _counts(weights: list[float], available: list[int], n: int | None) -> list[int]:
    """Rows to take from each component.

    With `n`: n in total, split by weight (largest remainder), repeating a component's rows when it has
    too few. Without: the largest total whose split by weight needs no component to repeat a row.
    """
    shares = [w / sum(weights) for w in weights]
    if n is None:
        total = min(a / s for a, s in zip(available, shares))
        return [int(total * s + 1e-9) for s in shares]
    exact = [n * s for s in shares]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    return counts


def _take(rows: list, count: int, rng: random.Random) -> list[int]:
    """`count` indices into rows: without repeats while it can, then whole extra passes."""
    full, rest = divmod(count, len(rows))
    return [i for _ in range(full) for i in range(len(rows))] + rng.sample(range(len(rows)), rest)


def prepare_data(spec: dict, base_dir: Path, family: str, *, key: str = "data", seed: int = 0) -> PreparedData:
    """Load a stage's data spec and return rows of `family`, plus what was read and dropped on the way.

    A mixture is sampled with `random.Random(spec.get("seed", seed))`, then shuffled: same spec and seed,
    same rows in the same order.
    """
    check_one_source(spec, key)
    spec = registry.expand(spec, base_dir, key)  # LLaMA-Factory's `dataset:` names -> the files they name
    if "mixture" not in spec:
        parts = _normalise_source(spec, base_dir, family, key)
        check_dropped(parts, spec, key)
        return PreparedData(family, [row for part in parts for row in part.rows], parts)

    _check_keys(spec, MIXTURE_KEYS, key)
    components = spec["mixture"]
    if not isinstance(components, list) or not components:
        raise DataError("recipe", f"{key}.mixture", "must be a non-empty list", "e.g. [{path: a.jsonl, weight: 1}]")
    n = spec.get("n")
    if n is not None and (not isinstance(n, int) or n < 1):
        raise DataError("recipe", f"{key}.n", f"{n!r} is not a positive integer", "set the total rows to draw")
    parts, pools, weights = [], [], []
    for i, component in enumerate(components):
        where = f"{key}.mixture[{i}]"
        component = dict(component)
        weight = component.pop("weight", None)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight <= 0:
            raise DataError("recipe", f"{where}.weight", f"{weight!r} is not a positive number",
                            "give each component a weight > 0")
        component.pop("max_dropped", None)  # the spec's limit counts every component's rows together
        these = _normalise_source(component, base_dir, family, where)
        parts += these
        pools.append([row for part in these for row in part.rows])
        weights.append(float(weight))

    check_dropped(parts, spec, key)
    rng = random.Random(spec.get("seed", seed))
    counts = _counts(weights, [len(p) for p in pools], n)
    rows, mixture = [], []
    for component, pool, weight, count in zip(components, pools, weights, counts):
        rows += [pool[i] for i in _take(pool, count, rng)]
        source = component.get("path") or component.get("hub")
        mixture.append({"source": str(source), "weight": weight, "available": len(pool), "taken": count,
                        "upsampled": count > len(pool)})
    rng.shuffle(rows)
    if not rows:
        raise DataError("recipe", f"{key}.mixture", "the weights leave no rows to take", "raise n or the weights")
    return PreparedData(family, rows, parts, mixture)
