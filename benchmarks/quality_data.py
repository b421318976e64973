"""Real data for the adapter-quality study: the King James Bible and WordNet, read from Debian's packages.

* ``bible-kjv`` provides ``bible``; ``bible -f Gen1:1-Rev22:21`` prints one verse per line as
  ``<Book><chapter>:<verse> <text>`` (for example ``1Cor13:4 Charity suffereth long, ...``).
* ``wordnet-base`` provides ``/usr/share/wordnet/{index,data}.{noun,verb,adj,adv}`` in the WordNet 3.0
  database format (``man 5 wndb``).

Both splits are deterministic and independent of the training seed: the Bible is split by book (the test
books are one contiguous range), WordNet by word (a held-out word is absent from training in every part of
speech).
"""

from __future__ import annotations

import random
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "BIBLE_TEST_BOOKS",
    "BIBLE_VALID_BOOKS",
    "DataMissingError",
    "WordEntry",
    "hypernym_questions",
    "read_bible",
    "read_wordnet",
    "split_bible",
    "split_words",
]

BIBLE_PACKAGE_HINT = "install Debian's bible-kjv package (apt-get install bible-kjv) or pass --bible-file"
WORDNET_PACKAGE_HINT = "install Debian's wordnet-base package (apt-get install wordnet-base) or pass --wordnet-dir"
WORDNET_DIR = Path("/usr/share/wordnet")
# Held out by book: Romans to 2 Corinthians (contiguous, ~3% of the text) for test, Galatians and
# Ephesians for choosing learning rates. Everything else trains.
BIBLE_TEST_BOOKS = ("Rom", "1Cor", "2Cor")
BIBLE_VALID_BOOKS = ("Gal", "Eph")
POS_NAMES = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}
WORDNET_FILES = {"noun": "noun", "verb": "verb", "adjective": "adj", "adverb": "adv"}
_VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+)\s+(.*)$")
_ADJ_MARKER = re.compile(r"\((a|p|ip)\)$")


class DataMissingError(FileNotFoundError):
    """The real data is not on this machine; the message names the Debian package that provides it."""


def read_bible(path: str | Path | None = None) -> dict[str, str]:
    """Book code → the book's text (verses joined by spaces), in canonical order.

    ``path``: a file in ``bible -f`` format; ``None`` runs the ``bible`` program from ``bible-kjv``.
    """
    if path is None:
        if shutil.which("bible") is None:
            raise DataMissingError(f"the King James Bible is missing: {BIBLE_PACKAGE_HINT}")
        text = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True).stdout
    else:
        path = Path(path)
        if not path.is_file():
            raise DataMissingError(f"--bible-file: {path} does not exist; {BIBLE_PACKAGE_HINT}")
        text = path.read_text(encoding="utf-8")
    books: dict[str, list[str]] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        match = _VERSE.match(line)
        if match is None:
            raise ValueError(f"bible text line {lineno}: expected '<Book><chapter>:<verse> <text>', got {line[:60]!r}")
        books.setdefault(match.group(1), []).append(match.group(4).strip())
    if not books:
        raise ValueError("bible text: no verses found")
    return {book: " ".join(verses) for book, verses in books.items()}


def split_bible(books: dict[str, str]) -> tuple[str, str, str]:
    """(train, valid, test) text; the held-out parts are whole books (see BIBLE_*_BOOKS)."""
    missing = [b for b in BIBLE_TEST_BOOKS + BIBLE_VALID_BOOKS if b not in books]
    if missing:
        raise ValueError(f"bible text: the held-out books {missing} are missing (found {list(books)[:8]}...)")
    held = set(BIBLE_TEST_BOOKS + BIBLE_VALID_BOOKS)
    train = "\n\n".join(text for book, text in books.items() if book not in held)
    if not train:
        raise ValueError("bible text: no book is left for training")
    valid = "\n\n".join(books[b] for b in BIBLE_VALID_BOOKS)
    test = "\n\n".join(books[b] for b in BIBLE_TEST_BOOKS)
    return train, valid, test


@dataclass
class WordEntry:
    """A word's most frequent sense in one part of speech."""

    word: str
    pos: str
    definition: str
    hypernyms: list[str] = field(default_factory=list)


def _clean_lemma(lemma: str) -> str:
    return _ADJ_MARKER.sub("", lemma).replace("_", " ")


