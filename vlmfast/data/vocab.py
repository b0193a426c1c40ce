"""An outlier noun vocabulary: the WordNet lemmas of the ImageNet-21k synsets that ship inside timm
(``timm/data/_info/imagenet_synset_to_lemma.txt``: 21,844 lines ``<synset>\\t<lemma>, <lemma>, ...``).

**Choice: every synonym is kept**, not only the first lemma of each synset. The file's 21,844 synsets carry 40,744
comma-separated lemmas, 37,010 of them distinct; the first lemmas alone give only 20,102 distinct words and drop
common names that appear as a second synonym (e.g. "tabby" after "tabby cat"). Lemmas are stripped of surrounding
whitespace, empty ones dropped, and duplicates removed keeping the first occurrence (file order, then the
order within a line), so the list is deterministic. Case is kept as in the file (proper nouns are capitalised).
"""

from __future__ import annotations

import functools
from pathlib import Path

LEMMA_FILE = "imagenet_synset_to_lemma.txt"


def _lemma_path() -> Path:
    # Located through the import system without importing timm (whose import pulls in torchvision).
    from vlmfast._optional import locate

    folders = locate("timm", f"vlmfast.data.noun_vocabulary (the ImageNet-21k lemmas timm ships as "
                             f"timm/data/_info/{LEMMA_FILE})")
    for base in folders:
        path = Path(base) / "data" / "_info" / LEMMA_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"noun_vocabulary: the installed timm ({folders}) has no data/_info/{LEMMA_FILE}"
    )


@functools.lru_cache(maxsize=1)
def _vocabulary() -> tuple[str, ...]:
    seen: dict[str, None] = {}
    with open(_lemma_path(), encoding="utf-8") as fh:
        for line in fh:
            _, _, lemmas = line.rstrip("\n").partition("\t")
            for lemma in lemmas.split(","):
                lemma = lemma.strip()
                if lemma:
                    seen.setdefault(lemma, None)
    return tuple(seen)


def noun_vocabulary() -> list[str]:
    """The distinct ImageNet-21k lemmas (37,010 with timm's current file), in first-occurrence order. Read once
    per process (``functools.lru_cache``); each call returns a new list."""
    return list(_vocabulary())
