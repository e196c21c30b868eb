"""Captioning emoji icons with their Unicode CLDR short names.

An icon set names its icons with slugs ("man-technologist-medium-skin-tone", "flag-for-malta",
"admissiontickets"). The caption we want is the CLDR short name of the emoji the icon draws
("man technologist: medium skin tone", "flag: Malta"). We resolve an icon name to a codepoint
sequence in this order, stopping at the first hit:

1. the set's own `chars.json` (codepoint sequence -> icon name);
2. the other sets' `chars.json` (icon sets mostly share the same slugs);
3. the `emoji` package's names and aliases, slugged (also with the hyphens removed, for sets
   that run words together, and with "-skin-tone" restored for sets that drop it);
4. `unicodedata.lookup` of the name read as words.

The caption is then rebuilt from the `emoji` package's English name (which is the CLDR name
with its punctuation turned into underscores) by restoring the CLDR "base: qualifiers" form.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

import emoji

VARIATION_SELECTOR = 0xFE0F
REGIONAL_INDICATORS = range(0x1F1E6, 0x1F200)
TAG_CHARACTERS = range(0xE0020, 0xE0080)

# CLDR qualifiers that follow a colon: skin tones, then hair styles and beards (UTS #51 names).
_QUALIFIER = re.compile(
    r"\b(?:medium-light|medium-dark|medium|light|dark) skin tone\b"
    r"|\b(?:red|curly|white|blond) hair\b|\bbald\b|\bbeard\b"
)
# CLDR names whose people are listed after a colon ("family: man, woman, boy").
_GROUP_PREFIXES = ("couple with heart", "family", "kiss")
_FLUENT_TONE = re.compile(r"-(medium-light|medium-dark|medium|light|dark)$")


@dataclass(frozen=True)
class Caption:
    """What a name resolves to: the caption, its codepoints ('1f34e'), and how it was found."""

    text: str
    codepoints: str | None
    source: str  # own-chars | other-chars | emoji-package | unicodedata | icon-name

    @property
    def named(self) -> bool:
        return self.source != "icon-name"


def sequence_key(codepoints: str | list[int]) -> str:
    """Canonical hex sequence without variation selectors: '1f468-200d-1f4bb'."""
    if isinstance(codepoints, str):
        codepoints = [int(part, 16) for part in re.split(r"[-_ ]+", codepoints.strip()) if part]
    return "-".join(f"{cp:x}" for cp in codepoints if cp != VARIATION_SELECTOR)


def slug(text: str) -> str:
    """Iconify-style slug: ASCII-folded, lower case, words joined by hyphens."""
    folded = unicodedata.normalize("NFKD", text)
    folded = "".join(ch for ch in folded if not unicodedata.combining(ch))
    return re.sub(r"[^a-z0-9]+", "-", folded.lower()).strip("-")


def is_flag(key: str) -> bool:
    """Country flags are regional-indicator pairs; subdivision flags are 1f3f4 plus tag characters."""
    cps = [int(part, 16) for part in key.split("-") if part]
    if len(cps) == 2 and all(cp in REGIONAL_INDICATORS for cp in cps):
        return True
    return len(cps) > 2 and cps[0] == 0x1F3F4 and all(cp in TAG_CHARACTERS for cp in cps[1:])


def cldr_name(package_name: str, key: str) -> str:
    """Restore the CLDR form "base: qualifier, qualifier" from the emoji package's name."""
    words = package_name.strip(":").replace("_", " ").strip()
    if is_flag(key):
        return f"flag: {words}"
    if words.startswith("keycap "):
        return "keycap: " + words[len("keycap "):]
    head, qualifiers = words, []
    match = _QUALIFIER.search(words)
    if match and match.start() > 0:  # a lone component ("light skin tone") keeps its name
        head = words[: match.start()].strip()
        qualifiers = _QUALIFIER.findall(words[match.start():])
    for prefix in _GROUP_PREFIXES:
        if head.startswith(prefix + " "):
            people = head[len(prefix) + 1:].split()
            return f"{prefix}: " + ", ".join(people + qualifiers)
    return f"{head}: {', '.join(qualifiers)}" if qualifiers else head


