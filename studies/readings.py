"""How the multi-set study reads its claims (results/multi/README.md): the protocol's rule (the
difference of the means against the sum of the two rows' seed stds, then per group of three
evaluations), its weak mark, and the paired rule of the 2026-12-05 addendum (per-seed
differences, a 95 % paired t interval). Markdown for the table page; no I/O."""
from __future__ import annotations

import numpy as np

from protocols import CAMVID_EVALS, MINED_BY, NO_CHANGE, SOURCE_PROBES

# [ours, after seed 1] rounding alone moves a fine-tuning job ~1.6 points (results/multi/README.md)
FINETUNINGS, WEAK_FINETUNE = CAMVID_EVALS[1:], 3.0


def untested(claim: str, mined: dict[str, dict[int, float]]) -> bool:
    """A mining claim is not tested when its row mined nothing at any seed (`mined_frac` 0)."""
    return claim in MINED_BY and not any(v > 0 for v in mined.get(MINED_BY[claim], {}).values())


def verdicts_markdown(checks: list[dict], mined: dict[str, dict[int, float]]) -> str:
    """Each claim read by the protocol's rule (results/multi/README.md) on the unseen set (the three
    CamVid evaluations) and on the sources (the three probes): it holds when it holds on at least
    two of the three and is reversed on none ("changes nothing": within seed noise on all three);
    reversed, the same the other way round [our symmetric reading]; else it does not hold. A group
    with an evaluation missing is not read yet; a mining claim whose row (`mined`: row -> seed ->
    mined_frac) mined at no seed is not tested. A CamVid verdict is marked weak when it changes
    once the fine-tunings that differ by under WEAK_FINETUNE points are read as within noise
    [ours, added with seeds 0-1 in: float rounding alone moves one fine-tuning job about 1.6
    points, a probe not at all]."""
    lines = ["", "Each claim by the protocol's reading rule (holds / reversed / within noise, of "
             "the group's evaluations), then each evaluation's difference ± the sum of the stds:",
             "", f"| claim | unseen: {' / '.join(CAMVID_EVALS)} | seen: "
             f"{' / '.join(SOURCE_PROBES)} |", "|---|---|---|"]
    for claim in dict.fromkeys(c["claim"] for c in checks):
        cells = []
        for group in (CAMVID_EVALS, SOURCE_PROBES):
            got = [c for c in checks if c["claim"] == claim and c["target"] in group]
            if len(got) < len(group):
                cells.append("—" if not got else "not read yet")
                continue
            verdict, counts = group_verdict(claim, [c["verdict"] for c in got])
            got.sort(key=lambda c: group.index(c["target"]))
            counts += ": " + " / ".join(f"{c['diff']:+.1f} ± {c['noise']:.1f}".replace("-", "−")
                                        for c in got)
            if untested(claim, mined):  # its differences are not mining's
                cells.append(f"not tested: mining did not fire {counts}")
                continue
            robust, _ = group_verdict(claim, [
                "within" if c["target"] in FINETUNINGS and abs(c["diff"]) < WEAK_FINETUNE
                else c["verdict"] for c in got])
            one = " (1 seed)" if any("1 seed" in c["verdict"] for c in got) else ""
            weak = ", weak" if robust != verdict else ""
            cells.append(f"{verdict}{one}{weak} {counts}")
        lines.append(f"| {claim} | " + " | ".join(cells) + " |")
    lines += ["", f"Weak: the verdict changes when the CamVid fine-tunings that differ by under "
              f"{WEAK_FINETUNE:g} points are read as within noise (float rounding alone moves one "
              "fine-tuning job by about 1.6 points; see results/multi/README.md)."]
    for claim, row in ((c, r) for c, r in MINED_BY.items() if mined.get(r)):
        lines += ["", f"Mining (M10), `mined_frac` over the last 100 pretraining steps of {row}: "
                  + ", ".join(f"seed {s}: {v:.3f}" for s, v in mined[row].items())
                  + (f"; mining did not fire at this budget, so the claim \"{claim}\" is not "
                     "tested here." if untested(claim, mined) else ".")]
    return "\n".join(lines) + "\n"


def group_verdict(claim: str, verdicts: list[str]) -> tuple[str, str]:
    """One group's verdict by the protocol's rule, and its (holds / reversed / within) counts."""
    n = {v: sum(x.startswith(v) for x in verdicts) for v in ("holds", "reversed", "within")}
    counts = f"({n['holds']} / {n['reversed']} / {n['within']})"
    if claim == NO_CHANGE:
        return ("holds" if n["within"] == len(verdicts) else "does not hold"), counts
    return ("holds" if n["holds"] >= 2 and not n["reversed"] else "reversed"
            if n["reversed"] >= 2 and not n["holds"] else "does not hold"), counts


