"""BERTScore for the open-text tasks (XBRL Term, FinanceBench), when it can run here.

FinLoRA scores these two tasks with ``evaluate.load("bertscore")`` and ``model_type="ProsusAI/finbert"``
(HEAD ``test/test_dataset.py``). That needs the ``bert_score`` package and the FinBERT weights; offline, or
without them, :func:`bertscore_f1` returns ``None`` and the caller reports the labelled fallback (token F1,
with ROUGE-L alongside) from :mod:`eval.scoring` instead of crashing or silently mixing metrics.
"""

from __future__ import annotations

from collections.abc import Sequence

from finlora.common.logs import get_logger

log = get_logger(__name__)

BERTSCORE_MODEL = "ProsusAI/finbert"
BERTSCORE_LAYERS = 12
"""FinBERT is BERT-base; ``bert_score`` has no default layer for it, so the last of its 12 layers is used."""

BERTSCORE_NAME = f"bertscore_f1 ({BERTSCORE_MODEL})"
FALLBACK_NAME = "token_f1 (offline fallback for BERTScore; not comparable with FinLoRA's BERTScore)"


def bertscore_f1(outputs: Sequence[str], targets: Sequence[str]) -> list[float] | None:
    """Per-row BERTScore F1 with FinBERT, or ``None`` when the package or the weights are not available."""
    try:
        import bert_score
    except ImportError:
        return None
    try:
        _, _, f1 = bert_score.score(list(outputs), list(targets), model_type=BERTSCORE_MODEL,
                                    num_layers=BERTSCORE_LAYERS, verbose=False)
    except Exception as exc:  # weights not cached and no hub: use the labelled fallback
        log.warning("BERTScore (%s) unavailable, using token F1 instead: %s", BERTSCORE_MODEL, exc)
        return None
    return [float(x) for x in f1]