class EmojiNamer:
    """Resolves icon names of every set to codepoints and CLDR captions (see module docstring)."""

    def __init__(self, chars_by_set: dict[str, dict[str, str]]):
        # emoji package: canonical sequence -> English name, preferring fully-qualified entries
        self._names: dict[str, str] = {}
        self._by_slug: dict[str, str] = {}
        for char, data in sorted(emoji.EMOJI_DATA.items(), key=lambda kv: kv[1].get("status", 9)):
            key = sequence_key([ord(ch) for ch in char])
            if key in self._names:
                continue
            self._names[key] = data["en"]
        for key, name in self._names.items():  # primary names first: they beat any alias
            caption = self.caption_for(key) or ""
            for text in (name, caption, re.sub(r"\(.*?\)", "", caption)):
                self._by_slug.setdefault(slug(text.strip(":").replace("&", " and ")), key)
            if is_flag(key):  # older sets say "flag-for-malta"
                self._by_slug.setdefault("flag-for-" + slug(name.strip(":")), key)
        for char, data in emoji.EMOJI_DATA.items():
            for alias in data.get("alias", []):
                self._by_slug.setdefault(slug(alias.strip(":")), sequence_key([ord(ch) for ch in char]))
        # each set's chars.json inverted: icon name -> sequence
        self._own: dict[str, dict[str, str]] = {
            set_name: {icon: sequence_key(cps) for cps, icon in chars.items()}
            for set_name, chars in chars_by_set.items()
        }
        self._other: dict[str, str] = {}
        for table in self._own.values():
            for icon, key in table.items():
                self._other.setdefault(icon, key)
        self._compact: dict[str, str] = {}
        for table in (self._other, self._by_slug):
            for name, key in table.items():
                self._compact.setdefault(name.replace("-", ""), key)
        for key in self._names:  # Unicode character names, run together ("bactriancamel")
            if "-" not in key:
                self._compact.setdefault(slug(unicodedata.name(chr(int(key, 16)), "")).replace("-", ""), key)
        self._vocabulary = {word for name in [*self._by_slug, *self._other] for word in name.split("-")}

    def caption_for(self, key: str) -> str | None:
        """CLDR caption of a canonical sequence, or None when neither source knows it."""
        if key in self._names:
            return cldr_name(self._names[key], key)
        cps = key.split("-")
        if len(cps) == 1:
            name = unicodedata.name(chr(int(cps[0], 16)), "")
            return name.lower() or None
        return None

    def _resolve(self, set_name: str, icon: str) -> tuple[str | None, str]:
        if icon in self._own.get(set_name, {}):
            return self._own[set_name][icon], "own-chars"
        candidates = [icon, re.sub(r"^flag-for-(flag-)?", "flag-", icon)]
        tone = _FLUENT_TONE.search(icon)
        if tone:  # Fluent drops "-skin-tone": "girl-dark" is "girl: dark skin tone"
            candidates.append(icon + "-skin-tone")
        for name in candidates:
            if name in self._other:
                return self._other[name], "other-chars"
        for name in candidates:
            if name in self._by_slug:
                return self._by_slug[name], "emoji-package"
        compact = icon.replace("-", "")
        if compact in self._compact:
            return self._compact[compact], "emoji-package"
        try:
            char = unicodedata.lookup(icon.replace("-", " "))
        except KeyError:
            return None, "icon-name"
        return sequence_key([ord(char)]), "unicodedata"

    def split_words(self, name: str) -> str:
        """Read a run-together name as words of emoji names ("banknotepound" -> "banknote pound")."""
        best: list[list[str] | None] = [[]] + [None] * len(name)  # fewest words covering name[:i]
        for end in range(1, len(name) + 1):
            for start in range(max(0, end - 24), end):
                word = name[start:end]
                if best[start] is not None and (word in self._vocabulary or word.isdigit()):
                    if best[end] is None or len(best[start]) + 1 < len(best[end]):
                        best[end] = best[start] + [word]
        return " ".join(best[-1]) if best[-1] else name

    def caption(self, set_name: str, icon: str) -> Caption:
        """Caption one icon; falls back to the icon's own name read as words."""
        key, source = self._resolve(set_name, icon)
        text = self.caption_for(key) if key else None
        if text is None:
            words = " ".join(self.split_words(part) for part in icon.split("-"))
            return Caption(words, key, "icon-name")
        return Caption(text, key, source)
