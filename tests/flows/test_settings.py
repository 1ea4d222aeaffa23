"""Settings: thresholds files, config sections, run ids."""

from __future__ import annotations

import json

import pytest

from flows.curate import check_inputs, derive_run_id
from flows.settings import CurateParams, build_config, canonical_config, load_thresholds


def test_yaml_and_json_thresholds_build_frozen_configs(tmp_path):
    y = tmp_path / "t.yaml"
    y.write_text("source: {min_words: 3, max_words: 40}\nhttp: {resolve: [[img.example.test, 127.0.0.1]]}\n")
    data = load_thresholds(str(y))
    assert build_config("source", data["source"]).min_words == 3
    assert build_config("http", data["http"]).resolve == (("img.example.test", "127.0.0.1"),)
    j = tmp_path / "t.json"
    j.write_text(json.dumps({"image": {"min_side": 150}}))
    assert build_config("image", load_thresholds(str(j))["image"]).min_side == 150


@pytest.mark.parametrize("content, message", [
    ({"imagez": {"min_side": 1}}, "unknown section"),
    ({"image": {"min_sides": 1}}, "unknown setting"),
    (["not", "a", "mapping"], "expected a mapping"),
])
def test_bad_thresholds_are_clear_errors(tmp_path, content, message):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message):
        load_thresholds(str(p))


def test_old_spellings_are_read_under_their_current_names(tmp_path):
    assert build_config("dedup", {"nprobe": 3}).nprobes == 3
    y = tmp_path / "old.yaml"
    y.write_text("dedup: {nprobe: 3}\n")
    assert load_thresholds(str(y)) == {"dedup": {"nprobes": 3}}
    assert CurateParams(config={"dedup": {"nprobe": 3}}).config == {"dedup": {"nprobes": 3}}
    assert canonical_config({"dedup": {"nprobe": 3, "nprobes": 3}}) == {"dedup": {"nprobes": 3}}  # agreeing


def test_one_setting_under_two_spellings_with_different_values_is_a_clear_error():
    with pytest.raises(ValueError, match=r"dedup.nprobes given twice.*dedup.nprobe = 3 and dedup.nprobes = 4"):
        build_config("dedup", {"nprobe": 3, "nprobes": 4})
    with pytest.raises(ValueError, match="given twice"):
        CurateParams(config={"dedup": {"nprobe": 3, "nprobes": 4}})


def test_one_dedup_radius_serves_both_rules_and_the_old_crossbatch_spelling_reaches_it(tmp_path):
    params = CurateParams(config={"crossbatch": {"threshold": 0.2, "nprobes": 8}})
    assert params.config == {"crossbatch": {"nprobes": 8}, "dedup": {"threshold": 0.2}}
    assert build_config("dedup", params.config["dedup"]).threshold == 0.2
    assert build_config("crossbatch", params.config["crossbatch"]).nprobes == 8
    assert not hasattr(build_config("crossbatch", {}), "threshold")  # one radius, read from dedup
    y = tmp_path / "both.yaml"
    y.write_text("dedup: {threshold: 0.1}\ncrossbatch: {threshold: 0.2}\n")
    with pytest.raises(ValueError, match=r"dedup.threshold given twice.*crossbatch.threshold = 0.2"):
        load_thresholds(str(y))
    with pytest.raises(ValueError, match=r"section 'crossbatch'.*dedup.threshold.*another section"):
        build_config("crossbatch", {"threshold": 0.2})  # a section alone cannot hand its value over


