"""``memattn bench mitigate``: every method on one model, testbed measures or SSCD / CLIP score."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from memattn.bench.image_measures import SSCD
from memattn.bench.mitigate import run_mitigation_bench
from memattn.bench.mitigate_settings import Setting, parse_methods, parse_strengths, settings_for
from memattn.bench.pareto import pareto_front
from memattn.cli.bench import bench_app
from memattn.errors import MemattnError
from memattn.mitigation.registry import METHODS

TESTBED_COLUMNS = (
    "setting", "method", "strength", "seconds", "time_ratio", "copy_rate_128", "similarity_128",
    "copy_rate_template", "alignment_clean", "all_attributes_clean", "pareto",
)  # fmt: skip


def _app() -> typer.Typer:
    """``bench`` as the real CLI mounts it (the group may hold one command or several)."""
    app = typer.Typer()
    app.add_typer(bench_app, name="bench")
    return app


def _invoke(*args: str):
    return CliRunner().invoke(_app(), ["bench", "mitigate", *args])


class TinyDescriptor(torch.nn.Module):
    """An "SSCD" with SSCD's interface: [N, 3, H, W] ImageNet-normalised images -> [N, D] descriptors."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 5, stride=4)
        self.fc = torch.nn.Linear(8, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.relu(self.conv(x)).mean(dim=(2, 3))
        return torch.nn.functional.normalize(self.fc(features), dim=1)


@pytest.fixture(scope="module")
def measures(tmp_path_factory, sd1_pipe):
    """A saved tiny SD1 pipeline, a TorchScript descriptor, a tiny CLIP directory and prompt files."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from memattn.testing import clip_tokenizer

    root = tmp_path_factory.mktemp("bench_mitigate")
    sd1_pipe.save_pretrained(root / "pipe")
    torch.manual_seed(0)
    torch.jit.script(TinyDescriptor()).save(str(root / "sscd.torchscript.pt"))
    text = dict(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )  # fmt: skip
    vision = dict(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, image_size=32,
        patch_size=8,
    )  # fmt: skip
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(
        root / "clip"
    )
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=clip_tokenizer()).save_pretrained(root / "clip")
    (root / "memorized.txt").write_text("an old red barn in a snowy field\nthe starry night by van gogh\n")
    (root / "clean.txt").write_text("a cat on a sofa\na bowl of fruit on a table\n")
    (root / "refs").mkdir()
    rng = np.random.default_rng(0)
    for name in ("0.png", "0001.png"):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / "refs" / name)
    return root


# ------------------------------------------------------------------------------------------- inputs


def test_methods_strengths_and_settings_parse_and_reject_bad_input():
    assert parse_methods(None) == list(METHODS) == parse_methods("all")
    assert parse_methods("rta, none,rta") == ["rta", "none"]
    with pytest.raises(MemattnError, match="unknown mitigation method 'bogus'.*ren2024"):
        parse_methods("none,bogus")
    assert parse_strengths(["rta=1,4", '{"gni": [0.1, 0.5], "rta": 10}']) == {
        "rta": [1.0, 4.0, 10.0],
        "gni": [0.1, 0.5],
    }
    for bad, message in (
        (["rta"], "METHOD=VALUE"),
        (["rta=abc"], "not a number"),
        (["gni=nan"], "finite"),
        (["bogus=1"], "unknown method"),
        (["pad-replace=1"], "no strength"),
        (["{not json"], "not valid JSON"),
    ):
        with pytest.raises(MemattnError, match=message):
            parse_strengths(bad)
    settings = settings_for(["ren2024", "rta"], {"rta": [1.0, 4.0]})
    assert settings == [Setting("none"), Setting("ren2024"), Setting("rta", 1.0), Setting("rta", 4.0)]
    assert [s.label for s in settings] == ["none", "ren2024 1.25", "rta 1", "rta 4"]
    with pytest.raises(MemattnError, match="does not include"):
        settings_for(["ren2024"], {"rta": [1.0]})


def test_pareto_front_keeps_rows_nothing_beats_on_both_axes():
    rows = [
        {"x": 0.9, "y": 1.0},  # plain: best alignment
        {"x": 0.5, "y": 0.8},
        {"x": 0.6, "y": 0.7},  # dominated by the row above
        {"x": 0.3, "y": 0.8 + 1e-12},  # ties with row 1 on y, better on x: row 1 is dominated
        {"x": float("nan"), "y": 0.9},  # not measured: never on the front
    ]
    assert pareto_front(rows, "x", "y") == [0, 3]


# ------------------------------------------------------------------------------------------ testbed


def test_testbed_bench_writes_table_csv_json_and_figure(tmp_path):
    out = tmp_path / "bench"
    result = _invoke(
        "--methods", "ren2024", "--per-group", "2", "--steps", "3", "--seeds", "1", "--out", str(out)
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "memattn bench mitigate" in result.output
    with (out / "mitigation_bench.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["setting"] for row in rows] == ["none", "ren2024 1.25"]
    assert set(TESTBED_COLUMNS) <= set(rows[0])
    data = json.loads((out / "mitigation_bench.json").read_text())
    assert data["pareto_axes"] == ["similarity_128", "alignment_clean"]
    none, ren = data["rows"]
    assert none["time_ratio"] == 1.0 and ren["time_ratio"] > 0
    assert none["mode"] == "testbed" and none["per_group"] == 2 and ren["strength"] == 1.25
    for row in data["rows"]:
        for key in TESTBED_COLUMNS[5:10]:
            assert row[key] is None or 0 <= row[key] <= 1, (key, row[key])
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_guard_rows_are_calibrated_on_held_out_clean_prompts_and_leave_unflagged_images_alone(tmp_path):
    """The guard's row: threshold = 1 % FPR of the step-1 E of the 300 seen-once captions (recomputed
    here), flag shares in [0, 1]; the clean prompts it did not flag come out exactly as under `none`."""
    from memattn.bench.guarded import CALIBRATION_PROMPTS, GuardSetting, parse_guards
    from memattn.detection.step1 import score_step1
    from memattn.loading import load_pipeline, resolve_model
    from memattn.mitigation.guard import threshold_at_fpr
    from memattn.testbed.manifest import dataset_for

    layer = "up_blocks.0.attentions.1"
    assert parse_guards([f"{layer}:eos"]) == [GuardSetting(layer, "eos")]
    with pytest.raises(MemattnError, match="guard edit 'strong': choose one of paper, eos"):
        parse_guards([f"{layer}:strong"])
    path = resolve_model("testbed")
    pipe = load_pipeline(path, progress_bar=False)
    rows = run_mitigation_bench(
        "testbed", method_names="none", per_group=3, steps=3, seeds=1, pipe=pipe, progress=False,
        guards=[GuardSetting(layer, "eos")],
    )  # fmt: skip
    none, guard = rows
    assert guard["setting"] == f"guard E@{layer} (eos)" and guard["method"] == "guard"
    captions = [item.caption for item in dataset_for(path).group("seen_once")[:CALIBRATION_PROMPTS]]
    scores = score_step1(pipe, captions, seeds=list(range(len(captions))), steps=3, guidance_scale=2.0)
    assert guard["guard_threshold"] == pytest.approx(threshold_at_fpr(scores.score("e", layer), 0.01))
    assert 0 <= guard["flagged_128"] <= 1 and 0 <= guard["flagged_clean"] <= 1
    assert guard["flagged_clean"] == 0  # 3 never-seen prompts at a 1 % FPR threshold: none flagged
    assert guard["alignment_clean"] == none["alignment_clean"]  # so bit-identical to plain generation
    with pytest.raises(MemattnError, match="--guard rows run on a testbed model"):
        run_mitigation_bench(tmp_path, sscd=tmp_path / "x.pt", guards=[GuardSetting(layer)])


# ---------------------------------------------------------------------------------- SSCD and CLIP


def test_real_model_bench_measures_sscd_gen_and_clip_score(measures, tmp_path):
    out = tmp_path / "bench"
    result = _invoke(
        "--model", str(measures / "pipe"), "--methods", "gni", "--strengths", "gni=1.0",
        "--memorized", str(measures / "memorized.txt"), "--clean", str(measures / "clean.txt"),
        "--sscd", str(measures / "sscd.torchscript.pt"), "--clip", str(measures / "clip"),
        "--reference-dir", str(measures / "refs"), "--steps", "2", "--out", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads((out / "mitigation_bench.json").read_text())
    none, gni = data["rows"]
    assert (none["setting"], gni["setting"]) == ("none", "gni 1")
    assert none["sscd_gen"] == pytest.approx(1.0, abs=1e-9)  # same prompt, same seed, no mitigation
    assert gni["sscd_gen"] < 1 - 1e-6
    for row in (none, gni):
        assert row["mode"] == "images" and row["images"] == 4 and row["time_ratio"] > 0
        assert -1 <= row["sscd_train"] <= 1
        for key in ("clip_score_clean", "clip_score_memorized"):
            assert math.isfinite(row[key]) and 0 <= row[key] <= 100
    assert data["pareto_axes"] == ["sscd_train", "clip_score_clean"]
    assert (out / "pareto.png").is_file()


def test_sscd_only_leaves_alignment_unmeasured(measures, sd1_pipe):
    rows = run_mitigation_bench(
        measures / "pipe", method_names="none", memorized=measures / "memorized.txt",
        sscd=measures / "sscd.torchscript.pt", steps=2, pipe=sd1_pipe, progress=False,
    )  # fmt: skip
    assert len(rows) == 1 and rows[0]["sscd_gen"] == pytest.approx(1.0, abs=1e-9)
    assert math.isnan(rows[0]["clip_score_clean"]) and math.isnan(rows[0]["sscd_train"])


# ------------------------------------------------------------------------------------------- errors


def test_a_file_that_is_not_torchscript_is_one_clear_error(measures, tmp_path):
    for content in (b"not a model", None):
        bad = tmp_path / "sscd.pt"
        if content is None:
            torch.save({"weight": torch.zeros(2)}, bad)  # a state dict, not a TorchScript module
        else:
            bad.write_bytes(content)
        with pytest.raises(MemattnError, match=r"sscd\.pt is not a TorchScript module.*SSCD TorchScript"):
            SSCD(bad)
    args = ["--model", str(measures / "pipe"), "--memorized", str(measures / "memorized.txt")]
    result = _invoke(*args, "--sscd", str(bad), "--out", str(tmp_path / "out"))
    assert result.exit_code != 0 and isinstance(result.exception, MemattnError)
    assert "not a TorchScript module" in str(result.exception)
    assert not (tmp_path / "out").exists()


def test_bad_inputs_fail_before_generating(measures, sd1_pipe, tmp_path):
    pipe_dir = measures / "pipe"
    memorized = measures / "memorized.txt"
    with pytest.raises(MemattnError, match="not a testbed pipeline: pass --sscd FILE.*--clip DIR"):
        run_mitigation_bench(pipe_dir, memorized=memorized)
    with pytest.raises(MemattnError, match="--memorized FILE"):
        run_mitigation_bench(pipe_dir, sscd=measures / "sscd.torchscript.pt")
    with pytest.raises(MemattnError, match="--clip .* is not a directory"):
        run_mitigation_bench(
            pipe_dir, clip=memorized, memorized=memorized, clean=measures / "clean.txt", pipe=sd1_pipe
        )
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(MemattnError, match="holds no usable prompts"):
        run_mitigation_bench(pipe_dir, sscd=measures / "sscd.torchscript.pt", memorized=empty)
    with pytest.raises(MemattnError, match="does not exist"):
        run_mitigation_bench(pipe_dir, sscd=measures / "sscd.torchscript.pt", memorized=tmp_path / "no.txt")
    with pytest.raises(MemattnError, match=r"stp strength .* in \[0, 1\]"):
        run_mitigation_bench(
            pipe_dir, method_names="stp", strengths={"stp": [1.5]}, memorized=memorized,
            sscd=measures / "sscd.torchscript.pt", pipe=sd1_pipe, steps=2,
        )  # fmt: skip
    with pytest.raises(MemattnError, match="acts on classifier-free guidance"):
        run_mitigation_bench(
            pipe_dir, method_names="opposite-guidance", memorized=memorized, guidance=1.0,
            sscd=measures / "sscd.torchscript.pt", pipe=sd1_pipe, steps=2,
        )  # fmt: skip
    with pytest.raises(MemattnError, match="measured with --sscd/--clip"):
        run_mitigation_bench("testbed", memorized=memorized)
    result = _invoke("--methods", "none,bogus", "--out", str(tmp_path / "out"))
    assert result.exit_code != 0 and "unknown mitigation method 'bogus'" in str(result.exception)
