"""How the failure-modes tab shows a mode: a table row and its evidence, from ``explain``'s dicts."""

from __future__ import annotations

from diagnosis.explain import evidence_rows
from search_ui.ui.context import fmt

MODE_COLUMNS = ["#", "failure mode", "its images' true loss (x mean)", "their predicted loss [95% CI]",
                "coverage", "precision", "samples", "share of loss", "costs: loss above the mean [95% CI]",
                "unlabeled pool images it retrieves"]


def _ci(lo_hi) -> str:
    return f"[{fmt(lo_hi[0])}, {fmt(lo_hi[1])}]" if lo_hi else ""


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def _cost(m: dict) -> str:
    """What a mode costs (explain's ``cost``, the share of the held-out loss above the mean) and its interval."""
    if m.get("cost") is None:
        return "n/a"
    lo, hi = m.get("cost_ci") or (m["cost"], m["cost"])
    return f"{100 * m['cost']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def mode_row(i: int, m: dict) -> list:
    """One row of the modes table: the name and the evidence that it names a real failure."""
    ev = m.get("evidence") or {}
    true = "n/a" if ev.get("true_loss") is None else f"{fmt(ev['true_loss'])} ({ev['true_loss_ratio']:.1f}x)"
    pred = f"{fmt(ev.get('predicted_loss', m.get('predicted_loss')))} {_ci(ev.get('predicted_loss_ci'))}".strip()
    return [i, m["description"] + ("" if m.get("shown", True) else f" (hidden: {(m.get('evidence') or {}).get('reason')})"), true, pred,
            _pct(ev.get("coverage")), _pct(ev.get("precision")), m.get("size"), _pct(m.get("share_of_loss")),
            _cost(m), "no pool" if m.get("pool_rows") is None else m["pool_rows"]]


def evidence_markdown(m: dict) -> str:
    """The mode's evidence in a sentence or three, for the panel under the table."""
    ev = m.get("evidence") or {}
    out = (f"**{m['description']}** — {m.get('size')} samples predicted to fail, {_pct(m.get('share_of_loss'))} of all "
           f"loss; it costs {_cost(m)} of the loss above the mean ({m.get('cost_basis') or 'n/a'}).")
    if not m.get("shown", True):
        out += f"\n\n*Hidden: {ev.get('reason')}.*"
    if ev:
        true = "no true losses among them" if ev.get("true_loss") is None else (
            f"true loss {fmt(ev['true_loss'])} {_ci(ev.get('true_loss_ci'))}, **{ev['true_loss_ratio']:.1f}x** the mean "
            f"(over {ev.get('true_rows')} held-out rows)")
        out += (f"\n\nEvidence: the {ev['retrieved']} {evidence_rows(ev)} have {true}; predicted loss "
                f"{fmt(ev['predicted_loss'])} {_ci(ev.get('predicted_loss_ci'))} ({ev['predicted_loss_ratio']:.1f}x). "
                f"The name covers {_pct(ev.get('coverage'))} of the failing images around it, at "
                f"{_pct(ev.get('precision'))} precision (share of its images predicted to fail).")
    return out
