"""OpenAssistant conversation trees -> conversations (SFT) or preference pairs (reward, DPO).

Two shapes: oasst1's flat rows (one message per row, linked by `message_id` / `parent_id`, sibling replies
ordered by `rank`, 0 best) and the nested export (`{message_tree_id, prompt: {text, role, replies: [...]}}`).

- conversations: from each root, the best-ranked assistant reply at each step and every user follow-up;
  one conversation per path that ends in an assistant reply (its prefixes are not repeated).
- pairs: at each user turn on those paths with two or more ranked replies, the best against each other.

Messages no output uses are counted: deleted ones, orphans (their parent is not in the file), the replies
under them are drops; user turns nobody answered and lower-ranked replies are notes (by design: SFT
takes the best reply; the others are what the pairs are made of).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from alignpipe.data.messages import Drop


@dataclass
class _Node:
    id: str
    parent: str | None
    role: str  # user | assistant
    text: str
    rank: float
    number: int  # the row (line) it came from
    children: list["_Node"] = field(default_factory=list)


def _node(raw: dict, number: int, parent: str | None) -> _Node:
    role = {"prompter": "user", "assistant": "assistant"}.get(raw.get("role"))
    if role is None:
        raise Drop("unknown_role", f"message {raw.get('message_id')} has role {raw.get('role')!r}")
    text = raw.get("text")
    if not isinstance(text, str):
        raise Drop("wrong_type", f"message {raw.get('message_id')} has no text")
    rank = raw.get("rank")
    return _Node(str(raw.get("message_id")), parent, role, text, float("inf") if rank is None else float(rank), number)


def flatten_tree(tree: dict, number: int) -> list[tuple[dict, int]]:
    """A nested export row -> flat message rows (each with `parent_id`), all numbered by the tree's row."""
    root = tree.get("prompt")
    if not isinstance(root, dict):
        raise Drop("wrong_type", "'prompt' is not a message with replies")
    out, stack = [], [(root, None)]
    while stack:
        msg, parent = stack.pop()
        out.append(({**msg, "parent_id": parent, "replies": None}, number))
        stack += [(r, msg.get("message_id")) for r in reversed(msg.get("replies") or [])]
    return out


def _paths(root: _Node):
    """(path, node) for every node on the best-ranked paths: best assistant reply, every user follow-up."""
    stack = [([root], root)]
    while stack:
        path, node = stack.pop()
        yield path, node
        kids = node.children
        if node.role == "user":
            kids = sorted(kids, key=lambda n: n.rank)[:1]
        stack += [(path + [k], k) for k in reversed(kids)]


def _messages(path: list[_Node]) -> list[dict]:
    return [{"role": n.role, "content": n.text} for n in path]


def normalise_messages(flat: list[tuple[dict, int]], family: str, drops) -> tuple[list[dict], list[int], list[str], int]:
    """Flat message rows (with their row numbers) -> rows of `family`, their row numbers, notes, messages read."""
    nodes, bad = {}, set()
    for raw, number in flat:
        try:
            if raw.get("deleted"):
                raise Drop("deleted", f"message {raw.get('message_id')} is marked deleted")
            node = _node(raw, number, raw.get("parent_id"))
            nodes[node.id] = node
        except Drop as drop:
            drops.add(drop.reason, number, drop.detail)
            bad.add(str(raw.get("message_id")))
    roots = []
    for node in nodes.values():
        if node.parent is None:
            roots.append(node)
        elif node.parent in nodes:
            nodes[node.parent].children.append(node)
    # orphans and the replies under dropped messages: counted once each
    orphaned = set()
    for node in [n for n in nodes.values() if n.parent is not None and n.parent not in nodes]:
        stack = [node]
        while stack:
            n = stack.pop()
            orphaned.add(n.id)
            reason = "parent_dropped" if n.parent in bad or n.parent in orphaned - {n.id} else "orphan"
            drops.add(reason, n.number, f"message {n.id}: its parent {n.parent} is "
                      + ("dropped" if reason == "parent_dropped" else "not in the file"))
            stack += n.children

    rows, numbers, used = [], [], set()
    for root in roots:
        if root.role != "user":
            drops.add("bad_root", root.number, f"tree {root.id} starts with an assistant message")
            continue
        for path, node in _paths(root):
            if family == "pairs" and node.role == "user":
                ranked = sorted((k for k in node.children if k.rank != float("inf")), key=lambda n: n.rank)
                prompt = _messages(path)
                for other in ranked[1:]:
                    if other.text != ranked[0].text:
                        rows.append({"prompt": prompt, "chosen": _messages([ranked[0]]),
                                     "rejected": _messages([other])})
                        numbers.append(ranked[0].number)
                        used.update(n.id for n in path + [ranked[0], other])
            answered = any(k.role == "user" and k.children for k in node.children)
            if family != "pairs" and node.role == "assistant" and not answered:
                rows.append({"messages": _messages(path)})
                numbers.append(root.number)
                used.update(n.id for n in path)
    unused = [n for n in nodes.values() if n.id not in used and n.id not in orphaned]
    # what the trees hold but no row can use, by design: user turns nobody answered (a tree's open ends),
    # replies SFT does not take or pairs cannot rank. Counted in the notes, not as bad rows.
    unanswered = sorted(n.number for n in unused if n.role == "user" and not n.children)
    lower = len(unused) - len(unanswered)
    notes = [f"{len(flat)} messages in {len(roots)} trees"]
    if unanswered:
        notes.append(f"{len(unanswered)} user turns nobody answered, not used (first at {unanswered[0]})")
    if lower:
        what = "lower-ranked or unranked replies (and their follow-ups) not used" if family != "pairs" \
            else "replies without a rank, or on lower-ranked branches, not used"
        notes.append(f"{lower} {what}")
    return rows, numbers, notes, len(flat)
