"""`alignpipe chat runs/<name>/<stage>`: talk to a stage's model in the terminal, tokens streamed as they
are generated. `alignpipe generate runs/<name>/<stage> --in prompts.jsonl --out out.jsonl`: the same
model on a batch of prompts.

The model is the stage's checkpoint (a LoRA stage: its base with the adapter merged, as
`modeling.load_stage_model` loads it); the conversation is rendered with the chat template saved in the
checkpoint's tokenizer, which is the recipe's template that the stage trained with.
"""

from __future__ import annotations

# Heavy imports (torch, transformers) stay inside the functions that use them: the CLI starts without them.
import json
from pathlib import Path

from alignpipe.errors import AlignpipeError, terminal_safe
from alignpipe.models.tool_chat import generate_with_tools, stage_tools, tool_chat
from alignpipe.models.stage_model import cut, load_stage, stop_ids
from alignpipe.runtime.threads import set_threads


def add_parser(subparsers) -> None:
    def sampling(p):
        p.add_argument("stage_dir", help="a stage folder, runs/<recipe name>/<stage>")
        p.add_argument("--max-new-tokens", type=int, default=64)
        p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy decoding")
        p.add_argument("--top-p", type=float, default=1.0)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--system", default=None, help="a system message to start every conversation with")
        p.add_argument("--tools", nargs="+", default=None, metavar="MODULE:FUNCTION",
                       help="tools to execute when the model calls them (default: the stage's recipe `tools:`)")
        code_flags(p)

    p = subparsers.add_parser("chat", help="chat with a stage's model in the terminal (streaming)")
    sampling(p)
    p.set_defaults(func=cmd_chat)

    p = subparsers.add_parser("generate", help="answer a JSONL file of prompts with a stage's model")
    sampling(p)
    p.add_argument("--in", dest="inp", required=True,
                   help='JSONL, one {"prompt": "..."} or {"messages": [...]} per line')
    p.add_argument("--out", required=True, help="JSONL out: each input row plus response, tokens, ended")
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(func=cmd_generate)


def code_flags(p) -> None:
    """The only ways a command that loads a stage's model runs code from it: the run folder cannot say so."""
    p.add_argument("--trust-remote-code", action="store_true",
                   help="import the model folder's own Python (config auto_map); only for folders you trust")
    p.add_argument("--allow-pickle", action="store_true",
                   help="load .bin/.pt weights (pickle can run code); only for folders you trust")


def generation_kwargs(args, tokenizer, stops: list[int]) -> dict:
    sample = args.temperature > 0
    kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=sample, eos_token_id=stops,
                  pad_token_id=tokenizer.pad_token_id)
    if sample:
        kwargs.update(temperature=args.temperature, top_p=args.top_p, top_k=0)
    return kwargs


def render(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# --- chat ---------------------------------------------------------------------------------------


def safe_streamer():
    """transformers' TextStreamer that writes a model's control bytes (ESC, BEL, bidi overrides) as escapes: a
    reply cannot move the cursor, clear the screen or retitle the window."""
    from transformers import TextStreamer

    class SafeStreamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            print(terminal_safe(text), flush=True, end="" if not stream_end else None)

    return SafeStreamer


def cmd_chat(args) -> int:
    import torch

    SafeStreamer = safe_streamer()
    set_threads()
    model, tokenizer, manifest = load_stage(Path(args.stage_dir), args)
    stops = stop_ids(tokenizer, manifest)
    tools = stage_tools(args, manifest)
    if tools:  # each call and its result shown (models/tool_chat.py)
        return tool_chat(args, model, tokenizer, tools, stops)
    gen = generation_kwargs(args, tokenizer, stops)
    limit = getattr(model.config, "max_position_embeddings", None) or 4096
    torch.manual_seed(args.seed)
    dev = next(model.parameters()).device
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    print(f"[alignpipe] chatting with {args.stage_dir} ({manifest.get('kind')}); /reset starts over, "
          "/quit or Ctrl-D ends", flush=True)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            break
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            messages = list(start)
            print("(conversation cleared)")
            continue
        messages.append({"role": "user", "content": line})
        ids = tokenizer(render(tokenizer, messages), add_special_tokens=False)["input_ids"]
        # the model has a fixed context: forget the oldest exchanges first
        while len(ids) + args.max_new_tokens > limit and len(messages) - len(start) > 1:
            del messages[len(start): len(start) + 2]
            ids = tokenizer(render(tokenizer, messages), add_special_tokens=False)["input_ids"]
        if len(ids) + args.max_new_tokens > limit:
            messages.pop()
            print(f"(that message is too long for the model's {limit}-token context)")
            continue
        print("assistant> ", end="", flush=True)
        streamer = SafeStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        input_ids = torch.tensor([ids], device=dev)
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer,
                                 **gen)
        reply, _ = cut(out[0, len(ids):].tolist(), stops)
        text = tokenizer.decode(reply, skip_special_tokens=True).strip()
        if not text:  # say it, rather than leave a blank screen
            print(f"(the reply was empty or whitespace only: {len(reply)} tokens)")
        messages.append({"role": "assistant", "content": text})
    return 0


