"""The adapter-quality study (benchmarks/quality.py): data parsers, the run plan, and a smoke run.

The Bible and WordNet files here are tiny samples this test writes in the real formats, so CI needs
no Debian package.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from helpers import tiny_llama, word_level_tokenizer

from benchmarks import quality
from benchmarks import quality_data as qd
from benchmarks.quality_report import chosen_runs, summarize

WORDS = [
    "lord",
    "god",
    "land",
    "people",
    "king",
    "house",
    "day",
    "son",
    "man",
    "israel",
    "city",
    "servant",
    "heart",
    "word",
    "earth",
]
BOOKS = ["Ge", "Exo", "Mat", "Rom", "1Cor", "2Cor", "Gal", "Eph", "Rev"]


def write_bible(path: Path, verses_per_book: int = 6, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = []
    for book in BOOKS:
        for verse in range(1, verses_per_book + 1):
            text = " ".join(rng.choice(WORDS) for _ in range(12))
            lines.append(f"{book}{1 + verse // 4}:{verse} {book.lower()} {text}")
    path.write_text("\n".join(lines) + "\n")
    return path


# (pos letter, suffix, lemma list); two categories of nouns so that hypernym questions have distractors.
CATEGORIES = ["animal", "fruit", "tool", "color", "city", "metal", "bird", "tree"]
NOUNS = [f"noun{a}{b}" for a in "abcde" for b in "abcdefgh"]
VERBS = ["walk", "talk", "sing", "jump"]
ADJECTIVES = ["happy", "sad", "tall"]
ADVERBS = ["quickly", "slowly"]


def write_wordnet(directory: Path) -> Path:
    """data.* and index.* files in WordNet's database format (man 5 wndb), with license header lines."""
    directory.mkdir(parents=True, exist_ok=True)
    header = "  1 This software and database is being provided to you, the LICENSEE, by  \n"

    def data_line(offset, ss_type, lemmas, pointers, gloss):
        words = " ".join(f"{w} 0" for w in lemmas)
        ptrs = " ".join(f"{sym} {target:08d} {pos} 0000" for sym, target, pos in pointers)
        ptrs = f" {ptrs}" if ptrs else ""
        return f"{offset:08d} 03 {ss_type} {len(lemmas):02x} {words} {len(pointers):03d}{ptrs} | {gloss}  \n"

    # nouns: category synsets at offsets 100.., word synsets at 1000.. (two senses for the first word,
    # the index listing the second data line first: the most frequent sense).
    noun_data, noun_index = [header], [header]
    for i, category in enumerate(CATEGORIES):
        noun_data.append(data_line(100 + i, "n", [category], [], f"a {category} kind"))
    offset = 1000
    for i, word in enumerate(NOUNS):
        category = 100 + i % len(CATEGORIES)
        noun_data.append(
            data_line(
                offset,
                "n",
                [word],
                [("@", category, "n")],
                f'{word} of the {CATEGORIES[i % len(CATEGORIES)]}; "a {word} here"',
            )
        )
        offsets = [offset]
        if i == 0:
            noun_data.append(data_line(offset + 1, "n", [word], [], "the rare sense"))
            offsets = [offset, offset + 1]
        noun_index.append(f"{word} n {len(offsets)} 1 @ {len(offsets)} 0 {' '.join(f'{o:08d}' for o in offsets)}  \n")
        offset += 2
    noun_data.append(data_line(offset, "n", ["Paris"], [("@i", 104, "n")], "the capital of France"))
    # "paris" in the index, "Paris" in the data file: a proper noun, left out
    noun_index.append(f"paris n 1 1 @i 1 0 {offset:08d}  \n")
    for i, category in enumerate(CATEGORIES):
        noun_index.append(f"{category} n 1 0 1 0 {100 + i:08d}  \n")
    files = {"noun": (noun_data, noun_index)}
    for suffix, ss_type, lemmas in (("verb", "v", VERBS), ("adj", "a", ADJECTIVES), ("adv", "r", ADVERBS)):
        data, index = [header], [header]
        for i, word in enumerate(lemmas):
            marked = f"{word}(a)" if ss_type == "a" else word
            data.append(data_line(5000 + i, ss_type, [marked], [], f"to {word} well"))
            index.append(f"{word} {ss_type} 1 0 1 0 {5000 + i:08d}  \n")
        files[suffix] = (data, index)
    for suffix, (data, index) in files.items():
        (directory / f"data.{suffix}").write_text("".join(data))
        (directory / f"index.{suffix}").write_text("".join(sorted(index)))
    return directory


