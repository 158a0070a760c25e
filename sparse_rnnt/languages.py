"""Language codes: ISO 639-1 codes inside the toolkit, MLS directory names on disk."""

from __future__ import annotations

from .errors import UserError

# The eight MLS languages, ISO code -> MLS directory suffix (``mls_<name>``).
MLS_NAMES: dict[str, str] = {
    "en": "english",
    "fr": "french",
    "it": "italian",
    "nl": "dutch",
    "de": "german",
    "es": "spanish",
    "pt": "portuguese",
    "pl": "polish",
}
MLS_CODES: dict[str, str] = {name: code for code, name in MLS_NAMES.items()}
# Languages the offline synthesizer has a grammar and an eSpeak NG voice for.
SYNTH_LANGUAGES: tuple[str, ...] = ("en", "fr", "it", "nl")


def parse_languages(spec: str | list[str] | tuple[str, ...], allowed: tuple[str, ...] | None = None) -> list[str]:
    """Parse ``"en,fr"`` (or MLS names such as ``"english"``) into a list of unique ISO codes."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    allowed = allowed if allowed is not None else tuple(MLS_NAMES)
    out: list[str] = []
    for raw in items:
        item = raw.strip().lower()
        if not item:
            continue
        code = MLS_CODES.get(item, item)
        if code not in allowed:
            raise UserError(f"unknown language {raw.strip()!r}: choose from {', '.join(allowed)}")
        if code not in out:
            out.append(code)
    if not out:
        raise UserError("no language given")
    return out
