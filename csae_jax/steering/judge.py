"""Judges: does a caption show the concept? Pluggable; both see the captions of one image and one
sign together (a "set": the arms' captions), so a judge that compares may, and a blind one
cannot tell which arm wrote which.

- `LexicalJudge` (default): the concept's words are the labels of its top images (labels that
  cover at least `min_frac` of the labelled top images, at least the commonest), each with its
  synonyms from a label hierarchy; a caption shows the concept when it contains one of them as a
  whole word (plural -s / -es allowed), case-insensitive.
- `VLMJudge`: a local VLM through a port (text only), the paper's blind protocol: the set's
  captions are shuffled and lettered A, B, C, D, ... and the model answers yes / no for each
  letter; answers it does not give count as "no" and are counted (`unparsed`).

Label hierarchy file (json): `{label: parent label}` (a string: the parent and its ancestors
are synonyms, e.g. a "tabby" concept shown by "cat") or `{label: [synonym, ...]}` (a list). Label
strings may hold comma-separated alternatives ("tabby, tabby cat"); '_' reads as a space.
"""

from __future__ import annotations

import collections
import json
import re
import string
from typing import Optional, Sequence

import numpy as np


def _variants(label: str) -> list[str]:
  label = label.rsplit('/', 1)[-1]  # nested folders: the innermost is the label
  return [w.strip().lower().replace('_', ' ') for w in re.split(r'[,;]', label) if w.strip()]


def load_hierarchy(path: str) -> dict:
  if not path:
    return {}
  try:
    with open(path) as f:
      h = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f'label hierarchy {path!r} is not a readable json file ({e})') from e
  if not isinstance(h, dict) or not all(isinstance(v, (str, list)) for v in h.values()):
    raise ValueError(f'label hierarchy {path!r} must map label -> parent label (string) or '
                     'label -> [synonyms]')
  return h


def label_words(label: str, hierarchy: dict) -> list[str]:
  """The label's alternatives, its synonyms and its ancestors' names (cycle-safe)."""
  words, seen, cur = [], set(), label
  while cur is not None and cur not in seen:
    seen.add(cur)
    words += _variants(cur)
    entry = hierarchy.get(cur, hierarchy.get(cur.rsplit('/', 1)[-1]))
    if isinstance(entry, list):
      for syn in entry:
        words += _variants(str(syn))
      break
    cur = entry
  return list(dict.fromkeys(words))


def concept_words(labels: Sequence[Optional[str]], hierarchy: dict, min_frac: float = 0.3
                  ) -> list[str]:
  """Words of a concept from its top images' labels ([] when none is labelled)."""
  counts = collections.Counter(lab for lab in labels if lab)
  if not counts:
    return []
  n = sum(counts.values())
  top = counts.most_common()
  keep = [lab for lab, c in top if c >= min_frac * n] or [top[0][0]]
  return list(dict.fromkeys(w for lab in keep for w in label_words(lab, hierarchy)))


def _pattern(words: Sequence[str]) -> re.Pattern:
  alts = '|'.join(re.escape(w) for w in sorted(set(words), key=len, reverse=True))
  return re.compile(rf'\b(?:{alts})(?:s|es)?\b', re.IGNORECASE)


class LexicalJudge:
  name = 'lexical'
  unparsed = 0

  def judge(self, words: Sequence[str], sets: Sequence[Sequence[str]]) -> list[list[bool]]:
    if not words:
      raise ValueError('the lexical judge needs the concept\'s words (labelled top images)')
    pat = _pattern(words)
    return [[bool(pat.search(c)) for c in s] for s in sets]


class VLMJudge:
  """Blind yes / no per caption through a port's text-only greedy generation."""

  name = 'vlm'

  def __init__(self, model, pre, *, seed: int = 0, eos: tuple[int, ...] = ()):
    self.model, self.pre, self.eos = model, pre, eos
    self.rng = np.random.default_rng(seed)
    self.unparsed = 0

  @staticmethod
  def question(words: Sequence[str], captions: Sequence[str]) -> str:
    lines = [f'{string.ascii_uppercase[i]}: {c}' for i, c in enumerate(captions)]
    return ('Concept: ' + ' / '.join(words) + '.\nFor each caption below, answer whether it '
            'mentions the concept. Reply with one line per caption, "A: yes" or "A: no".\n'
            + '\n'.join(lines))

  @staticmethod
  def parse(answer: str, n: int) -> tuple[list[Optional[bool]], int]:
    got: dict[str, bool] = {}
    for letter, yn in re.findall(r'\b([A-Z])\s*[:.)\-]\s*(yes|no)\b', answer, re.IGNORECASE):
      got.setdefault(letter.upper(), yn.lower() == 'yes')
    out = [got.get(string.ascii_uppercase[i]) for i in range(n)]
    return out, sum(v is None for v in out)

  def judge(self, words: Sequence[str], sets: Sequence[Sequence[str]]) -> list[list[bool]]:
    out = []
    for captions in sets:
      if len(captions) > len(string.ascii_uppercase):
        raise ValueError(f'the blind judge letters at most 26 captions, got {len(captions)}')
      perm = self.rng.permutation(len(captions))  # shown[j] = captions[perm[j]]
      ids = self.pre.prompt_ids(np.zeros((0, 3), np.int64),
                                self.question(words, [captions[p] for p in perm]))
      tokens = self.model.generate(ids[None], None, None, 6 * len(captions) + 8,
                                   eos_token_id=list(self.eos) or None)
      answer = self.pre.tokenizer.decode(np.asarray(tokens)[0].tolist(), skip_special_tokens=True)
      shown, missing = self.parse(answer, len(captions))
      self.unparsed += missing
      verdict = [False] * len(captions)
      for j, p in enumerate(perm):
        verdict[p] = bool(shown[j])
      out.append(verdict)
    return out
