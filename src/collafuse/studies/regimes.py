"""The table of docs/results/README.md: one row per regime, every figure read from that regime's summary.json.

    python -m collafuse.studies.regimes docs/results/r1-digits-conditional docs/results/r2-digits-unconditional

A row: the noise level from which the server cannot tell the clients apart (the distinguishability curve), the
best cut of all (picked for each seed on the other seeds; the one picked most often) and the cuts that do not
lose to it, the cut that `collafuse recommend`'s rule takes from the regime's curve (:func:`collafuse.recommend.
choose`) and whether it lies among those cuts; the same for client agreement (the cuts that do not lose to the
cut whose samples a classifier most often gives to their own client); the best small cut, and against each
baseline whether the best small cut beats it, loses to it or shows no difference, with the paired 95% interval of
the primary metric; and where the regime's final arms have Inception KID, the same for the best small cut against
one global model and the clients alone on it. A second table (:func:`own_table`) gives the same for each client's
samples against its own held-out images, averaged over the clients, where a pooled figure cannot see whether each
client gets its own kind of image.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import CollafuseError

BASELINE_ORDER = ("one global model", "the clients alone", "FedAvg", "FedAvg + local fine-tuning",
                  "global model told the client")
WORD = {"beats": "beats", "loses to": "loses", "no difference detected with": "n.d."}


def _transition(d: dict | None) -> str:
    if not d:
        return "-"
    if d.get("label_names_client"):
        return "never (the label names the client)"
    t = d.get("indistinguishable_from")
    return "above chance at every t" if t is None else f"{t}"


def table(folders: list[Path]) -> str:
    """The Markdown table of the regimes whose report folders (with summary.json) are given."""
    rows = []
    for folder in folders:
        summary = _summary(folder)
        v = summary["verdict"]
        best = v.get("best_small_cut") or {}
        scale = v.get("scale", 1.0)
        cells = [_verdict(best.get(name), scale) for name in BASELINE_ORDER]
        most = next(iter(best.values()))["most_often"] if best else "-"
        overall = v.get("best_cut")
        picks = _picks(overall)
        tied = (overall or {}).get("not_worse")
        agree = v.get("client_agreement_best")
        cut_arms = {a.get("t_zeta") for a in summary.get("arms", []) if a.get("kind") == "cut"}
        T = next((a["T"] for a in summary.get("arms", []) if "T" in a), None)
        rows.append(f"| {Path(folder).name} | {v.get('measure_label', '-')} | {summary.get('seeds', '-')} | "
                    f"{_transition(v.get('distinguishability'))} | {picks} | {_cuts(tied)} | "
                    f"{_rule(v.get('distinguishability'), tied, cut_arms)} | "
                    f"{'-' if agree is None else _cuts(agree['not_worse'])} | "
                    f"{_rule(v.get('distinguishability'), None if agree is None else agree['not_worse'], cut_arms)} | "
                    f"{most} | " + " | ".join(cells) + f" | {_inception(v.get('inception_kid'), most, T)} |")
    head = ("| regime | primary metric | seeds | clients indistinguishable from t | best cut of all (picks) | "
            "cuts not worse than it | the rule's cut | cuts with the highest client agreement | the rule's cut | "
            "best small cut | " + " | ".join(f"against {b}" for b in BASELINE_ORDER)
            + " | Inception KID x1e3: the best small cut against one global model / the clients alone |")
    return "\n".join([head, "|---" * (11 + len(BASELINE_ORDER)) + "|", *rows])


def own_table(folders: list[Path]) -> str:
    """The second table: each client's samples against its own held-out images, the primary metric averaged over
    the clients (``verdict.own_images`` of each summary.json), where a pooled figure cannot see personalisation;
    and the same on Inception KID where the regime has it for its final arms only."""
    rows = []
    for folder in folders:
        v = _summary(folder)["verdict"]
        part = (v.get("inception_kid") or {}).get("own_images")
        rows.append(f"| {Path(folder).name} | {_own_cells(v.get('own_images'), v.get('distinguishability'))} | "
                    f"{_own_cells(part, None, partial=True)} |")
    head = ("| regime | metric | clients alone above the floors (SE) | best cut of all (picks) | cuts not worse than "
            "it | the rule's cut | best small cut | against one global model | against the clients alone | "
            "Inception KID x1e3 (final arms only): clients alone above the floors (SE) | best of those cuts (picks) | "
            "not worse | best small cut | against one global model | against the clients alone |")
    return "\n".join([head, "|---" * 15 + "|", *rows])


def _own_cells(own: dict | None, curve: dict | None, partial: bool = False) -> str:
    """The cells of :func:`own_table` for one ``own_images`` record (the rule's column only where not ``partial``)."""
    if not own:
        return " | ".join(["-"] * (6 if partial else 8))
    sep, overall = own.get("separation"), own.get("best_cut")
    tied = (overall or {}).get("not_worse")
    best = own.get("best_small_cut") or {}
    cells = ([] if partial else [own["label"]]) + ["-" if not sep else f"{sep['z']:.1f}", _picks(overall),
                                                   _cuts(tied)]
    if not partial:
        arms = {int(a["t_zeta"]) for a in own["arms"].values() if a.get("kind") == "cut"}
        cells.append(_rule(curve, tied, arms))
    cells.append(f"{next(iter(best.values()))['most_often']}" if best else "-")
    cells += [_verdict(best.get(name), own["scale"]) for name in ("one global model", "the clients alone")]
    return " | ".join(cells)


def _verdict(b: dict | None, scale: float) -> str:
    """'beats -2.10 [-3.50, -0.70]' for a paired comparison record (diff, lo, hi and verdict), or '-'."""
    return "-" if b is None else (f"{WORD[b['verdict']]} {b['diff'] * scale:+.2f} [{b['lo'] * scale:+.2f}, "
                                  f"{b['hi'] * scale:+.2f}]")


def _picks(overall: dict | None) -> str:
    """'500 (4 of 5)': the best cut of all and how many of the leave-one-out picks chose it."""
    if not overall:
        return "-"
    top = overall["most_often"]
    return f"{top} ({overall['counts'][str(top)]} of {sum(overall['counts'].values())})"


def _summary(folder: Path) -> dict:
    path = Path(folder) / "summary.json"
    if not path.exists():
        raise CollafuseError(f"{folder} has no summary.json; make it with 'collafuse report SWEEP --out {folder}'")
    summary = json.loads(path.read_text())
    if not isinstance(summary, dict) or "verdict" not in summary:
        raise CollafuseError(f"{path} was written before the paired verdict; rerun 'collafuse report' on its sweep")
    return summary


def _inception(part: dict | None, cut: int | str, T: int | None) -> str:
    """The best small cut against one global model and the clients alone on Inception KID, where the regime's
    report has it (computed for its final arms only)."""
    if not part or not isinstance(cut, int) or T is None:
        return "-"
    found = {c["b"]: c for c in part["comparisons"] if c["a"] == f"cut_{cut:04d}" and "diff" in c}
    return " / ".join(_verdict(found.get(b), part["scale"]) for b in ("cut_0000", f"cut_{T:04d}"))


def _cuts(tied: list[int] | None) -> str:
    return "-" if tied is None else ", ".join(str(t) for t in tied)


def _rule(curve: dict | None, tied: list[int] | None, cut_arms: set[int]) -> str:
    """The recommendation rule's cut from the regime's curve, and whether it is among the cuts not worse than
    the best, naming those smaller than it (not testable where the rule's cut was not an arm of the sweep)."""
    from ..recommend import choose

    if not curve or (not curve.get("label_names_client") and not curve.get("points")):
        return "-"
    t = choose(curve)["t_zeta"]
    if tied is None:
        return f"{t}"
    if t in tied:  # the rule claims the smallest cut that keeps the clients' kinds: say where a smaller one tied
        smaller = [c for c in tied if c < t]
        return f"{t} (among them)" if not smaller else f"{t} (among them; smaller: {_cuts(smaller)})"
    return f"{t} (outside them)" if t in cut_arms else f"{t} (not an arm of the sweep)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m collafuse.studies.regimes", description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", type=Path, help="report folders, each with its summary.json")
    args = p.parse_args(argv)
    try:
        print(table(args.folders))
        print("\nEach client's own images (the primary metric of each client's samples against its own held-out "
              "images, the mean over the clients):\n")
        print(own_table(args.folders))
    except CollafuseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
