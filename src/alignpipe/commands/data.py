"""`alignpipe data FILE [--as FAMILY] [--format F] [--recipe R --stage S] [--template T]`: what a stage would
read from a file, before any training: the format detected (and why), rows read -> kept, drops by reason
with their first line numbers, token lengths after the template (with a recipe whose tokenizer exists), and
two rows rendered through the chat template with the tokens the loss trains on marked «like this».

With `--recipe R --stage S` the stage's family, template, tokenizer and max_length are used, and FILE may be
left out to read the stage's own `data:`.
"""

from __future__ import annotations

# Heavy imports (transformers) stay inside the functions that use them: the CLI starts without them.
from pathlib import Path

from alignpipe.data import registry
from alignpipe.data.formats import DataError
from alignpipe.data.loading import as_user_error
from alignpipe.data.report import format_report, validation_report
from alignpipe.data.sources import MAX_DROPPED, prepare_data
from alignpipe.errors import AlignpipeError, terminal_safe
from alignpipe.pipeline.validate import stage_tokenizer
from alignpipe.recipe.kinds import kind_of
from alignpipe.recipe.parse import load_recipe
from alignpipe.recipe.templates import resolve_template

FAMILY_CHOICES = ("conversations", "pairs", "text", "kto", "prompts")
SHOW_CHARS = 1200  # of each rendered example


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("data", help="show how a data file is read: format, drops, two rendered examples")
    p.add_argument("file", nargs="?", help="a .jsonl/.json/.parquet/.csv/.txt/.md file or a folder of them")
    p.add_argument("--as", dest="family", choices=FAMILY_CHOICES, help="the family to read it as "
                   "(default: the stage's with --stage, else the format's own)")
    p.add_argument("--format", default="auto", help="the format (default: detected)")
    p.add_argument("--dataset", help="with FILE a LLaMA-Factory data folder: the dataset_info.json entry to read "
                   "(without it, the entries are listed)")
    p.add_argument("--recipe", help="a recipe: its chat template, and with --stage that stage's settings")
    p.add_argument("--stage", help="a stage of --recipe")
    p.add_argument("--template", default=None, help="chat template without a recipe (default chatml)")
    p.add_argument("--examples", type=int, default=2, help="rows to render (default 2)")
    p.set_defaults(func=cmd_data)


def _trained_spans(messages: list[dict], spans: list[tuple[int, int]], first: int) -> list[tuple[int, int]]:
    """The generation blocks the loss trains on: assistant turns from the `first`-th on, minus loss_weight 0."""
    turns = [m for m in messages if m["role"] == "assistant"]
    return [span for i, (span, m) in enumerate(zip(spans, turns)) if i >= first and m.get("loss_weight") != 0]


def render_marked(messages: list[dict], template: str, tools=None, first_trained: int = 0,
                  generation_prompt: bool = False) -> str:
    """The conversation as the template writes it, with the characters the loss trains on in «»."""
    from transformers.utils.chat_template_utils import render_jinja_template

    (text,), (spans,) = render_jinja_template(conversations=[messages], tools=tools, chat_template=template,
                                              return_assistant_tokens_mask=True,
                                              add_generation_prompt=generation_prompt, bos_token="", eos_token="")
    out, at = [], 0
    for start, end in _trained_spans(messages, spans, first_trained):
        out += [text[at:start], "«", text[start:end], "»"]
        at = end
    return "".join(out + [text[at:]])


def _example(row: dict, family: str, template: str) -> list[str]:
    if family == "text":
        return ["«" + row["text"] + "»"]
    if family == "conversations":
        return [render_marked(row["messages"], template, row.get("tools"))]
    if family == "prompts":
        return [render_marked(row["prompt"], template, generation_prompt=True)]
    first = sum(1 for m in row["prompt"] if m["role"] == "assistant")
    sides = [("chosen", row["chosen"]), ("rejected", row["rejected"])] if family == "pairs" else \
        [(f"label {str(row['label']).lower()}", row["completion"])]
    return [f"[{name}] " + render_marked(row["prompt"] + turns, template, first_trained=first) for name, turns in sides]


def _pick(rows: list[dict], n: int) -> list[int]:
    """The first row, then the most telling others: tool calls or untrained turns first, then the longest."""
    def interest(i):
        turns = rows[i].get("messages") or rows[i].get("prompt") or []
        special = any(m.get("tool_calls") or m.get("loss_weight") == 0 or m["role"] == "tool" for m in turns)
        return (special, len(turns), len(str(rows[i])))
    rest = sorted(range(1, len(rows)), key=interest, reverse=True)
    return ([0] + rest)[: max(0, n)]