def test_bible_parse_and_split_by_book(tmp_path):
    books = qd.read_bible(write_bible(tmp_path / "kjv.txt"))
    assert list(books) == BOOKS
    assert books["Rom"].startswith("rom ")
    train, valid, test = qd.split_bible(books)
    assert test == "\n\n".join(books[b] for b in qd.BIBLE_TEST_BOOKS)
    assert valid == "\n\n".join(books[b] for b in qd.BIBLE_VALID_BOOKS)
    for held in qd.BIBLE_TEST_BOOKS + qd.BIBLE_VALID_BOOKS:
        assert books[held] not in train
    assert books["Ge"] in train and books["Rev"] in train


def test_bible_errors(tmp_path, monkeypatch):
    bad = tmp_path / "bad.txt"
    bad.write_text("Ge1:1 fine\nnot a verse line\n")
    with pytest.raises(ValueError, match="line 2"):
        qd.read_bible(bad)
    with pytest.raises(ValueError, match="held-out books"):
        qd.split_bible({"Ge": "text"})
    monkeypatch.setattr(qd.shutil, "which", lambda name: None)
    with pytest.raises(qd.DataMissingError, match="apt-get install bible-kjv"):
        qd.read_bible()


def test_wordnet_parse(tmp_path):
    entries = qd.read_wordnet(write_wordnet(tmp_path / "wn"))
    by_key = {(e.word, e.pos): e for e in entries}
    first = by_key[(NOUNS[0], "noun")]
    assert first.definition == f"{NOUNS[0]} of the animal"  # examples stripped; first-listed sense
    assert first.hypernyms == ["animal"]
    assert by_key[(NOUNS[3], "noun")].hypernyms == ["color"]
    assert ("paris", "noun") not in by_key  # proper noun (capitalized in the data file)
    assert by_key[("happy", "adjective")].definition == "to happy well"
    assert {e.pos for e in entries} == {"noun", "verb", "adjective", "adverb"}


def test_wordnet_missing(tmp_path):
    with pytest.raises(qd.DataMissingError, match="apt-get install wordnet-base"):
        qd.read_wordnet(tmp_path)


def test_word_split_and_questions(tmp_path):
    entries = qd.read_wordnet(write_wordnet(tmp_path / "wn"))
    train, valid, test = qd.split_words(entries, n_test=6, n_valid=4)
    train_words, valid_words, test_words = ({e.word for e in s} for s in (train, valid, test))
    assert len(test_words) == 6 and len(valid_words) == 4
    assert not (train_words & test_words) and not (train_words & valid_words) and not (valid_words & test_words)
    assert len(train) + len(valid) + len(test) == len(entries)
    assert qd.split_words(entries, 6, 4) == (train, valid, test)  # deterministic
    questions = qd.hypernym_questions(entries, n_questions=5)
    assert len(questions) == 5
    by_word = {e.word: e for e in entries if e.pos == "noun"}
    for q in questions:
        assert len(set(q["options"])) == 4
        assert q["options"][q["answer"]] == by_word[q["word"]].hypernyms[0]
    with pytest.raises(ValueError, match="cannot hold out"):
        qd.split_words(entries, 10000, 4)


def _record(task, method, seed, lr, metric, diverged=False, budget=quality.SMOKE_BUDGET):
    return {
        "task": task,
        "method": method,
        "seed": seed,
        "lr": lr,
        "budget_id": budget.fingerprint(),
        "trainable": 10,
        "diverged": diverged,
        quality.SELECT_METRIC[task]: metric,
        "test_ppl": metric,
        "test_loss": metric,
        "mc_acc": 0.5,
    }


