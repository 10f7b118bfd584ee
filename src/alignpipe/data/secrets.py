"""Likely secrets and personal data in training text, found by row before a model can learn (and later repeat)
them (Carlini et al. 2019, 2021).

- API keys and tokens: Yelp's `detect-secrets` (Apache-2.0, maintained, 20+ provider-specific detectors). Only
  its regex detectors for known key formats are used (AWS, GitHub, GitLab, Slack, Stripe, OpenAI, private keys,
  JWTs, basic-auth URLs...); its entropy and keyword detectors are left out: they are built for source code and
  flag ordinary prose and hashes in chat data.
- Phone numbers: `phonenumbers` (Apache-2.0, the Python port of Google's libphonenumber), numbers it finds and
  calls valid, in international form or for the region PHONE_REGION.
- E-mail addresses: EMAIL below (a dot-atom local part, a domain with a dot-separated top-level label of 2+
  letters; it misses quoted local parts, which do not occur in chat data).

`find_secrets` names each finding's row and kind (never the value itself, which would copy the secret into the
run folder); `apply_secrets` masks them (`[SECRET:kind]`) or drops their rows.
"""

from __future__ import annotations

import functools
import re

EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
                   r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,}\b")
PHONE_REGION = "US"
SECRET_ACTIONS = ("report", "mask", "drop")
DETECTORS = ("ArtifactoryDetector", "AWSKeyDetector", "AzureStorageKeyDetector", "BasicAuthDetector",
             "DiscordBotTokenDetector", "GitHubTokenDetector", "GitLabTokenDetector", "JwtTokenDetector",
             "MailchimpDetector", "NpmDetector", "OpenAIDetector", "PrivateKeyDetector", "PypiTokenDetector",
             "SendGridDetector", "SlackDetector", "SquareOAuthDetector", "StripeDetector", "TelegramBotTokenDetector",
             "TwilioKeyDetector")
SHOW_LINES = 20


@functools.lru_cache(maxsize=1)
def _detectors() -> list:
    from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class

    classes = {cls.__name__: cls for cls in get_mapping_from_secret_type_to_class().values()}
    return [classes[name]() for name in DETECTORS if name in classes]


def _phones(text: str) -> list[str]:
    import phonenumbers

    return [m.raw_string for m in phonenumbers.PhoneNumberMatcher(text, PHONE_REGION, leniency=phonenumbers.Leniency.VALID)]


def secrets_in(text: str) -> list[tuple[str, str]]:
    """(kind, value) of every likely secret or personal datum in `text`."""
    # each detector's own patterns, matched whole (its analyze_string yields only a capture group of some)
    found = [(d.secret_type, m.group(0)) for d in _detectors() for regex in d.denylist for m in regex.finditer(text)
             if m.group(0)]
    found += [("E-mail address", m.group(0)) for m in EMAIL.finditer(text)]
    found += [("Phone number", s) for s in _phones(text)]
    return found


def _strings(row) -> list[str]:
    if isinstance(row, str):
        return [row]
    if isinstance(row, dict):
        return [s for v in row.values() for s in _strings(v)]
    if isinstance(row, list):
        return [s for v in row for s in _strings(v)]
    return []


def find_secrets(rows: list[dict], row_numbers: list[int] | None = None) -> dict:
    """Per kind: how many rows hold one and their first row numbers; plus the indices of every such row."""
    numbers = row_numbers if row_numbers is not None and len(row_numbers) == len(rows) else list(range(1, len(rows) + 1))
    kinds: dict[str, dict] = {}
    flagged: list[int] = []
    for i, row in enumerate(rows):
        found = {kind for text in _strings(row) for kind, _ in secrets_in(text)}
        if found:
            flagged.append(i)
        for kind in sorted(found):
            k = kinds.setdefault(kind, {"rows": 0, "lines": []})
            k["rows"] += 1
            if len(k["lines"]) < SHOW_LINES:
                k["lines"].append(numbers[i])
    return {"rows": len(rows), "rows_flagged": len(flagged), "kinds": kinds, "_rows": flagged}


def mask_text(text: str) -> str:
    for kind, value in sorted(secrets_in(text), key=lambda kv: -len(kv[1])):
        text = text.replace(value, f"[SECRET:{kind}]")
    return text


def _mask(value):
    if isinstance(value, str):
        return mask_text(value)
    if isinstance(value, dict):
        return {k: _mask(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask(v) for v in value]
    return value


def apply_secrets(rows: list[dict], screen: dict, action: str) -> list[dict]:
    """The rows with their flagged rows masked in place (`mask`) or removed (`drop`); `report` keeps them."""
    flagged = set(screen["_rows"])
    if action == "mask":
        return [_mask(r) if i in flagged else r for i, r in enumerate(rows)]
    if action == "drop":
        return [r for i, r in enumerate(rows) if i not in flagged]
    return rows


def public(screen: dict | None) -> dict | None:
    return None if screen is None else {k: v for k, v in screen.items() if k != "_rows"}


def format_secrets(screen: dict | None, unit: str) -> list[str]:
    if not screen or not screen["rows_flagged"]:
        return []
    return [f"    SECRETS {kind}: {k['rows']} rows; {unit}s {', '.join(map(str, k['lines']))}"
            + (" ..." if k["rows"] > len(k["lines"]) else "") for kind, k in screen["kinds"].items()]