# --- generate -----------------------------------------------------------------------------------


def read_prompts(path: Path) -> list[dict]:
    if not path.is_file():
        raise AlignpipeError("prompts file not found", where=str(path), fix='give a JSONL file of {"prompt": ...}')
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise AlignpipeError(f"not JSON: {err.msg}", where=f"{path}:{n}", fix="one JSON object per line") from None
        turns = row.get("turns") if isinstance(row, dict) else None
        ok = isinstance(row, dict) and (isinstance(row.get("prompt"), str) or isinstance(row.get("messages"), list)
                                        or (isinstance(turns, list) and turns and all(isinstance(t, str) for t in turns)))
        if not ok:
            raise AlignpipeError('expected {"prompt": "..."}, {"messages": [...]} or {"turns": ["...", ...]}',
                                 where=f"{path}:{n}", fix="give each line a prompt string, a list of chat messages, "
                                                          "or a list of user turns (MT-Bench style)")
        rows.append(row)
    return rows


def answer(model, tokenizer, conversations: list[list[dict]], gen: dict, stops: list[int]) -> list[dict]:
    """One assistant reply per conversation, batched and left-padded: response text, tokens, ended."""
    import torch

    dev = next(model.parameters()).device
    texts = [render(tokenizer, c) for c in conversations]
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**{k: v.to(dev) for k, v in enc.items()}, **gen)
    replies = []
    for ids in out[:, enc["input_ids"].shape[1]:].tolist():
        reply, ended = cut(ids, stops)
        reply = [t for t in reply if t != tokenizer.pad_token_id]
        text = tokenizer.decode(reply, skip_special_tokens=True)
        row = {"response": text.strip(), "tokens": len(reply) + ended, "ended": ended}
        if not row["response"]:  # whitespace only (or nothing): said, with what was generated
            row.update(empty=True, raw_response=text)
        replies.append(row)
    return replies


def cmd_generate(args) -> int:
    """Each row's reply. A `turns` row (MT-Bench) is answered turn by turn, each reply joining the
    conversation before the next turn: `responses` holds them all, `response` the last."""
    import torch

    set_threads()
    rows = read_prompts(Path(args.inp))
    model, tokenizer, manifest = load_stage(Path(args.stage_dir), args)
    stops = stop_ids(tokenizer, manifest)
    tools = stage_tools(args, manifest)
    if tools:
        torch.manual_seed(args.seed)
        done = generate_with_tools(args, model, tokenizer, [r for r in rows if "turns" not in r], tools, stops)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in done))
        print(f"{args.out}: {len(done)} responses from {args.stage_dir}, tools {', '.join(tools)}"
              + (f"; {len(rows) - len(done)} `turns` rows skipped (not with tools)" if len(done) < len(rows) else ""))
        return 0
    gen = generation_kwargs(args, tokenizer, stops)
    system = [{"role": "system", "content": args.system}] if args.system else []
    torch.manual_seed(args.seed)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    empty = 0
    with open(out_path, "w") as fh:
        for start in range(0, len(rows), args.batch_size):
            chunk = rows[start: start + args.batch_size]
            turns = [r["turns"] if "turns" in r else [r] for r in chunk]
            history = [list(system) for _ in chunk]
            replies: list[list[dict]] = [[] for _ in chunk]
            for k in range(max(len(t) for t in turns)):  # turn k of every row that has one, in one batch
                todo = [i for i, t in enumerate(turns) if k < len(t)]
                for i in todo:
                    row = turns[i][k]
                    history[i] += (row["messages"] if isinstance(row, dict) and "messages" in row else
                                   [{"role": "user", "content": row["prompt"] if isinstance(row, dict) else row}])
                for i, reply in zip(todo, answer(model, tokenizer, [history[i] for i in todo], gen, stops)):
                    history[i].append({"role": "assistant", "content": reply["response"]})
                    replies[i].append(reply)
            for row, got in zip(chunk, replies):
                extra = ({"responses": [g["response"] for g in got], "tokens_per_turn": [g["tokens"] for g in got],
                          "ended_per_turn": [g["ended"] for g in got]} if "turns" in row else {})
                fh.write(json.dumps({**row, **got[-1], **extra}) + "\n")
                empty += bool(got[-1].get("empty"))
    blank = (f"; {empty} of them empty or whitespace only (\"empty\": true, the generated text in raw_response)"
             if empty else "")
    print(f"{out_path}: {len(rows)} responses from {args.stage_dir}{blank}")
    return 0