def test_cli_bad_thresholds_exit_before_any_work(tmp_path, capsys):
    from flows.cli import main

    p = tmp_path / "bad.json"
    p.write_text(json.dumps({"image": {"min_sides": 1}}))
    assert main(["run", "--thresholds", str(p), "--out", str(tmp_path / "out")]) == 2
    assert "min_sides" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_run_id_is_stable_for_the_same_inputs_and_differs_for_others(tmp_path):
    a, b = tmp_path / "a.warc.gz", tmp_path / "b.warc.gz"
    a.write_bytes(b"")
    b.write_bytes(b"")
    assert derive_run_id([str(a), str(b)], None) == derive_run_id([str(b), str(a)], None)
    assert derive_run_id([str(a)], None) != derive_run_id([str(b)], None)
    assert derive_run_id([str(a)], "CC-MAIN-2024-33").startswith("CC-MAIN-2024-33-")


def test_check_inputs_rejects_bad_urls_and_unknown_roles(tmp_path):
    w = tmp_path / "a.warc.gz"
    w.write_bytes(b"")
    url = "https://data.commoncrawl.org/x.warc.gz"
    assert check_inputs(CurateParams(warcs=[url, str(w)])) == [url, str(w)]  # URLs are read when the run starts
    with pytest.raises(ValueError, match="must be http"):
        check_inputs(CurateParams(warcs=["ftp://example.org/x.warc.gz"]))
    assert check_inputs(CurateParams(warcs=[url, str(w)], warc_offset=1, warc_limit=1)) == [str(w)]
    with pytest.raises(ValueError, match="unknown model role"):
        check_inputs(CurateParams(warcs=[str(w)], models={"embedz": "x"}))
    with pytest.raises(FileNotFoundError):
        check_inputs(CurateParams(warcs=[str(tmp_path / "missing.warc.gz")]))


def test_check_inputs_fails_on_a_missing_or_empty_list_file_before_any_work(tmp_path):
    w = tmp_path / "a.warc.gz"
    w.write_bytes(b"")
    missing = str(tmp_path / "my-keywords.txt")
    with pytest.raises(FileNotFoundError, match="my-keywords.txt"):
        check_inputs(CurateParams(warcs=[str(w)], config={"source": {"extra_keyword_lists": [missing]}}))
    sites = tmp_path / "sites.txt"
    sites.write_text("# nothing yet\n", encoding="utf-8")
    with pytest.raises(ValueError, match="sites.txt.*holds no entries"):
        check_inputs(CurateParams(warcs=[str(w)], config={"source": {"site_blacklists": [str(sites)]}}))
    # Stage 2's lists too: its keyword lists and its stop-word lists.
    with pytest.raises(FileNotFoundError, match="my-keywords.txt"):
        check_inputs(CurateParams(warcs=[str(w)], config={"refine": {"extra_keyword_lists": [missing]}}))
    with pytest.raises(FileNotFoundError, match="stop-word list.*my-stops.txt"):
        check_inputs(CurateParams(warcs=[str(w)],
                                  config={"refine": {"extra_stop_word_lists": [str(tmp_path / "my-stops.txt")]}}))


def test_a_named_text_classifier_is_checked_before_any_work(tmp_path):
    from tiny_models import build_tiny_text_classifier

    from flows.curate import resolve_models
    from flows.engine import model_ref
    from tasks.models import ModelLoadError

    w = tmp_path / "a.warc.gz"
    w.write_bytes(b"")
    base = {"warcs": [str(w)], "models": {"embed": "placeholder", "align": "placeholder"}}
    assert "nsfw_text" not in resolve_models(CurateParams(**base))  # none by default: keywords only
    with pytest.raises(ModelLoadError, match="absent"):
        resolve_models(CurateParams(**{**base, "models": {**base["models"], "nsfw_text": str(tmp_path / "absent")}}))
    model = str(build_tiny_text_classifier(tmp_path / "clf", labels=("ok", "unsafe")))
    named = {**base, "models": {**base["models"], "nsfw_text": model}}
    with pytest.raises(ValueError, match=r"labels \['ok', 'unsafe'\]"):
        resolve_models(CurateParams(**named))
    resolved = resolve_models(CurateParams(**named, config={"source": {"text_nsfw_labels": ["unsafe"]}}))
    assert model_ref(resolved["nsfw_text"]) == (model, False, "local")
