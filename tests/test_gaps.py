"""Gap closed per measure: (final - pruned) / (original - pruned), for both directions of better."""

import pytest

from layerprune.report.gaps import gap_closed, gap_markdown, gap_summary, gap_table


def record(acc_arc, acc_piqa, ppl, kl, rouge):
    return {"tasks": {"arc_easy": {"acc": acc_arc}, "piqa": {"acc": acc_piqa}},
            "perplexity": {"c4-heldout": {"ppl": ppl}},
            "instruction_following": {"kl": kl, "rouge_l": rouge}}


def test_gap_closed_for_higher_and_lower_is_better():
    assert gap_closed(0.50, 0.43, 0.45) == pytest.approx(2 / 7)  # accuracy: 0.02 of 0.07 back
    assert gap_closed(62.24, 166.2, 92.63) == pytest.approx((166.2 - 92.63) / (166.2 - 62.24))  # perplexity
    assert gap_closed(0.0, 0.8, 0.2) == pytest.approx(0.75)  # KL to the original
    assert gap_closed(0.5, 0.5, 0.6) is None  # pruning did not move it: nothing to close
    assert gap_closed(0.5, 0.4, 0.3) == pytest.approx(-1.0)  # worse than before healing


def test_gap_table_summary_and_markdown():
    rows = gap_table(record(0.50, 0.66, 62.0, 0.0, 1.0), record(0.43, 0.60, 166.0, 0.8, 0.2),
                     record(0.45, 0.63, 92.0, 0.4, 0.4))
    by_name = {r["measure"]: r["gap_closed"] for r in rows}
    assert by_name == {"arc_easy acc": pytest.approx(2 / 7), "piqa acc": pytest.approx(0.5),
                       "c4-heldout ppl": pytest.approx(74 / 104), "instruction KL": pytest.approx(0.5),
                       "greedy ROUGE-L": pytest.approx(0.25)}
    summary = gap_summary(rows)
    assert summary["tasks"] == pytest.approx((2 / 7 + 0.5) / 2)
    assert summary["perplexity"] == pytest.approx(74 / 104)
    assert summary["instruction following"] == pytest.approx(0.375)
    text = "\n".join(gap_markdown(rows))
    assert "| piqa acc | 0.6600 | 0.6000 | 0.6300 | 50% |" in text and "tasks 39%" in text
    assert gap_table(record(0.5, 0.6, 60, 0, 1), None, None) == []
