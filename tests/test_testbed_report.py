"""The testbed report: figures, JSON and an HTML page that escapes every caption."""

from __future__ import annotations

import json

import numpy as np

from memattn.testbed.evaluate import Evaluation
from memattn.testbed.report import write_report

GROUPS = ("memorized_matching", "memorized_template", "seen_once", "never_seen")


def synthetic_evaluation(n_per_group: int = 6, steps: int = 5, layers: int = 3) -> Evaluation:
    rng = np.random.default_rng(0)
    rows = []
    for g, group in enumerate(GROUPS):
        memorized = group.startswith("memorized")
        for i in range(n_per_group):
            rows.append(
                {
                    "group": group,
                    "caption": f"<script>alert('{group}')</script> & a red circle {i}",
                    "item_id": 100 * g + i,
                    "template_id": 0 if group == "memorized_template" else None,
                    "duplication": (8, 128)[i % 2] if group == "memorized_matching" else int(memorized),
                    "seed": 0,
                    "score_d": float(rng.normal(1.0 if memorized else 0.0)),
                    "score_e": float(rng.normal(0.5 if memorized else 0.0)),
                    "layer_e": rng.normal(size=layers).tolist(),
                    "bos_share": 0.1,
                    "prompt_share": 0.5,
                    "summary_share": 0.4,
                    "bos_share_step0": 0.1,
                    "summary_share_step0": 0.4,
                    "copy_similarity": float(rng.uniform(0.8, 1.0) if memorized else rng.uniform(0.1, 0.4)),
                    "nearest_item_id": 100 * g + i,
                    "nearest_group": group,
                    "nearest_is_own": memorized,
                    "pixel_similarity": 0.9,
                    "alignment": 1.0,
                    "attributes_correct": [True] * 5,
                }
            )
    n = len(rows)
    return Evaluation(
        rows=rows,
        generated=rng.uniform(-1, 1, (n, 3, 16, 16)).astype(np.float32),
        nearest=rng.uniform(-1, 1, (n, 3, 16, 16)).astype(np.float32),
        entropy=rng.uniform(2, 3, (n, steps)),
        summary_entropy=rng.uniform(0.5, 1, (n, steps)),
        settings={
            "model": "<b>model</b>",
            "guidance_scale": 2.0,
            "steps": steps,
            "per_group": n_per_group,
            "seeds": 1,
            "copy_threshold": 0.5,
        },
        layer_names=[f"down_blocks.{i}.attentions.0.transformer_blocks.0.attn2" for i in range(layers)],
    )


def test_report_writes_figures_json_and_escaped_html(tmp_path):
    evaluation = synthetic_evaluation()
    path = write_report(evaluation, tmp_path, extra={"note": "<i>x</i>"})
    html = path.read_text()
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "<b>model</b>" not in html and "<i>x</i>" not in html
    for name in ("copies", "copy_similarity", "entropy_over_steps", "attention_shares", "roc", "layer_e_auc"):
        png = tmp_path / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f'src="{name}.png"' in html
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["groups"]["memorized_matching"]["copy_rate"] == 1.0
    assert summary["groups"]["memorized_matching"]["copy_rate_by_duplication"] == {"8": 1.0, "128": 1.0}
    assert summary["groups"]["seen_once"]["copy_rate"] == 0.0
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == len(evaluation.rows)


def test_summary_metrics_follow_the_rows():
    evaluation = synthetic_evaluation(n_per_group=20)
    summary = evaluation.summary(copy_threshold=0.95)
    detection = summary["detection_vs_non_memorized"]
    assert detection["memorized_matching/score_d"]["positives"] == 20
    assert detection["memorized_matching/score_d"]["negatives"] == 40
    assert detection["memorized_matching/score_d"]["auc"] > 0.6  # drawn 1 sd apart: about 0.76 expected
    assert len(detection["memorized_template/layer_e_auc"]) == 3
    assert summary["groups"]["memorized_matching"]["copy_rate"] < 0.5  # threshold moved above most