def test_plan_grid_then_best_lr_then_fallback():
    budget, tasks, seeds = quality.SMOKE_BUDGET, ["bible"], [0, 1]
    methods = ["base", "moka", "moka_s", "qlora_r16"]
    records = []

    def step():
        spec = quality.next_run(records, tasks, methods, seeds, budget)
        return spec and (spec.task, spec.method, spec.seed, spec.lr)

    assert step() == ("bible", "base", 0, None)
    records.append(_record("bible", "base", 0, None, 70.0))
    moka_grid = {3e-3: 60.0, 1e-2: 50.0, 3e-2: 55.0}
    for lr, metric in moka_grid.items():
        assert step() == ("bible", "moka", 0, lr)
        records.append(_record("bible", "moka", 0, lr, metric))
    for lr in quality.LR_GRID["lora"]:
        assert step() == ("bible", "qlora_r16", 0, lr)
        records.append(_record("bible", "qlora_r16", 0, lr, 40.0 if lr == 3e-4 else 45.0))
    assert quality.best_lr(records, "bible", "moka", budget) == 1e-2
    assert quality.best_lr(records, "bible", "lora", budget) == 3e-4
    # seed 0: moka and qlora_r16 reuse their grid runs; moka_s takes MoKA's best, and falls back when it diverges
    assert step() == ("bible", "moka_s", 0, 1e-2)
    records.append(_record("bible", "moka_s", 0, 1e-2, float("nan"), diverged=True))
    assert step() == ("bible", "moka_s", 0, 3e-3)
    records.append(_record("bible", "moka_s", 0, 3e-3, 58.0))
    assert step() == ("bible", "moka", 1, 1e-2)
    records.append(_record("bible", "moka", 1, 1e-2, 51.0))
    assert step() == ("bible", "moka_s", 1, 1e-2)
    records.append(_record("bible", "moka_s", 1, 1e-2, 57.0))
    assert step() == ("bible", "qlora_r16", 1, 3e-4)
    records.append(_record("bible", "qlora_r16", 1, 3e-4, 41.0))
    assert step() is None
    picked = {(r["method"], r["seed"]): r["lr"] for r in chosen_runs(records, budget)}
    assert picked[("moka_s", 0)] == 3e-3 and picked[("moka_s", 1)] == 1e-2
    assert picked[("moka", 0)] == 1e-2 and picked[("qlora_r16", 0)] == 3e-4
    rows = {r["method"]: r for r in summarize(records, budget)}
    assert rows["moka"]["metrics"]["test_ppl"]["mean"] == pytest.approx(50.5)
    assert rows["moka"]["metrics"]["test_ppl"]["seeds"] == 2
    assert rows["qlora_r16"]["metrics"]["test_ppl"]["rank"] == 1  # 40.5 is the lowest perplexity


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    bible = write_bible(root / "kjv.txt", verses_per_book=10)
    wordnet = write_wordnet(root / "wn")
    words = WORDS + [b.lower() for b in BOOKS] + NOUNS + CATEGORIES + VERBS + ADJECTIVES + ADVERBS
    words += [
        "the",
        "a",
        "of",
        "to",
        "well",
        "kind",
        "Define",
        "word",
        "What",
        "is",
        "Answer",
        "with",
        "one",
        "or",
        "phrase",
    ]
    tokenizer, vocab = word_level_tokenizer(sorted(set(words)))
    model_dir = root / "model"
    tiny_llama(vocab=vocab, layers=2).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return root, bible, wordnet, model_dir


def test_smoke_run_records_every_run_and_resumes(sample, tmp_path, capsys):
    _root, bible, wordnet, model_dir = sample
    out, docs = tmp_path / "out", tmp_path / "results.md"
    docs.write_text("# Results\n\nHand-written reading stays.\n")
    argv = ["--smoke", "--model", str(model_dir), "--bible-file", str(bible), "--wordnet-dir", str(wordnet)]
    argv += ["--out", str(out), "--docs", str(docs)]
    assert quality.main([*argv, "--max-runs", "3"]) == 0
    assert len(quality.read_records(out / "runs.jsonl")) == 3
    assert quality.main(argv) == 0
    records = quality.read_records(out / "runs.jsonl")
    keys = [quality.record_key(r) for r in records]
    assert len(keys) == len(set(keys))
    trained = [m for m, (family, _) in quality.METHODS.items() if family is not None]
    budget = quality.SMOKE_BUDGET
    grids = {(t, f): quality.lr_grid(records, t, f, budget)[0] for t in quality.TASKS for f in quality.LR_GRID}
    assert all(len(g) >= 3 for g in grids.values())
    # base evals (NF4 and bf16), the grids (seed 0), then every trained method on 2 seeds (grid runs reused on seed 0);
    # 4 smoke steps are noisy, so a run may count as diverged and add one at the next lower LR
    grid_runs = {("moka", 0), ("qlora_r16", 0)}
    fallbacks = sum(
        r["diverged"] and (r["method"], r["seed"]) not in grid_runs and r["lr"] > min(grids[r["task"], family])
        for r in records
        if (family := quality.METHODS[r["method"]][0])
    )
    expected = 4 + sum(len(g) for g in grids.values()) + 2 * (2 * len(trained) - 2) + fallbacks
    assert len(records) == expected
    chosen = {(r["task"], r["method"], r["seed"]) for r in chosen_runs(records, budget)}
    assert chosen == {(t, m, s) for t in quality.TASKS for m in trained for s in (0, 1)} | {
        (t, base, 0) for t in quality.TASKS for base in ("base", "base_bf16")
    }
    for r in records:
        assert r["trainable"] > 0 or r["method"].startswith("base")
        if r["task"] == "wordnet":
            assert 0.0 <= r["mc_acc"] <= 1.0 and r["test_loss"] > 0
        else:
            assert r["test_ppl"] > 1.0
    bases = {r["method"]: r["test_loss"] for r in records if r["task"] == "bible" and r["method"].startswith("base")}
    assert bases["base"] != bases["base_bf16"]  # the NF4 base really is quantized
    params = {r["method"]: r["trainable"] for r in records}
    assert params["moka_nogate"] < params["moka"] == params["moka_bf16"]  # no gate logits; same adapter
    assert params["qlora_r4"] < params["qlora_r16"] < params["qlora_r32"]
    text = docs.read_text()
    assert "Hand-written reading stays." in text
    for method in quality.METHODS:
        assert f"| {method}" in text
    assert (out / "quality.png").stat().st_size > 0
    summary = json.loads((out / "summary.json").read_text())
    assert {r["method"] for r in summary["rows"]} == set(quality.METHODS)
    capsys.readouterr()
    assert quality.main(argv) == 0  # everything recorded: nothing runs again
    assert "0 new runs" in capsys.readouterr().out
    assert len(quality.read_records(out / "runs.jsonl")) == len(records)


