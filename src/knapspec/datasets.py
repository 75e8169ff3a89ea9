"""Evaluation prompts from the data folder (read in place, never copied).

Data folder: ``--data DIR``, else ``$KNAPSPEC_DATA``, else the copy shipped inside the package
(``knapspec/data``, with its README: each file's origin, commit and licence). Datasets by name:

* ``spec-bench`` (optionally ``spec-bench:CATEGORY``): the first turn of each question, chat.
* ``long-docs:N`` (N = 512, 2k, 4k, 8k ...): long documents (GAO, CRS, QMSum, Gutenberg) cut at a
  line or sentence boundary so that instruction + text come to about N tokens, as a
  summarisation request.
* ``long-text:N``: the same documents' first ~N tokens as raw text, no template, for the model to
  continue (as long-context decoding is measured on book continuations). A small chat model's
  summaries of long documents tend to repeat one line over and over (``bench.repeat_share``);
  continuing the text it was given, it stays closer to text like the document's own.
* ``gsm8k``, ``aime``, ``humaneval``: reasoning and code prompts.
* a path to a ``.jsonl`` file: one prompt per line in a ``prompt``, ``text`` or ``question`` field.

This module knows nothing about decoding.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LONG_DOC_FILES = ("gao_reports.jsonl", "govreport_crs.jsonl", "qmsum_meetings.jsonl", "gutenberg_books.jsonl")
SUMMARY_INSTRUCTION = "Summarize the following document in a few paragraphs.\n\n"


@dataclass(frozen=True)
class Prompt:
    id: str
    dataset: str                 # e.g. "spec-bench", "long-docs:4k"
    category: str
    text: str
    chat: bool = True
    target_tokens: int = 0       # intended prompt length (long documents), 0 = natural


PACKAGED_DATA = Path(__file__).resolve().with_name("data")


def data_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The data folder: ``explicit``, else ``$KNAPSPEC_DATA``, else the package's own copy."""
    if explicit:
        c, source = Path(explicit).expanduser(), "--data"
    elif os.environ.get("KNAPSPEC_DATA"):
        c, source = Path(os.environ["KNAPSPEC_DATA"]).expanduser(), "KNAPSPEC_DATA"
    else:
        c, source = PACKAGED_DATA, "the package's data"
    if (c / "spec_bench").is_dir() or (c / "long_docs").is_dir():
        return c
    raise FileNotFoundError(f"data folder {c} (from {source}) holds neither spec_bench/ nor long_docs/: "
                            "pass --data DIR or set KNAPSPEC_DATA to a folder of that layout "
                            "(or unset it to use the copy shipped with knapspec)")


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {i} is not JSON ({e.msg})") from None
    return rows


def spec_bench(root: Path, category: str | None = None) -> list[Prompt]:
    rows = _jsonl(root / "spec_bench" / "question.jsonl")
    cats = sorted({r["category"] for r in rows})
    if category is not None and category not in cats:
        raise ValueError(f"unknown Spec-Bench category {category!r}: choose one of {', '.join(cats)}")
    return [Prompt(str(r["question_id"]), "spec-bench", r["category"], r["turns"][0])
            for r in rows if category is None or r["category"] == category]


def spec_bench_categories(root: Path) -> list[str]:
    return sorted({r["category"] for r in _jsonl(root / "spec_bench" / "question.jsonl")})


def long_doc_records(root: Path) -> list[dict[str, Any]]:
    out = []
    for f in LONG_DOC_FILES:
        p = root / "long_docs" / f
        if p.is_file():
            out.extend(_jsonl(p))
    if not out:
        raise FileNotFoundError(f"no long documents under {root / 'long_docs'}")
    return out


def long_doc_text(i: int, root: Path | None = None) -> str:
    recs = long_doc_records(root or data_dir())
    return recs[i % len(recs)]["text"]


_BOUNDARY = re.compile(r"(?<=[.!?])\s+|\n")


def truncate_to_tokens(text: str, n_tokens: int, count) -> str:
    """Longest prefix of ``text`` ending at a line or sentence boundary with ``count(prefix) <=
    n_tokens`` (``count``: str -> int). Binary search over boundary offsets."""
    ends = [m.start() for m in _BOUNDARY.finditer(text)] + [len(text)]
    lo, hi = 0, len(ends) - 1
    if count(text[:ends[0]]) > n_tokens:
        return text[:ends[0]]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(text[:ends[mid]]) <= n_tokens:
            lo = mid
        else:
            hi = mid - 1
    return text[:ends[lo]]