# The paired rule [ours, committed 2026-12-05 before seeds 3-4 and the rows added with it; see the
# protocol's addendum in results/multi/README.md]. Rows that share a seed share its 1/8 subset and
# every random draw keyed by it, so each claim is read on the per-seed differences: a paired t
# interval at 95 % (two-sided), t_{0.975} of Student's t with n - 1 degrees of freedom for n seeds.
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228}


def paired_difference(diffs: list[float]) -> dict:
    """Mean of the per-seed differences and its 95 % paired t interval; verdict: holds when the
    interval lies above 0, reversed when below, within (level) when it holds 0. One seed: no
    interval, the sign only, marked."""
    n, mean = len(diffs), float(np.mean(diffs))
    if n < 2:
        return {"n": n, "mean": mean, "half": None,
                "verdict": ("holds" if mean > 0 else "reversed") + " (1 seed)"}
    half = T975[n - 1] * float(np.std(diffs, ddof=1)) / np.sqrt(n)
    verdict = "holds" if mean - half > 0 else "reversed" if mean + half < 0 else "within"
    return {"n": n, "mean": mean, "half": half, "verdict": verdict}


def mIoU(res: dict, e: str) -> float:
    return res[e]["mIoU"]


def paired_over_seeds(runs: dict[str, dict[int, dict]], better: str, worse: str, evals: list[str],
                      value=mIoU) -> tuple[list[int], list[dict]]:
    """On the seeds both rows have: per evaluation e, the differences value(better) - value(worse)
    seed by seed and their paired reading (paired_difference). No common seed: nothing."""
    seeds = sorted(set(runs.get(better, {})) & set(runs.get(worse, {})))
    readings = []
    for e in evals if seeds else []:
        diffs = [value(runs[better][s], e) - value(runs[worse][s], e) for s in seeds]
        readings.append({"target": e, "diffs": diffs, **paired_difference(diffs)})
    return seeds, readings


def interval(d: dict) -> str:
    """'+1.5 [+0.3, +2.7]': a paired mean difference and its 95 % interval (the mean alone for one
    seed), with a typographic minus."""
    text = f"{d['mean']:+.1f}" + ("" if d["half"] is None else
                                  f" [{d['mean'] - d['half']:+.1f}, {d['mean'] + d['half']:+.1f}]")
    return text.replace("-", "−")


def paired_checks(runs: dict[str, dict[int, dict]], claims: list,
                  evals: list[str]) -> list[dict]:
    """Every claim per evaluation by the paired rule, on the seeds both rows have."""
    checks = []
    for claim, better, worse, targets, _ in claims:
        seeds, ds = paired_over_seeds(runs, better, worse, [t for t in targets if t in evals])
        checks += [{"claim": claim, "target": d["target"], "better": better, "worse": worse,
                    "seeds": seeds, **d} for d in ds]
    return checks