def list_registry(folder: Path, written: str) -> int:
    """A LLaMA-Factory data folder's entries: those whose file is here one a line (what each reads), then the
    names of the others by why they are not read here (file missing, hub dataset, other source)."""
    rows = registry.listing(folder, written)
    here = [r for r in rows if r["present"]]
    print(f"{written}: LLaMA-Factory data folder, {len(rows)} entries in {registry.INFO_FILE}, {len(here)} with "
          "their file here (read one: data: {dataset: NAME, dataset_dir: ...}; alignpipe data FOLDER --dataset NAME)")
    width = max((len(r["name"]) for r in here), default=4)
    for r in here:
        print(terminal_safe(f"  {r['name']:<{width}}  {r['formatting']:<8}  {r['rows']:<13}  {r['source']}"))
    groups = (("file missing here", [r for r in rows if r["present"] is False]),
              ("hub datasets (downloaded when a stage runs)", [r for r in rows if r["where"] == "hub"]),
              ("not read by alignpipe (ModelScope, scripts, cloud files)", [r for r in rows if r["where"] == "not read"]))
    for what, group in groups:
        if group:
            print(terminal_safe(f"  {len(group)} {what}: {', '.join(r['name'] for r in group)}"))
    return 0


def _file_spec(args) -> dict | None:
    if not args.file:
        return None
    if args.dataset:
        return {"dataset": args.dataset, "dataset_dir": args.file}
    return {"path": args.file, "format": args.format}


def cmd_data(args) -> int:
    recipe = tokenizer = max_length = None
    if args.file and not args.dataset and Path(args.file).is_dir() and registry.is_registry(Path(args.file)):
        try:
            return list_registry(Path(args.file), args.file)
        except DataError as err:
            raise as_user_error(err, args.file) from None
    spec = _file_spec(args)
    family, key, base = args.family, "data", Path.cwd()
    if args.stage and not args.recipe:
        raise AlignpipeError("--stage needs --recipe", key="--stage", fix="add --recipe RECIPE.yaml")
    if args.recipe:
        recipe = load_recipe(args.recipe)
        if args.stage:
            if args.stage not in recipe.stages:
                raise AlignpipeError(f"no stage named {args.stage!r}", where=args.recipe, key="--stage",
                                     fix=f"choose from {', '.join(recipe.stages)}")
            cfg = recipe.stages[args.stage]
            family = family or kind_of(cfg.kind).family
            key = f"stages.{args.stage}.data"
            if spec is None:
                spec, base = dict(cfg.data), recipe.path.parent
                if "embedded" in spec:
                    raise AlignpipeError("this stage reads the embedded world, not a file", where=args.recipe,
                                         key=key, fix="give FILE to see how it would be read")
            tokenizer, _ = stage_tokenizer(recipe, args.stage)
            max_length = cfg.trainer.get("max_length", kind_of(cfg.kind).max_length)
    if spec is None:
        raise AlignpipeError("no data to read", key="FILE", fix="give a FILE, or --recipe R --stage S")
    template = resolve_template(args.template or (recipe.chat_template if recipe else "chatml"),
                                recipe.path if recipe else None)
    if template is None:
        template = getattr(tokenizer, "chat_template", None)
    where = args.recipe or str(spec.get("path") or spec.get("dataset_dir") or "")
    try:
        data = prepare_data({**spec, "max_dropped": 1.0}, base, family, key=key)
        if family is None:  # the format's own family, read as a stage of that family reads it (same drops)
            family = data.parts[0].family
            data = prepare_data({**spec, "max_dropped": 1.0}, base, family, key=key)
        report = validation_report(data, tokenizer, max_length, sample=2000)
    except DataError as err:
        raise as_user_error(err, where) from None
    print(terminal_safe(format_report(report)))
    limit = spec.get("max_dropped", MAX_DROPPED)
    if report["rows_read"] and report["rows_dropped"] / report["rows_read"] > limit:
        print(f"  a stage would stop here: {report['rows_dropped'] / report['rows_read']:.1%} of the rows are "
              f"dropped, more than max_dropped {limit:g} (set data.max_dropped to accept more)")
    if report["tokens"] is None and data.family != "text":
        print("  tokens: not measured (give --recipe R --stage S whose tokenizer exists)")
    if template is None and data.family != "text":
        print("  examples: not rendered (no chat template)")
        return 0
    if args.examples <= 0:
        return 0
    print("examples («...» is what the loss trains on):")
    for i in _pick(data.rows, args.examples):
        part, number = next((p, p.row_numbers[j]) for p in data.parts for j in range(len(p.rows))
                            if p.rows[j] is data.rows[i]) if data.mixture is None else (data.parts[0], "?")
        print(terminal_safe(f"--- {part.source} {part.unit} {number}"))
        for text in _example(data.rows[i], data.family, template):
            more = len(text) - SHOW_CHARS  # a file's text: escape what a terminal would act on
            print(terminal_safe(text[:SHOW_CHARS]) + (f" [... {more} more characters]" if more > 0 else ""))
    return 0