def test_cli_errors(sample, tmp_path, capsys):
    _root, _bible, _wordnet, model_dir = sample
    base = ["--smoke", "--model", str(model_dir), "--out", str(tmp_path / "o"), "--docs", str(tmp_path / "d.md")]
    assert quality.main([*base, "--tasks", "bible,poetry"]) == 2
    assert "--tasks: expected a comma-separated subset of bible, wordnet" in capsys.readouterr().err
    assert quality.main([*base, "--bible-file", str(tmp_path / "missing.txt"), "--tasks", "bible"]) == 2
    err = capsys.readouterr().err
    assert "bible-kjv" in err and err.count("\n") == 1
    assert quality.main([*base, "--wordnet-dir", str(tmp_path), "--tasks", "wordnet"]) == 2
    assert "wordnet-base" in capsys.readouterr().err
    assert not (tmp_path / "o" / "runs.jsonl").exists()


def test_smoke_render_never_touches_the_committed_results(tmp_path, monkeypatch, capsys):
    """--smoke without --out/--docs writes to a temporary dir, not over results/quality and docs/results.md."""
    results, docs = tmp_path / "results", tmp_path / "results.md"
    results.mkdir()
    docs.write_text("committed\n")
    monkeypatch.setattr(quality, "RESULTS", results)
    monkeypatch.setattr(quality, "DOCS", docs)
    assert quality.main(["--smoke", "--render-only"]) == 0
    written = Path(capsys.readouterr().out.split("wrote ", 1)[1].strip())
    assert not list(results.iterdir()) and docs.read_text() == "committed\n"
    assert written.exists() and results not in written.parents


def test_grid_extends_upward_while_its_edge_wins():
    budget, tasks, methods = quality.SMOKE_BUDGET, ["wordnet"], ["qlora_r16", "qlora_r4"]
    records = [_record("wordnet", "qlora_r16", 0, lr, metric) for lr, metric in ((1e-4, 3.0), (3e-4, 2.9), (1e-3, 2.8))]

    def step():
        spec = quality.next_run(records, tasks, methods, [0], budget)
        return spec and (spec.method, spec.lr)

    assert quality.best_lr(records, "wordnet", "lora", budget) is None  # its edge won: the grid is not done
    assert step() == ("qlora_r16", 3e-3)
    records.append(_record("wordnet", "qlora_r16", 0, 3e-3, 2.7))
    assert step() == ("qlora_r16", 1e-2)
    records.append(_record("wordnet", "qlora_r16", 0, 1e-2, 2.6))
    # at most MAX_GRID_EXTENSIONS values are added, even though the edge still wins
    grid, best = quality.lr_grid(records, "wordnet", "lora", budget)
    assert grid == [1e-4, 3e-4, 1e-3, 3e-3, 1e-2] and best == 1e-2
    assert step() == ("qlora_r4", 1e-2)
    records.append(_record("wordnet", "qlora_r4", 0, 1e-2, float("nan"), diverged=True))
    assert step() == ("qlora_r4", 3e-3)  # diverged: one step down the extended grid
    records.append(_record("wordnet", "qlora_r4", 0, 3e-3, 2.9))
    assert step() is None
    records[-3]["valid_loss"] = 2.75  # 1e-2 no longer best: 3e-3 is, inside the grid
    assert quality.lr_grid(records, "wordnet", "lora", budget)[1] == 3e-3