def test_every_layers_e_has_an_auc_against_each_non_memorized_group():
    """Layer 1's E separates memorized rows from seen-once rows only: its per-group AUCs say so."""
    from memattn.testbed.report import detection_ranking

    evaluation = synthetic_evaluation(n_per_group=10)
    for row in evaluation.rows:
        memorized = row["group"].startswith("memorized")
        row["layer_e"][1] = 1.0 if memorized else (0.0 if row["group"] == "seen_once" else 2.0)
    summary = evaluation.summary()
    by_group = summary["layer_e_auc_by_negative_group"]
    assert set(by_group) == {"seen_once", "never_seen"}
    assert by_group["seen_once"][1] == 1.0 and by_group["never_seen"][1] == 0.0
    assert all(len(aucs) == 3 for aucs in by_group.values())
    ranked = {r["score"]: r for r in detection_ranking(summary)}
    assert ranked["E down_blocks.1.attentions.0"]["by_group"] == {"seen_once": 1.0, "never_seen": 0.0}


def test_every_example_verdict_in_the_html_follows_its_similarity(tmp_path):
    """The examples table once said "copy" for every row (jinja2 found dict.copy before the key)."""
    import re

    evaluation = synthetic_evaluation()
    html = write_report(evaluation, tmp_path).read_text()
    table = html[html.index("<h2>Copies") :]
    rows = re.findall(r"<td>([\d.]+)</td>\s*<td>(<span class=\"copy\">copy</span>|new)</td>", table)
    assert len(rows) >= 12
    verdicts = {("copy" in verdict) for _, verdict in rows}
    assert verdicts == {True, False}
    for similarity, verdict in rows:
        assert ("copy" in verdict) == (float(similarity) > 0.5), (similarity, verdict)


def test_headline_figure_and_mitigation_table(tmp_path):
    plain = synthetic_evaluation()
    mitigated = synthetic_evaluation()
    for row in mitigated.rows:
        row["copy_similarity"] = 0.2
    mitigated.settings["mitigation"] = {"c": 1.25}
    html = write_report(plain, tmp_path, mitigated=mitigated).read_text()
    assert (tmp_path / "headline.png").read_bytes()[:4] == b"\x89PNG"
    assert html.index('src="headline.png"') < html.index("Detection, best first")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["mitigation"]["plain"]["copy_rate_128"] == 1.0
    assert summary["mitigation"]["mitigated"]["copy_rate_128"] == 0.0
    assert "memattn.mitigate({&#39;c&#39;: 1.25})" in html


def test_guard_table_flag_shares_and_settings_in_the_html(tmp_path):
    plain = synthetic_evaluation()
    guarded = synthetic_evaluation()
    for row in guarded.rows:
        heavy = row["group"] == "memorized_matching" and row["duplication"] == 128
        row["guard_flagged"] = heavy or row["item_id"] == 300  # one never-seen prompt of six
        if heavy:
            row["copy_similarity"] = 0.2
    settings = {
        "layer": "up_blocks.0.attentions.1",
        "edit": {"mask_eos": True},
        "threshold": 0.5,
        "calibration": "x",
    }
    html = write_report(plain, tmp_path, guarded=guarded, guard_settings=settings).read_text()
    summary = json.loads((tmp_path / "summary.json").read_text())
    guard = summary["guard"]
    assert guard["plain"]["copy_rate_128"] == 1.0 and guard["guarded"]["copy_rate_128"] == 0.0
    assert guard["flagged_128"] == 1.0 and guard["flagged_clean"] == 1 / 6
    assert "mitigation" not in summary
    assert "E in up_blocks.0.attentions.1 at step 1 (threshold 0.5000, x)" in html
    assert "memattn.mitigate({&#39;mask_eos&#39;: True})" in html
    assert "1.00 / 0.17" in html