def parse_size(s: str) -> int:
    s = s.strip().lower()
    try:
        return int(float(s[:-1]) * 1024) if s.endswith("k") else int(s)
    except ValueError:
        raise ValueError(f"bad context length {s!r}: expected a number like 512, 2k or 8k") from None


def _doc_prompts(root: Path, target: int, tokenizer, n: int | None, *, kind: str, budget: int,
                 lead: str, chat: bool) -> list[Prompt]:
    """One prompt per document long enough for ``budget`` tokens of its text, cut at a line or
    sentence boundary to fit them, after ``lead`` (an instruction or nothing)."""
    def count(t: str) -> int:
        return len(tokenizer(t, add_special_tokens=False)["input_ids"])
    out = []
    for r in long_doc_records(root):
        if count(r["text"][: target * 8]) < budget:
            continue                   # too short for this length
        body = truncate_to_tokens(r["text"][: target * 8], budget, count)
        name = f"{r.get('source', 'doc')}-{r['id']}"
        out.append(Prompt(name, f"{kind}:{target}", r.get("source", "doc"), lead + body, chat=chat,
                          target_tokens=target))
        if n is not None and len(out) >= n:
            break
    return out


def long_docs(root: Path, target: int, tokenizer, n: int | None = None) -> list[Prompt]:
    """Summarisation prompts of about ``target`` tokens (template included), one per document
    long enough to reach it."""
    overhead = 40                      # chat template + instruction, measured on SmolLM2
    return _doc_prompts(root, target, tokenizer, n, kind="long-docs", budget=target - overhead,
                        lead=SUMMARY_INSTRUCTION, chat=True)


def long_text(root: Path, target: int, tokenizer, n: int | None = None) -> list[Prompt]:
    """Raw-text prompts of about ``target`` tokens: each long enough document's beginning, cut at a
    line or sentence boundary, to be continued (no chat template, no instruction)."""
    return _doc_prompts(root, target, tokenizer, n, kind="long-text", budget=target, lead="", chat=False)


def reasoning(root: Path, name: str) -> list[Prompt]:
    if name == "gsm8k":
        return [Prompt(str(r["idx"]), name, name, r["question"]) for r in _jsonl(root / "gsm8k" / "test_subset.jsonl")]
    if name == "aime":
        return [Prompt(str(r["name"]), name, name, r["problem"]) for r in _jsonl(root / "aime2024" / "problems.jsonl")]
    if name == "humaneval":
        return [Prompt(str(r["task_id"]), name, name, "Complete this Python function.\n\n" + r["prompt"])
                for r in _jsonl(root / "humaneval" / "problems.jsonl")]
    raise ValueError(f"unknown reasoning dataset {name!r}")


def user_jsonl(path: Path) -> list[Prompt]:
    out = []
    for i, r in enumerate(_jsonl(path)):
        text = next((r[k] for k in ("prompt", "text", "question") if isinstance(r.get(k), str)), None)
        if text is None:
            raise ValueError(f"{path} line {i + 1} has no 'prompt', 'text' or 'question' string field")
        out.append(Prompt(str(r.get("id", i)), path.stem, str(r.get("category", path.stem)), text,
                          chat=bool(r.get("chat", True))))
    return out


DATASETS = ("spec-bench", "spec-bench:CATEGORY", "long-docs:N", "long-text:N", "gsm8k", "aime", "humaneval",
            "FILE.jsonl")


def load_dataset(spec: str, *, root: Path | None, tokenizer=None, n: int | None = None) -> list[Prompt]:
    """One dataset by name (see module docstring); the first ``n`` prompts."""
    if spec.endswith(".jsonl"):
        prompts = user_jsonl(Path(spec))
    else:
        root = root or data_dir()
        name, _, arg = spec.partition(":")
        if name == "spec-bench":
            prompts = spec_bench(root, arg or None)
        elif name in ("long-docs", "long-text"):
            if tokenizer is None:
                raise ValueError(f"{name} needs the model's tokenizer to cut documents to length")
            prompts = (long_docs if name == "long-docs" else long_text)(root, parse_size(arg or "2k"), tokenizer, n)
        elif name in ("gsm8k", "aime", "humaneval"):
            prompts = reasoning(root, name)
        else:
            raise ValueError(f"unknown dataset {spec!r}: choose from {', '.join(DATASETS)}")
    return prompts[:n] if n is not None else prompts