def paired_markdown(paired: list[dict], mined: dict[str, dict[int, float]]) -> str:
    """Each claim by the paired rule, grouped as the protocol's rule groups them
    (verdicts_markdown): the group's verdict from its evaluations' paired verdicts, then each mean
    difference with its 95 % interval [low, high] and the seeds it rests on."""
    lines = ["", "Each claim by the paired rule (addendum of 2026-12-05: per seed the difference "
             "of the two rows, its mean over the seeds and the 95 % paired t interval; holds / "
             "reversed / level, of the group's evaluations: the group rule of the protocol), then "
             "each evaluation's mean difference [95 % interval]:", "",
             f"| claim | seeds | unseen: {' / '.join(CAMVID_EVALS)} | seen: "
             f"{' / '.join(SOURCE_PROBES)} |", "|---|---|---|---|"]
    for claim in dict.fromkeys(c["claim"] for c in paired):
        cells, seeds = [], next(c["seeds"] for c in paired if c["claim"] == claim)
        for group in (CAMVID_EVALS, SOURCE_PROBES):
            got = sorted((c for c in paired if c["claim"] == claim and c["target"] in group),
                         key=lambda c: group.index(c["target"]))
            if len(got) < len(group):
                cells.append("—" if not got else "not read yet")
                continue
            verdict, counts = group_verdict(claim, [c["verdict"] for c in got])
            one = " (1 seed)" if len(seeds) < 2 else ""
            diffs = " / ".join(interval(c) for c in got)
            if untested(claim, mined):
                verdict = "not tested: mining did not fire"
            cells.append(f"{verdict}{one} {counts}: {diffs}")
        lines.append(f"| {claim} | {', '.join(map(str, seeds))} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# The rows a user chooses between, in the README's table (then whichever repairs have run)
GLANCE = ["random", "ce", "mdp", "mdp_learned", "mdp_learned_csc_bank", "mdp_learned_unlabelled",
          "mdp_embed_bn", "mdp_centred"]


def glance_markdown(runs: dict[str, dict[int, dict]], labels: dict[str, str]) -> str:
    """The README's table: per row, mean ± std over its seeds of the three CamVid evaluations and
    of the mean of the three source probes (per seed); then each row against CE by the paired
    rule, on the seeds both have: mean difference [95 % interval]."""
    evals = CAMVID_EVALS + ["sources (mean of 3 probes)"]

    def value(res: dict, e: str) -> float:
        return (float(np.mean([res[p]["mIoU"] for p in SOURCE_PROBES])) if e == evals[-1]
                else res[e]["mIoU"])
    rows = [r for r in GLANCE if r in runs]
    head = "| {} | seeds | " + " | ".join(evals) + " |"
    lines = [head.format("pretraining, val mIoU"), "|---|---|" + "---:|" * len(evals)]
    for r in rows:
        vals = [[value(runs[r][s], e) for s in sorted(runs[r])] for e in evals]
        lines.append(f"| {labels[r]} | {len(runs[r])} | " + " | ".join(
            f"{np.mean(v):.1f} ± {np.std(v):.1f}" for v in vals) + " |")
    lines += ["", head.format("minus CE, per seed (paired)"), "|---|---|" + "---:|" * len(evals)]
    for r in (r for r in rows if r != "ce"):
        seeds, ds = paired_over_seeds(runs, r, "ce", evals, value)
        if len(seeds) >= 2:
            lines.append(f"| {labels[r]} | {len(seeds)} | " + " | ".join(map(interval, ds)) + " |")
    return "\n".join(lines + repair_lines(runs, labels)) + "\n"


def repair_lines(runs: dict[str, dict[int, dict]], labels: dict[str, str]) -> list[str]:
    """One line per repair [ours] that has run: against CE and against the source's MDP on the
    three CamVid evaluations, the group's verdict by the paired rule (above / below / level) and
    each mean difference [95 % interval], on the seeds both rows have."""
    words = {"holds": "above", "reversed": "below", "does not hold": "level with"}
    lines = []
    for r in (r for r in GLANCE[3:] if r in runs):
        parts = []
        for base, name in (("ce", "CE"), ("mdp", "the source's MDP")):
            seeds, ds = paired_over_seeds(runs, r, base, CAMVID_EVALS)
            if len(seeds) < 2:
                parts.append(f"against {name}: {len(seeds)} common seed, not read yet")
                continue
            verdict, _ = group_verdict("", [d["verdict"] for d in ds])
            parts.append(f"**{words[verdict]} {name}** on CamVid (seeds "
                         f"{', '.join(map(str, seeds))}; " + ", ".join(
                             f"{d['target'].removeprefix('CamVid ')} {interval(d)}" for d in ds)
                         + ")")
        lines.append(f"- {labels[r]}: " + "; ".join(parts) + ".")
    return ["", "Each repair [ours] by the paired rule on the three CamVid evaluations (probe, "
            "1/8, all: mean difference [95 % interval]):", "", *lines] if lines else []


def scale_markdown(base: dict[str, dict[int, dict]], scaled: dict[str, dict[int, dict]],
                   base_steps: int, scaled_steps: int, labels: dict[str, str]) -> str:
    """The scale step (results/multi/README.md, addendum 2026-12-05): per seed s and CamVid
    evaluation e, the gap g = row - CE at each budget and its change g(scaled) - g(base) on the
    same seed. A row gains on CE when the change is above zero at every seed on at least two of
    the three evaluations and below zero at every seed on none (for a row below CE: the gap
    narrows); loses to CE the other way round; else unchanged at these seeds."""
    lines = ["", f"The scale step: each row's gap to CE on CamVid at {base_steps} and "
             f"{scaled_steps} pretraining steps, per seed (gap at {base_steps} → gap at "
             f"{scaled_steps}), and the direction by the addendum's rule:", "",
             f"| row | seeds | {' | '.join(CAMVID_EVALS)} | with more steps, the row |",
             "|---|---|" + "---|" * len(CAMVID_EVALS) + "---|"]
    for r in (r for r in scaled if r != "ce"):
        seeds = sorted(set(scaled[r]) & set(scaled.get("ce", {})) & set(base.get(r, {}))
                       & set(base.get("ce", {})))
        if not seeds:
            continue

        def gap(runs: dict, s: int, e: str) -> float:
            return runs[r][s][e]["mIoU"] - runs["ce"][s][e]["mIoU"]
        cells, up, down = [], 0, 0
        for e in CAMVID_EVALS:
            change = [gap(scaled, s, e) - gap(base, s, e) for s in seeds]
            up += all(c > 0 for c in change)
            down += all(c < 0 for c in change)
            cells.append(", ".join(f"{gap(base, s, e):+.1f} → {gap(scaled, s, e):+.1f}"
                                   for s in seeds).replace("-", "−"))
        verdict = ("gains on CE" if up >= 2 and not down else "loses to CE"
                   if down >= 2 and not up else "unchanged at these seeds")
        lines.append(f"| {labels[r]} | {', '.join(map(str, seeds))} | " + " | ".join(cells)
                     + f" | {verdict} ({up} / {down} / {len(CAMVID_EVALS) - up - down}) |")
    return "\n".join(lines) + "\n"
