"""``report.html``: one self-contained file (inline CSS, plots as PNG ``data:`` URIs, no
script, no network) with a table of contents, the headline table with a plain-language
verdict per figure, and each section's plots with a sentence saying what good looks like."""

from __future__ import annotations

import datetime as dt
import html
import math

import numpy as np

from ehrgpt import __version__
from ehrgpt.evaluate import plots
from ehrgpt.evaluate.privacy import MIA_THRESHOLD, REID_ACCEPTABLE
from ehrgpt.evaluate.utility import HEADS, MAIN_HEAD, MIN_PER_CLASS, interval_text

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;
margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{margin-bottom:.2em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ddd;padding:.3em .6em;
text-align:left;vertical-align:top}th{background:#f4f4f4}td.num{text-align:right;
font-variant-numeric:tabular-nums}
.grid{display:flex;flex-wrap:wrap;gap:1em}figure{margin:0;flex:1 1 460px;max-width:520px}
figure img{width:100%;height:auto;border:1px solid #eee}figcaption{font-size:.9em;color:#444}
.good{color:#1a7f37}.bad{color:#b42318}.meh{color:#9a6700}nav ol{columns:2}.muted{color:#666}
"""


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    return f"{float(value):.{digits}f}"


def _nan(value) -> bool:
    return value is None or (isinstance(value, float) and not math.isfinite(value))


def verdicts(m: dict) -> dict[str, tuple[str, str]]:
    """A (class, sentence) per headline metric: ``good``, ``meh`` or ``bad``, and what it
    means in plain words.

    >>> verdicts({"mia_auc": 0.5})["mia_auc"][0]
    'good'
    """
    out: dict[str, tuple[str, str]] = {}

    def put(key, ok, meh, good_text, meh_text, bad_text):
        v = m.get(key)
        if _nan(v):
            out[key] = ("meh", "could not be computed (see the section below)")
        elif ok(v):
            out[key] = ("good", good_text)
        elif meh(v):
            out[key] = ("meh", meh_text)
        else:
            out[key] = ("bad", bad_text)

    put(
        "prevalence_pearson",
        lambda v: v >= 0.9,
        lambda v: v >= 0.7,
        "codes are about as common in synthetic patients as in real ones",
        "code frequencies roughly follow the real ones",
        "code frequencies differ from the real ones",
    )
    put(
        "cooccurrence_pearson",
        lambda v: v >= 0.9,
        lambda v: v >= 0.7,
        "codes that go together in real patients go together in synthetic ones",
        "pairs of codes partly keep their real association",
        "pairs of codes do not keep their real association",
    )
    put(
        "kl",
        lambda v: v <= 0.1,
        lambda v: v <= 0.5,
        "the code distribution is close to the real one",
        "the code distribution is somewhat off",
        "the code distribution is far from the real one",
    )
    put(
        "discriminator_auroc",
        lambda v: v <= 0.6,
        lambda v: v <= 0.8,
        "a classifier can hardly tell synthetic from real patients",
        "a classifier tells synthetic from real patients fairly often",
        "a classifier easily tells synthetic from real patients",
    )
    tstr, trtr = m.get("tstr_auroc"), m.get("trtr_auroc")
    if _nan(tstr) or _nan(trtr):
        out["tstr_auroc"] = ("meh", "could not be computed (see Utility)")
    elif tstr >= trtr - 0.05:
        out["tstr_auroc"] = (
            "good",
            "a model trained on synthetic patients works as well on real ones",
        )
    elif tstr >= trtr - 0.15:
        out["tstr_auroc"] = ("meh", "a model trained on synthetic patients loses some accuracy")
    else:
        out["tstr_auroc"] = ("bad", "a model trained on synthetic patients works much worse")
    out["trtr_auroc"] = ("good", "the reference: trained and tested on real patients")
    put(
        "mia_auc",
        lambda v: v <= 0.55,
        lambda v: v <= 0.6,
        "an attacker cannot tell training patients from others by their closest synthetic record",
        "training patients are slightly closer to synthetic ones than unseen patients",
        "training patients are much closer to synthetic ones: membership leaks",
    )
    put(
        "nnaa_privacy_loss",
        lambda v: abs(v) <= 0.05,
        lambda v: abs(v) <= 0.1,
        "synthetic patients are no closer to training patients than to unseen ones",
        "synthetic patients sit slightly closer to training patients",
        "synthetic patients sit much closer to training patients than to unseen ones",
    )
    f1, f1_real = m.get("attribute_f1"), m.get("attribute_f1_real")
    if _nan(f1) or _nan(f1_real):
        out["attribute_f1"] = ("meh", "could not be computed")
    elif f1 <= f1_real + 0.02:
        out["attribute_f1"] = (
            "good",
            f"guessing hidden codes from synthetic data works no better "
            f"than from other real patients (F1 {_fmt(f1_real)})",
        )
    else:
        out["attribute_f1"] = (
            "bad",
            f"synthetic data reveals hidden codes better than other real "
            f"patients do (F1 {_fmt(f1_real)})",
        )
    put(
        "reid_risk",
        lambda v: v < REID_ACCEPTABLE,
        lambda v: v < 2 * REID_ACCEPTABLE,
        f"under the commonly accepted {REID_ACCEPTABLE}",
        f"above the commonly accepted {REID_ACCEPTABLE}",
        f"well above the commonly accepted {REID_ACCEPTABLE}",
    )
    put(
        "exact_copy_rate",
        lambda v: v <= 0.01,
        lambda v: v <= 0.05,
        "synthetic patients are not copies of training patients",
        "a few synthetic patients repeat a training patient's codes exactly",
        "many synthetic patients copy a training patient's codes exactly",
    )
    return out


_LABELS = {
    "prevalence_pearson": "Code prevalence, Pearson r",
    "cooccurrence_pearson": "Co-occurrence, Pearson r",
    "kl": "KL(real || synthetic) of code frequencies",
    "discriminator_auroc": "Real-vs-synthetic classifier AUROC (0.5 best)",
    "tstr_auroc": "TSTR AUROC (train synthetic, test real)",
    "trtr_auroc": "TRTR AUROC (train real, test real)",
    "mia_auc": "Membership inference AUC (0.5 best)",
    "nnaa_privacy_loss": "NNAA privacy loss (0 best)",
    "attribute_f1": "Attribute inference F1",
    "reid_risk": "Re-identification risk",
    "exact_copy_rate": "Exact-copy rate",
}


def _figure(uri: str, alt: str, caption: str) -> str:
    return (
        f'<figure><img src="{uri}" alt="{html.escape(alt)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _table(header: list[str], rows: list[list[str]], numeric: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>"
            for i, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def render_html(ev) -> str:
    """The report of an :class:`~ehrgpt.pipelines.evaluate.Evaluation`."""
    m = ev.metrics()
    f = ev.fidelity
    v = verdicts(m)
    sections: list[tuple[str, str, str]] = []

    rows = [
        [
            html.escape(_LABELS[k]),
            _fmt(m.get(k)),
            f'<span class="{v[k][0]}">{html.escape(v[k][1])}</span>',
        ]
        for k in _LABELS
    ]
    sections.append(("summary", "Summary", _table(["figure", "value", "verdict"], rows, {1})))

    fid = [
        "<p>Synthetic patients against the real <b>training</b> patients the model learned "
        "from.</p>",
        '<div class="grid">',
        _figure(
            plots.scatter(
                f.real_prevalence,
                f.syn_prevalence,
                xlabel="real prevalence",
                ylabel="synthetic prevalence",
                title="share of patients with each code",
            ),
            "code prevalence scatter",
            f"Each dot a code: the share of real (x) and synthetic (y) patients who have it. "
            f"Good: dots on the dashed line. Pearson r {_fmt(f.prevalence_pearson)}, "
            f"R^2 {_fmt(f.prevalence_r2)}, KL {_fmt(f.kl)}.",
        ),
        _figure(
            plots.scatter(
                f.real_cooccurrence,
                f.syn_cooccurrence,
                xlabel="real",
                ylabel="synthetic",
                title="pairs of frequent codes in one patient",
            ),
            "co-occurrence scatter",
            f"Each dot a pair of the 100 most frequent codes: share of patients with both. "
            f"Good: dots on the dashed line. Pearson r {_fmt(f.cooccurrence_pearson)}.",
        ),
        "</div>",
        f"<p>A logistic regression on code counts, age, first year and visits, "
        f"cross-validated, tells real from synthetic patients with AUROC "
        f"<b>{_fmt(f.discriminator_auroc)}</b>. Good: near 0.5 (a coin toss).</p>",
        "<h3>Codes whose prevalence differs most</h3>",
        _table(
            ["code", "description", "real", "synthetic", "difference"],
            [
                [
                    html.escape(r["code"]),
                    html.escape(r["description"] or ""),
                    _fmt(r["real"]),
                    _fmt(r["synthetic"]),
                    _fmt(r["difference"]),
                ]
                for r in ev.top_gaps.iter_rows(named=True)
            ],
            {2, 3, 4},
        ),
    ]
    sections.append(("fidelity", "Fidelity: codes", "\n".join(fid)))

    dist_figs = []
    for d in f.distributions:
        if d.kind == "numeric" and not len(d.real) and not len(d.synthetic):
            continue
        extra = "" if d.kind == "categorical" else f", KS {_fmt(d.ks)}"
        dist_figs.append(
            _figure(
                plots.distribution(d),
                d.name,
                f"{d.name}: real (blue) and synthetic (orange) overlaid. Good: the two shapes "
                f"coincide. {d.distance_name} {_fmt(d.distance)}{extra}.",
            )
        )
    if not any(d.name.startswith("value of") for d in f.distributions):
        note = (
            "<p class='muted'>The real data holds no numeric values, so there are no lab plots.</p>"
        )
    else:
        note = ""
    sections.append(
        (
            "distributions",
            "Fidelity: distributions",
            '<div class="grid">' + "".join(dist_figs) + "</div>" + note,
        )
    )

    util_rows, labels = [], []
    bars: dict[str, list[float]] = {"TSTR": [], "TRTR": []}
    cis: dict[str, list[list[float]]] = {"TSTR": [], "TRTR": []}
    for task, scores in ev.utility.items():
        labels.append(task)
        for kind, s in (("TSTR", scores["tstr"]), ("TRTR", scores["trtr"])):
            main = s.heads.get(MAIN_HEAD)
            bars[kind].append(s.auroc)
            cis[kind].append(main["auroc_ci"] if main else [float("nan")] * 2)
            for head in [*s.heads] or ["-"]:
                util_rows.append(
                    [
                        html.escape(task),
                        f"{kind} ({s.trained_on})",
                        head,
                        interval_text(s.heads.get(head)),
                        f"{s.n_train:,} ({s.n_train_positive:,} positive)",
                        f"{s.n_test:,} ({s.n_test_positive:,} positive)",
                        html.escape(s.note),
                    ]
                )
    util = [
        "<p>Each task is an ACES task; the same task labels the real and the synthetic "
        "patients. The count baseline of <code>ehrgpt baseline</code> (counts of each code in "
        "the last 30 days, 365 days and all time before the prediction time, and age; "
        f"{', '.join(HEADS)}) is trained on synthetic patients (TSTR) or on real training "
        "patients (TRTR) and tested on the same real held_out labels: AUROC with its 95% "
        "patient-level bootstrap interval. The headline figures are the first task's. Good: "
        f"TSTR close to TRTR. A side with fewer than {MIN_PER_CLASS} positive or negative "
        "training labels is not trained (the note says so).</p>",
        _table(
            [
                "task",
                "trained on",
                "head",
                "AUROC [95% CI]",
                "training labels",
                "test labels",
                "note",
            ],
            util_rows,
            {3},
        ),
    ]
    if labels:
        util.append(
            '<div class="grid">'
            + _figure(
                plots.bars(
                    labels,
                    bars,
                    ylabel="AUROC",
                    title=f"train on synthetic vs on real ({MAIN_HEAD})",
                    intervals=cis,
                ),
                "utility bars",
                "AUROC on real held_out patients, with 95% intervals; dashed line: chance; "
                "an empty bar could not be trained. Good: orange as high as blue.",
            )
            + "</div>"
        )
    sections.append(("utility", "Utility", "\n".join(util)))

    mem = ev.membership
    priv_rows = [
        [
            html.escape(_LABELS[k]),
            _fmt(m.get(k)),
            f'<span class="{v[k][0]}">{html.escape(v[k][1])}</span>',
        ]
        for k in ("mia_auc", "nnaa_privacy_loss", "attribute_f1", "reid_risk", "exact_copy_rate")
    ]
    priv = [
        "<p>Each patient as a vector (scaled age, one-hot gender and race, which codes they "
        "have); distances are squared Euclidean.</p>",
        _table(["figure", "value", "verdict"], priv_rows, {1}),
        "<ul>",
        f"<li>Membership inference: the reference's attack (a training patient if the closest "
        f"synthetic record is within squared distance {MIA_THRESHOLD:g}, over at most 5,000 + "
        f"5,000 patients) has accuracy {_fmt(m.get('mia_threshold_accuracy'))} and F1 "
        f"{_fmt(m.get('mia_threshold_f1'))}; 0.5 accuracy is a coin toss.</li>",
        f"<li>Adversarial accuracy (Yale et al.): training {_fmt(m.get('nnaa_aa_train'))}, "
        f"held_out {_fmt(m.get('nnaa_aa_held_out'))}; 0.5 each is ideal.</li>",
        f"<li>Attribute inference: an attacker knowing age, gender, race and the "
        f"10 most common codes guesses the other codes of training patients from the closest "
        f"synthetic record (F1 {_fmt(m.get('attribute_f1'))}) or from the closest unseen real "
        f"patient (F1 {_fmt(m.get('attribute_f1_real'))}).</li>",
        "</ul>",
        '<div class="grid">',
        _figure(
            plots.distances(mem.member_distance, mem.nonmember_distance),
            "distance to closest synthetic record",
            "Distance from each real patient to the closest synthetic one, training patients "
            "against held_out patients. Good: the two histograms coincide (training patients "
            "are not closer).",
        ),
        "</div>",
    ]
    sections.append(("privacy", "Privacy", "\n".join(priv)))

    c = ev.counts
    about = _table(
        ["", ""],
        [
            ["real run", html.escape(ev.real)],
            ["synthetic patients", html.escape(ev.synthetic)],
            [
                "patients",
                f"train {c['train']:,}, held_out {c['held_out']:,}, synthetic "
                f"{c['synthetic']:,}; {c['codes']:,} clinical codes",
            ],
            ["seconds", ", ".join(f"{k} {s:.1f}" for k, s in ev.seconds.items())],
            [
                "written",
                f"{dt.datetime.now().isoformat(timespec='seconds')} by ehrgpt {__version__}",
            ],
        ],
    )
    sections.append(("about", "About this report", about))

    toc = "".join(f'<li><a href="#{sid}">{html.escape(t)}</a></li>' for sid, t, _ in sections)
    body = "\n".join(
        f'<section id="{sid}"><h2>{html.escape(t)}</h2>\n{content}</section>'
        for sid, t, content in sections
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        "<title>ehrgpt evaluation of synthetic patients</title>"
        f"<style>{_CSS}</style></head><body>"
        "<h1>Synthetic patients: fidelity, utility, privacy</h1>"
        f"<p class='muted'>{c['synthetic']:,} synthetic against {c['train']:,} real training "
        f"and {c['held_out']:,} held_out patients.</p>"
        f"<nav><b>Contents</b><ol>{toc}</ol></nav>{body}</body></html>\n"
    )