def _parse_data_file(path: Path) -> dict[str, tuple[list[str], str, list[str]]]:
    """offset → (lemmas, definition, hypernym offsets) from one data.<pos> file."""
    synsets = {}
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("  ") or "|" not in line:  # license header
                continue
            head, gloss = line.split(" | ", 1) if " | " in line else line.split("|", 1)
            fields = head.split()
            offset, word_count = fields[0], int(fields[3], 16)
            lemmas = [_clean_lemma(fields[4 + 2 * i]) for i in range(word_count)]
            pos = 4 + 2 * word_count
            pointer_count = int(fields[pos])
            hypernyms = []
            for i in range(pointer_count):
                symbol, target = fields[pos + 1 + 4 * i], fields[pos + 2 + 4 * i]
                if symbol in ("@", "@i"):
                    hypernyms.append(target)
            definition = gloss.split('; "')[0].strip().rstrip(";").strip()
            synsets[offset] = (lemmas, definition, hypernyms)
    return synsets


def read_wordnet(directory: str | Path | None = None) -> list[WordEntry]:
    """One entry per (single-word, lowercase alphabetic lemma, part of speech), with the lemma's first sense.

    WordNet's index files list a lemma's senses most frequent first; the definition is the gloss without
    its quoted examples, and the hypernyms are the lemmas of the first hypernym synset (nouns and verbs).
    """
    directory = Path(directory) if directory is not None else WORDNET_DIR
    needed = [directory / f"{kind}.{suffix}" for suffix in WORDNET_FILES.values() for kind in ("index", "data")]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise DataMissingError(f"WordNet files are missing ({', '.join(missing[:2])}...): {WORDNET_PACKAGE_HINT}")
    entries = []
    for pos, suffix in WORDNET_FILES.items():
        synsets = _parse_data_file(directory / f"data.{suffix}")
        with (directory / f"index.{suffix}").open(encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  "):
                    continue
                fields = line.split()
                lemma = fields[0]
                if not (lemma.isalpha() and lemma.islower() and len(lemma) >= 3):
                    continue
                first_sense = fields[-int(fields[2])]  # the synset offsets close the line, most frequent first
                if first_sense not in synsets:
                    continue
                lemmas, definition, hypernym_offsets = synsets[first_sense]
                if lemma not in lemmas:  # proper nouns: the index lowercases "Aachen"
                    continue
                hypernyms = (
                    synsets[hypernym_offsets[0]][0] if hypernym_offsets and hypernym_offsets[0] in synsets else []
                )
                if definition:
                    entries.append(WordEntry(lemma, pos, definition, list(hypernyms)))
    if not entries:
        raise ValueError(f"{directory}: no WordNet entries parsed")
    return entries


def split_words(
    entries: list[WordEntry], n_test: int, n_valid: int, seed: int = 1234
) -> tuple[list[WordEntry], list[WordEntry], list[WordEntry]]:
    """(train, valid, test) entries, split by word so that no held-out word trains in any part of speech."""
    words = sorted({e.word for e in entries})
    if len(words) < n_test + n_valid + 1:
        raise ValueError(f"WordNet: {len(words)} words cannot hold out {n_test} test and {n_valid} valid words")
    random.Random(seed).shuffle(words)
    test_words, valid_words = set(words[:n_test]), set(words[n_test : n_test + n_valid])
    train = [e for e in entries if e.word not in test_words and e.word not in valid_words]
    valid = [e for e in entries if e.word in valid_words]
    test = [e for e in entries if e.word in test_words]
    return train, valid, test


def hypernym_questions(entries: list[WordEntry], n_questions: int, seed: int = 1234) -> list[dict]:
    """4-way multiple choice: which of these is '<noun>' a kind of? The other options are hypernyms of
    other nouns in ``entries`` (distinct, and not a hypernym of this noun)."""
    nouns = [e for e in entries if e.pos == "noun" and e.hypernyms]
    pool = sorted({h for e in nouns for h in e.hypernyms[:1]})
    rng = random.Random(seed)
    questions = []
    for entry in nouns:
        answer = entry.hypernyms[0]
        candidates = [h for h in pool if h not in entry.hypernyms and h != entry.word]
        if len(candidates) < 3:
            continue
        options = [*rng.sample(candidates, 3), answer]
        rng.shuffle(options)
        questions.append({"word": entry.word, "options": options, "answer": options.index(answer)})
        if len(questions) == n_questions:
            break
    if not questions:
        raise ValueError("WordNet: not enough held-out nouns with hypernyms to build multiple-choice questions")
    return questions
